"""``IPAEncoder``: EdgeEmbedder and FlashIPA stack in one module, frozen-export ready."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import EncoderConfig
from ..export.pretrained import ExportMixin
from .attention import resolve_backend
from .compiling import compile_pretrained
from .edge_embedder import EdgeEmbedder
from .frames import Frames, identity_rotations
from .pair_features import FactorizedPairEmbedder
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

    config_class = EncoderConfig

    def __init__(self, config: EncoderConfig | None = None, **overrides: Any):
        super().__init__()
        self.config = config = (config or EncoderConfig()).replace(**overrides)
        factorized = config.mode == "flash_2d_factorize_bias"
        self.edge_embedder = FactorizedPairEmbedder(config) if factorized else EdgeEmbedder(config)
        self.ipa_stack = FlashIPAStack(config)
        if config.num_residue_types:
            self.residue_embedding = nn.Embedding(config.num_residue_types, config.c_s)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        attention: str | None = None,
        compile: bool = False,
        compile_cache: bool | str | os.PathLike = True,
        trust_compile_cache: bool = False,
        **kwargs: Any,
    ) -> IPAEncoder:
        """Load a frozen encoder (``eval()``, no gradients) from an export directory or Hub repo id.

        Takes the options of :meth:`ExportMixin.from_pretrained
        <ipa_export.export.pretrained.ExportMixin.from_pretrained>` (``revision``, ``cache_dir``,
        ``local_files_only``, ``token``, ``device``, ``dtype``, ``expected``), and:
        ``attention`` overrides the stored backend; ``compile=True`` returns
        :func:`ipa_export.model.compiling.compile_encoder` (fullgraph, dynamic, one graph for all
        batch sizes), after loading the compile cache ``compile_cache`` names (``True``: the
        one this machine saved for this export in the user's cache directory,
        :func:`~ipa_export.model.compiling.compile_cache_file`, when present; ``False``: none;
        a path: that file, only with ``trust_compile_cache=True``, since loading a compile cache
        runs the code it holds). Nothing inside an export is ever loaded as a compile cache.
        """
        overrides = {"attention": attention} if attention is not None else None
        encoder = super().from_pretrained(path_or_repo_id, config_overrides=overrides, **kwargs)
        if not compile:
            return encoder
        return compile_pretrained(  # type: ignore[return-value]
            encoder, encoder.export_directory, kwargs.get("device"), compile_cache, trust_compile_cache
        )

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
