"""``IPAEncoder``: EdgeEmbedder and FlashIPA stack in one module, frozen-export ready."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import EncoderConfig
from ..errors import InputError
from ..execution import inspecting_values
from ..export.compile_cache import load_export_compile_cache
from ..export.pretrained import ExportMixin
from .attention import backend_for
from .compiling import CompiledEncoder, compile_encoder
from .edge_embedder import EdgeEmbedder, residue_positions
from .frames import Frames, identity_rotations, masked_mean
from .pair_features import FactorizedPairEmbedder
from .shapes import implied_config
from .stack import FlashIPAStack
from .validation import (
    Shapes,
    check_devices,
    check_indices,
    check_structure_inputs,
    warn_unusual_ca_spacing,
)


class EncoderOutput(NamedTuple):
    """Per-residue outputs. Padded positions hold zeros (``s``, ``z_f1``, ``z_f2``,
    ``translations``) and identity ``rotations``, whatever the inputs held there.

    dtypes, with or without ``torch.autocast``: ``s``, ``z_f1``, ``z_f2`` in the encoder's
    parameter dtype; ``rotations``, ``translations`` float32 (float64 for a float64 encoder).
    Every tensor is contiguous."""

    s: torch.Tensor  #: [B, N, c_s] geometry-aware node embeddings
    rotations: torch.Tensor  #: [B, N, 3, 3] updated frame rotations
    translations: torch.Tensor  #: [B, N, 3] updated frame translations (Angstrom)
    z_f1: torch.Tensor  #: [B, N, R, c_p] first edge factor
    z_f2: torch.Tensor  #: [B, N, R, c_p] second edge factor

    def pooled(self, node_mask: torch.Tensor) -> torch.Tensor:
        """[B, c_s]: ``s`` averaged over each protein's valid residues (``node_mask`` [B, N])."""
        return masked_mean(self.s, node_mask)

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        """``out["s"]`` as in transformers' outputs; integers and slices index the tuple."""
        if not isinstance(key, str):
            return tuple.__getitem__(self, key)
        if key not in self._fields:
            raise KeyError(f"{key!r}: not an output; outputs are {', '.join(self._fields)}")
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        """The output names, in order."""
        return self._fields

    def values(self) -> tuple[Any, ...]:
        return tuple(self)

    def items(self) -> tuple[tuple[str, Any], ...]:
        return tuple(zip(self._fields, self, strict=True))


class HiddenStates(NamedTuple):
    """Per-block states, one entry per IPA block (padded positions as in the outputs)."""

    s: tuple[torch.Tensor, ...]  #: [B, N, c_s] after each block; the last is ``s`` before the final norm
    rotations: tuple[torch.Tensor, ...]  #: [B, N, 3, 3] frames after each block
    translations: tuple[torch.Tensor, ...]  #: [B, N, 3] (Angstrom)


class EncoderOutputWithHiddenStates(NamedTuple):
    """:class:`EncoderOutput`'s fields, then ``hidden_states``; returned with ``output_hidden_states=True``."""

    s: torch.Tensor
    rotations: torch.Tensor
    translations: torch.Tensor
    z_f1: torch.Tensor
    z_f2: torch.Tensor
    hidden_states: HiddenStates

    pooled = EncoderOutput.pooled
    __getitem__ = EncoderOutput.__getitem__
    keys = EncoderOutput.keys
    values = EncoderOutput.values
    items = EncoderOutput.items


class IPAEncoder(ExportMixin, nn.Module):
    """FlashIPA geometric encoder: ``EdgeEmbedder`` -> ``depth`` IPA blocks -> LayerNorm.

    >>> encoder = IPAEncoder(EncoderConfig(c_s=64, c_p=32, c_hidden=16, no_heads=4, depth=1))
    >>> out = encoder(torch.randn(1, 20, 64), 10 * torch.randn(1, 20, 3), torch.ones(1, 20, dtype=torch.bool))
    >>> tuple(out.s.shape), tuple(out.z_f1.shape)
    ((1, 20, 64), (1, 20, 2, 32))
    """

    config_class = EncoderConfig
    _warned_ca_spacing: bool = False
    #: the config fields tensor shapes determine (read by :func:`~ipa_export.export.format.read_header`)
    implied_config = staticmethod(implied_config)

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
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        expected: Mapping[str, Any] | None = None,
        trainable: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        attention: str | None = None,
        attn_dtype: str | None = None,
        compile: bool = False,
        compile_cache: bool | str | os.PathLike = True,
        trust_compile_cache: bool = False,
    ) -> IPAEncoder | CompiledEncoder:
        """Load a frozen encoder (``eval()``, no gradients) from an export directory or Hub repo id.

        Takes the options of :meth:`ExportMixin.from_pretrained
        <ipa_export.export.pretrained.ExportMixin.from_pretrained>` (``revision``, ``cache_dir``,
        ``local_files_only``, ``token``, ``device``, ``dtype``, ``expected``, ``trainable``), and:
        ``attention`` and ``attn_dtype`` override the stored attention backend and dtype
        (``attn_dtype="bf16"``: see the README's "Low-precision attention"); ``compile=True`` returns
        :func:`ipa_export.model.compiling.compile_encoder` (fullgraph, dynamic, one graph for all
        batch sizes), after loading the compile cache ``compile_cache`` names (``True``: the
        one this machine saved for this export in the user's cache directory,
        :func:`~ipa_export.export.compile_cache.compile_cache_file`, when present; ``False``: none;
        a path: that file, only with ``trust_compile_cache=True``, since loading a compile cache
        runs the code it holds). Nothing inside an export is ever loaded as a compile cache.
        """
        overrides = {name: value for name, value in (("attention", attention), ("attn_dtype", attn_dtype)) if value}
        encoder = super().from_pretrained(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
            device=device, dtype=dtype, expected=expected, config_overrides=overrides or None, trainable=trainable,
            torch_dtype=torch_dtype,
        )  # fmt: skip
        if not compile:
            return encoder
        load_export_compile_cache(encoder.export_directory, device, compile_cache, trust_compile_cache)
        return compile_encoder(encoder)

    def attention_backend(self, device: torch.device | str | None = None) -> str:
        """The attention backend that ``config.attention`` resolves to on ``device``
        (default: the encoder's device) in the current grad mode."""
        device = torch.device(device) if device is not None else next(self.parameters()).device
        return backend_for(self.config, device)

    def embed_residues(self, aatype: torch.Tensor) -> torch.Tensor:
        """Residue types [...] int64 -> node embeddings [..., c_s] from the export's table."""
        if not self.config.num_residue_types:
            raise InputError(
                "this encoder has no residue-type embedding table (config.num_residue_types is 0; `ipa-export "
                "convert --residue-embedding-seed SEED` adds an untrained one, for demos); "
                "pass node embeddings [N, c_s] instead"
            )
        return self.residue_embedding(aatype)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        """Recompute each IPA block's activations in the backward pass instead of storing them
        (less memory for training through the encoder, one more block forward per step).
        Inside ``torch.func`` transforms the blocks run without recomputation (same results)."""
        self.ipa_stack.gradient_checkpointing = enable

    def neighbours(self, translations: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """The neighbours the forward pass would search: translations [B, N, 3] C-alpha
        positions (Angstrom, or ``trans_sc``), node_mask [B, N] bool -> indices [B, N, knn_k]
        int64 of the nearest other valid residues, nearest first, -1 for none.

        Pass them back as ``forward(..., neighbours=...)`` to hold the neighbour graph fixed while
        the coordinates move (guidance, sampling steps): see the README's "Inside a generative model"."""
        shapes = Shapes()
        shapes.check("translations", translations, ("B", "N", 3))
        shapes.check("node_mask", node_mask, ("B", "N"), dtype="bool")
        check_devices(self.device, translations=translations, node_mask=node_mask)
        return self._neighbour_embedder().neighbours(translations, node_mask)

    def _neighbour_embedder(self) -> EdgeEmbedder:
        """The edge embedder, when it has neighbour features (mode ``flash_1d_bias``)."""
        if self.config.mode != "flash_1d_bias":
            raise InputError(
                f"neighbours: only mode 'flash_1d_bias' has neighbour features, this encoder's is {self.config.mode!r}"
            )
        return self.edge_embedder  # type: ignore[return-value]

    def forward(
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        node_mask: torch.Tensor,
        rotations: torch.Tensor | None = None,
        trans_sc: torch.Tensor | None = None,
        residue_index: torch.Tensor | None = None,
        chain_index: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        *,
        neighbours: torch.Tensor | None = None,
        sc_neighbours: torch.Tensor | None = None,
        check_ca_spacing: bool = True,
    ) -> EncoderOutput | EncoderOutputWithHiddenStates:
        """node_embed [B, N, c_s] (any float dtype; cast to the parameters'); translations
        [B, N, 3] C-alpha positions (Angstrom); node_mask [B, N] bool; rotations [B, N, 3, 3]
        (default identity); trans_sc [B, N, 3] (default translations); residue_index [B, N]
        int residue numbers (default the slots) and chain_index [B, N] int chain ids in
        [0, N) (default one chain) for the index features, see
        :func:`~ipa_export.model.edge_embedder.residue_positions`.

        ``neighbours`` [B, N, knn_k] int64 (from :meth:`neighbours`) replaces the kNN search
        (and ``sc_neighbours`` the one on ``trans_sc``, required when ``trans_sc`` is given).
        ``check_ca_spacing=False`` skips the C-alpha spacing check (for noisy coordinates); it
        otherwise warns (:class:`~ipa_export.CoordinateScaleWarning`) once per encoder.

        Runs with ``torch.autocast`` disabled: the encoder keeps its own dtype policy
        (parameters' dtype for the layers, fp32 geometry, ``config.attn_dtype`` attention).
        """
        weight = self.ipa_stack.final_norm.weight
        check_structure_inputs(
            self.config.c_s, node_embed, translations, node_mask, rotations, trans_sc, device=weight.device
        )
        check_indices(node_mask, residue_index, chain_index)
        check_devices(weight.device, residue_index=residue_index, chain_index=chain_index)
        self.keep_frozen()
        # eager only (inspecting_values first: a compiled graph must not guard on the flag)
        if check_ca_spacing and inspecting_values() and not self._warned_ca_spacing:
            self._warned_ca_spacing = warn_unusual_ca_spacing(node_mask, translations)  # once per encoder
        fixed = {"neighbours": neighbours, "sc_neighbours": sc_neighbours}
        if neighbours is None and sc_neighbours is None:
            fixed = {}  # the search, in every mode
        else:
            self._neighbour_embedder()  # mode flash_1d_bias only
        dtype = weight.dtype
        device_type = node_embed.device.type
        # only inside an autocast region: an autocast context in a compiled graph bypasses AOTAutograd's cache
        autocast = torch.is_autocast_enabled(device_type)
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            node_embed = node_embed.to(dtype)
            if rotations is None:
                rotations = identity_rotations(node_mask.shape, device=translations.device)
            positions = residue_positions(node_mask, residue_index, chain_index)
            backend = self.attention_backend(node_embed.device)
            z_f1, z_f2 = self.edge_embedder(node_embed, translations, node_mask, trans_sc, positions, **fixed)
            hidden: list[tuple[torch.Tensor, Frames]] | None = [] if output_hidden_states else None
            s, rigid = self.ipa_stack(
                node_embed, Frames(rotations, translations), z_f1, z_f2, node_mask, backend, hidden
            )
        valid = node_mask[..., None]
        out = EncoderOutput(torch.where(valid, s, 0.0), *(x.contiguous() for x in (*rigid, z_f1, z_f2)))
        if hidden is None:
            return out
        states = HiddenStates(
            tuple(torch.where(valid, h, 0.0) for h, _ in hidden),
            tuple(r.contiguous() for _, (r, _) in hidden),
            tuple(t.contiguous() for _, (_, t) in hidden),
        )
        return EncoderOutputWithHiddenStates(*out, states)
