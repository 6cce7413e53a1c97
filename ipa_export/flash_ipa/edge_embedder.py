"""flash_ipa's ``EdgeEmbedderConfig`` and ``EdgeEmbedder`` (``flash_ipa.edge_embedder``), on
this package's edge modules.

``EdgeEmbedder(config)`` returns the subclass for ``config.mode`` (as ``pathlib.Path`` does),
which is also the package module of that mode, so its parameters carry flash_ipa's names:

=========================== ============================================================
mode                        parameters (flash_ipa's keys) and package module
=========================== ============================================================
``flash_1d_bias``           kNN factors: :class:`~ipa_export.model.edge_embedder.EdgeEmbedder`
``flash_2d_factorize_bias`` dense pair features + ``factorizer``:
                            :class:`~ipa_export.model.pair_features.FactorizedPairEmbedder`
``orig_2d_bias``            dense pair features:
                            :class:`~ipa_export.model.pair_features.PairEmbedder`
``flash_no_bias``,          only the edge MLP ``edge_embedder``, which flash_ipa builds and never
``orig_no_bias``            uses in these modes
=========================== ============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import EncoderConfig
from ..errors import InputError, InputTypeError
from ..model import edge_embedder as ours_1d
from ..model import pair_features
from ..model.validation import Shapes, check_structure_inputs

MODES = ("orig_no_bias", "orig_2d_bias", "flash_no_bias", "flash_1d_bias", "flash_2d_factorize_bias")
EdgeOutputs = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@dataclass
class EdgeEmbedderConfig:
    """flash_ipa's edge-embedder config: same fields and defaults. ``single_bias_transition_n``,
    ``relpos_k``, ``use_rbf``, ``num_rbf`` and ``self_condition`` have no effect, as in flash_ipa."""

    z_factor_rank: int = 2  #: rank of the factorised edge embedding
    single_bias_transition_n: int = 2
    c_s: int = 256  #: node embedding width
    c_p: int = 128  #: edge embedding width
    relpos_k: int = 64
    use_rbf: bool = True
    num_rbf: int = 32
    feat_dim: int = 64  #: width of the index embeddings and node projections
    num_bins: int = 22  #: distogram bins
    self_condition: bool = True
    mode: str = "flash_1d_bias"  #: one of :data:`MODES`
    k: int = 10  #: neighbours per residue (flash_1d_bias)
    max_len: int | None = None  #: longest protein (flash_2d_factorize_bias only, required there)


def as_mask(name: str, mask: object) -> torch.Tensor:
    """flash_ipa masks may be bool, integer or float: non-zero means valid. Returns bool."""
    if not isinstance(mask, torch.Tensor):
        raise InputTypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    return mask if mask.dtype == torch.bool else mask != 0


def encoder_config(cfg: EdgeEmbedderConfig) -> EncoderConfig:
    """The package config whose edge module has ``cfg``'s layers (``cfg.mode`` is valid)."""
    factorized = cfg.mode in ("flash_1d_bias", "flash_2d_factorize_bias")
    if cfg.mode == "flash_2d_factorize_bias" and not cfg.max_len:
        raise InputError(f"max_len: mode 'flash_2d_factorize_bias' needs the longest protein length, got {cfg.max_len}")
    return EncoderConfig(
        c_s=cfg.c_s,
        c_p=cfg.c_p,
        mode=cfg.mode if factorized else "flash_no_bias",
        z_factor_rank=cfg.z_factor_rank if factorized else 0,
        feat_dim=cfg.feat_dim,
        knn_k=cfg.k,
        num_bins=cfg.num_bins,
        max_len=cfg.max_len if cfg.mode == "flash_2d_factorize_bias" else 0,
    )


def flash_ipa_edge_config(config: EncoderConfig) -> EdgeEmbedderConfig:
    """The flash_ipa config of ``config``'s edge embedder (inverse of :func:`encoder_config`)."""
    return EdgeEmbedderConfig(
        c_s=config.c_s,
        c_p=config.c_p,
        z_factor_rank=config.z_factor_rank,
        feat_dim=config.feat_dim,
        num_bins=config.num_bins,
        k=config.knn_k,
        mode=config.mode,
        max_len=config.max_len or None,
    )


class EdgeEmbedder(nn.Module):
    """flash_ipa's ``EdgeEmbedder``: ``forward(node_embed, translations, trans_sc, node_mask,
    edge_embed=None, edge_mask=None) -> (edge_embed, z_factor_1, z_factor_2, edge_mask)``.

    Differences from flash_ipa: neighbours (``flash_1d_bias``) are searched among the valid
    residues of each protein only, padded positions of every output are zero, a given
    ``edge_embed`` is multiplied by ``edge_mask`` in both 2-D modes, and the mask may be of
    any dtype (non-zero = valid)."""

    def __new__(cls, module_cfg: EdgeEmbedderConfig | None = None, *args: Any, **kwargs: Any) -> EdgeEmbedder:
        if cls is EdgeEmbedder:
            if not isinstance(module_cfg, EdgeEmbedderConfig):
                raise InputTypeError(f"module_cfg: expected an EdgeEmbedderConfig, got {type(module_cfg).__name__}")
            if module_cfg.mode not in MODES:
                raise InputError(f"mode: must be one of {list(MODES)}, got {module_cfg.mode!r}")
            cls = _MODE_CLASSES[module_cfg.mode]
        return super().__new__(cls)

    def _setup(self, module_cfg: EdgeEmbedderConfig) -> None:
        self._cfg = module_cfg
        self.mode = module_cfg.mode

    def forward(
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        trans_sc: torch.Tensor,
        node_mask: torch.Tensor,
        edge_embed: torch.Tensor | None = None,
        edge_mask: torch.Tensor | None = None,
    ) -> EdgeOutputs:
        """node_embed [B, N, c_s]; translations, trans_sc [B, N, 3]; node_mask [B, N];
        edge_embed [B, N, N, c_p] and edge_mask [B, N, N] (2-D modes only)."""
        mask = as_mask("node_mask", node_mask)
        check_structure_inputs(self._cfg.c_s, node_embed, translations, mask, trans_sc=trans_sc)
        if edge_embed is not None or edge_mask is not None:
            if self.mode not in ("orig_2d_bias", "flash_2d_factorize_bias"):
                raise InputError(f"edge_embed, edge_mask: must be None in mode {self.mode!r} (it has no 2-D input)")
            shapes = Shapes(B=mask.shape[0], N=mask.shape[1], c_p=self._cfg.c_p)
            if edge_embed is not None:
                shapes.check("edge_embed", edge_embed, ("B", "N", "N", "c_p"))
            if edge_mask is not None:
                shapes.check("edge_mask", edge_mask, ("B", "N", "N"), dtype=edge_mask.dtype)
        sc = None if trans_sc is translations else trans_sc  # the same positions: one neighbour search
        return self._embed(node_embed, translations, sc, mask, node_mask, edge_embed, edge_mask)

    def _embed(
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        trans_sc: torch.Tensor | None,
        mask: torch.Tensor,
        node_mask: torch.Tensor,
        edge_embed: torch.Tensor | None,
        edge_mask: torch.Tensor | None,
    ) -> EdgeOutputs:
        raise NotImplementedError


class _NoBias(EdgeEmbedder):
    """``flash_no_bias`` / ``orig_no_bias``: no edge features (the MLP exists for flash_ipa's keys)."""

    def __init__(self, module_cfg: EdgeEmbedderConfig):
        super().__init__()
        self._setup(module_cfg)
        self.edge_embedder = ours_1d.edge_mlp(encoder_config(module_cfg))

    def _embed(self, *args: Any) -> EdgeOutputs:
        return None, None, None, None


class _Flash1dBias(EdgeEmbedder, ours_1d.EdgeEmbedder):
    """``flash_1d_bias``: kNN-distogram factors, never a [N, N] tensor."""

    def __init__(self, module_cfg: EdgeEmbedderConfig):
        ours_1d.EdgeEmbedder.__init__(self, encoder_config(module_cfg))
        self._setup(module_cfg)

    def _embed(self, node_embed, translations, trans_sc, mask, node_mask, edge_embed, edge_mask) -> EdgeOutputs:  # type: ignore[no-untyped-def]
        z_f1, z_f2 = ours_1d.EdgeEmbedder.forward(self, node_embed, translations, mask, trans_sc)
        return None, z_f1, z_f2, None


class _Orig2dBias(EdgeEmbedder, pair_features.PairEmbedder):
    """``orig_2d_bias``: the dense pair representation, for the original IPA path."""

    def __init__(self, module_cfg: EdgeEmbedderConfig):
        pair_features.PairEmbedder.__init__(self, encoder_config(module_cfg))
        self._setup(module_cfg)

    def _embed(self, node_embed, translations, trans_sc, mask, node_mask, edge_embed, edge_mask) -> EdgeOutputs:  # type: ignore[no-untyped-def]
        edge_mask = node_mask[:, None] * node_mask[:, :, None] if edge_mask is None else edge_mask
        if edge_embed is None:
            edge_embed = self.pair_features(node_embed, translations, mask, trans_sc)
        return edge_embed * edge_mask[..., None], None, None, edge_mask


class _Flash2dFactorizeBias(_Orig2dBias, pair_features.FactorizedPairEmbedder):
    """``flash_2d_factorize_bias``: the dense pair representation factorised to rank R."""

    def __init__(self, module_cfg: EdgeEmbedderConfig):
        pair_features.FactorizedPairEmbedder.__init__(self, encoder_config(module_cfg))
        self._setup(module_cfg)

    def _embed(self, node_embed, translations, trans_sc, mask, node_mask, edge_embed, edge_mask) -> EdgeOutputs:  # type: ignore[no-untyped-def]
        pair, *_ = super()._embed(node_embed, translations, trans_sc, mask, node_mask, edge_embed, edge_mask)
        z_f1, z_f2 = self.factors(pair, mask)
        return None, z_f1, z_f2, None


_MODE_CLASSES: dict[str, type[EdgeEmbedder]] = {
    "flash_no_bias": _NoBias,
    "orig_no_bias": _NoBias,
    "flash_1d_bias": _Flash1dBias,
    "orig_2d_bias": _Orig2dBias,
    "flash_2d_factorize_bias": _Flash2dFactorizeBias,
}
