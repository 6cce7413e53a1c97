"""``IPAEncoder``: EdgeEmbedder and FlashIPA stack in one module, frozen-export ready."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .attention import resolve_backend
from .config import EncoderConfig
from .edge_embedder import EdgeEmbedder
from .export import ExportMixin
from .frames import Frames, identity_rotations
from .stack import FlashIPAStack
from .validation import check_structure_inputs


class EncoderOutput(NamedTuple):
    """Per-residue outputs. Padded positions hold zeros (``s``, ``z_f1``, ``z_f2``,
    ``translations``) and identity ``rotations``, whatever the inputs held there."""

    s: torch.Tensor  #: [B, N, c_s] geometry-aware node embeddings
    rotations: torch.Tensor  #: [B, N, 3, 3] updated frame rotations
    translations: torch.Tensor  #: [B, N, 3] updated frame translations (Angstrom)
    z_f1: torch.Tensor  #: [B, N, R, c_p] first edge factor
    z_f2: torch.Tensor  #: [B, N, R, c_p] second edge factor


class IPAEncoder(ExportMixin, nn.Module):
    """FlashIPA geometric encoder: ``EdgeEmbedder`` -> ``depth`` IPA blocks -> LayerNorm.

    >>> encoder = IPAEncoder(EncoderConfig(c_s=64, c_p=32, c_hidden=16, no_heads=4, depth=1))
    >>> out = encoder(torch.randn(1, 20, 64), 10 * torch.randn(1, 20, 3), torch.ones(1, 20, dtype=torch.bool))
    >>> tuple(out.s.shape), tuple(out.z_f1.shape)
    ((1, 20, 64), (1, 20, 2, 32))
    """

    def __init__(self, config: EncoderConfig | None = None, **overrides: Any):
        super().__init__()
        self.config = config = (config or EncoderConfig()).replace(**overrides)
        self.edge_embedder = EdgeEmbedder(config)
        self.ipa_stack = FlashIPAStack(config)
        if config.num_residue_types:
            self.residue_embedding = nn.Embedding(config.num_residue_types, config.c_s)

    def attention_backend(self, device: torch.device | str | None = None) -> str:
        """The attention backend that ``config.attention`` resolves to on ``device``
        (default: the encoder's device) in the current grad mode."""
        device = torch.device(device) if device is not None else next(self.parameters()).device
        return resolve_backend(self.config.attention, device, self.config.attn_dtype, torch.is_grad_enabled())

    def embed_residues(self, aatype: torch.Tensor) -> torch.Tensor:
        """Residue types [...] int64 -> node embeddings [..., c_s] from the export's table."""
        if not self.config.num_residue_types:
            raise ValueError(
                "this encoder has no residue-type embedding table (config.num_residue_types is 0); "
                "pass node embeddings [N, c_s] instead"
            )
        return self.residue_embedding(aatype)

    def forward(
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        node_mask: torch.Tensor,
        rotations: torch.Tensor | None = None,
        trans_sc: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """node_embed [B, N, c_s]; translations [B, N, 3] C-alpha positions (Angstrom);
        node_mask [B, N] bool; rotations [B, N, 3, 3] (default identity); trans_sc [B, N, 3]
        (default translations)."""
        dtype = self.ipa_stack.final_norm.weight.dtype
        check_structure_inputs(
            self.config.c_s, node_embed, translations, node_mask, rotations, trans_sc, embed_dtype=dtype
        )
        if rotations is None:
            rotations = identity_rotations(node_mask.shape, device=translations.device)

        backend = self.attention_backend(node_embed.device)
        z_f1, z_f2 = self.edge_embedder(node_embed, translations, node_mask, trans_sc)
        s, rigid = self.ipa_stack(node_embed, Frames(rotations, translations), z_f1, z_f2, node_mask, backend)
        return EncoderOutput(torch.where(node_mask[..., None], s, 0.0), *rigid, z_f1, z_f2)
