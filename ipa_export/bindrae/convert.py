"""Convert a BINDRAE Stage-1 training checkpoint into a frozen export.

The checkpoint is read with ``torch.load(..., weights_only=True)`` only. The config is
inferred from tensor shapes, cross-checked against the checkpoint's own config dict and
the caller's overrides; any disagreement is an error, never a guess. After writing, the
export is reloaded and compared with the source modules on a random protein.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import EncoderConfig
from ..errors import CheckFailedError, ConfigCompatibilityError, InputError
from ..export.files import sha256_of
from ..export.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    expected_tensors,
    read_header,
    read_weights,
    write_export,
    write_model_card,
    writing_export,
)
from ..flash_ipa import keys as flash_ipa_keys
from ..flash_ipa.edge_embedder import EdgeEmbedder as FlashIPAEdgeEmbedder
from ..flash_ipa.edge_embedder import flash_ipa_edge_config
from ..model.edge_embedder import EdgeEmbedder
from ..model.encoder import IPAEncoder
from ..model.frames import Frames, identity_rotations
from ..model.shapes import COMPRESSOR, RESIDUE_TABLE, implied_config
from ..model.stack import FlashIPAStack
from .keys import (
    ADAPTER_EDGE,
    CONFIG_KEY,
    STAGE1_EDGE,
    STAGE1_IPA,
    STATE_DICT_KEY,
    checkpoint_name,
    checkpoint_to_encoder,
    stage1_modules,
)

ZIP_MAGIC, PICKLE_PROTOCOL, GZIP_MAGIC = b"PK\x03\x04", b"\x80", b"\x1f\x8b"
SAFETENSORS_HEADER_START = b"{"  #: after the 8-byte header length
PARITY_ATOL = 1e-5
PARITY_LENGTH = 64
# Stage-1 config keys that name EncoderConfig fields (checkpoint name -> field).
CHECKPOINT_CONFIG_FIELDS = {
    "c_s": "c_s",
    "c_p": "c_p",
    "z_factor_rank": "z_factor_rank",
    "c_hidden": "c_hidden",
    "no_heads": "no_heads",
    "depth": "depth",
    "no_qk_points": "no_qk_points",
    "no_v_points": "no_v_points",
    "dropout": "dropout",
    "max_rot_update_deg": "max_rot_update_deg",
    "max_trans_update": "max_trans_update",
}


@dataclass(frozen=True)
class Checkpoint:
    """The two modules' tensors (their checkpoint keys), an optional residue-type table
    (``residue_embedding.weight``, kept in every layout) and the checkpoint's own config dict.
    ``flash_ipa_layout``: flash_ipa's EdgeEmbedder sits directly under ``edge_embedder.`` (see
    :mod:`ipa_export.flash_ipa.keys`) rather than inside BINDRAE's adapter. ``export``: the
    tensors are an export's (IPAEncoder keys) and ``config`` is its complete config."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    sha256: str
    path: Path
    flash_ipa_layout: bool = False
    export: bool = False

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under IPAEncoder keys."""
        if self.export:
            return dict(self.state_dict)
        state = self.state_dict
        table = {k: v for k, v in state.items() if k == RESIDUE_TABLE}
        to_encoder = flash_ipa_keys.flash_ipa_to_encoder if self.flash_ipa_layout else checkpoint_to_encoder
        return {**to_encoder(state), **table}

    def stated_fields(self) -> dict[str, Any]:
        """The config fields the checkpoint's own config states (an export's: all of them)."""
        if self.export:
            return dict(self.config)
        return {CHECKPOINT_CONFIG_FIELDS[k]: v for k, v in self.config.items() if k in CHECKPOINT_CONFIG_FIELDS}


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a Stage-1 checkpoint (``model_state_dict`` + ``config``), a bare state dict with
    ``edge_embedder.`` and ``ipa_module.`` (or ``ipa_stack.``) keys in BINDRAE's or flash_ipa's
    layout, or a dict of the two modules' state dicts (``{"edge_embedder": ...,
    "ipa_module": ...}``), or an export (its directory, or its model.safetensors beside its
    config.json). Refuses anything needing unpickling."""
    path = Path(path)
    if path.is_dir():
        return _read_export(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if _check_torch_save_file(path) == "safetensors":
        return _read_export(path.parent, given=path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"{path}: refused: this checkpoint needs arbitrary unpickling, which can run code "
            f"(torch.load(weights_only=True) failed: {str(error).splitlines()[0]}). Re-save its state dict as "
            "plain tensors, e.g. torch.save({'model_state_dict': model.state_dict()}, path)"
        ) from error
    except Exception as error:  # whatever a damaged file makes the reader raise
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    state, config = (data.get(STATE_DICT_KEY), data.get(CONFIG_KEY) or {}) if isinstance(data, dict) else (None, {})
    if state is None and isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        data = {f"{name}.{k}": v for name, module in data.items() for k, v in module.items()}  # module state dicts
    if state is None and isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        state = data
    if not isinstance(state, dict) or not isinstance(config, dict):
        raise InputError(
            f"{path}: expected a dict with 'model_state_dict' (and optionally 'config'), or a bare state dict"
        )
    prefixes = (STAGE1_EDGE, *flash_ipa_keys.STACK_PREFIXES, RESIDUE_TABLE)
    modules = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefixes)}
    if not modules:
        raise InputError(f"{path}: no '{STAGE1_EDGE}*' or '{STAGE1_IPA}*' tensors in the state dict")
    problems = [
        f"{k}: expected a floating-point tensor, got {v.dtype if isinstance(v, torch.Tensor) else type(v).__name__}"
        for k, v in modules.items()
        if not (isinstance(v, torch.Tensor) and v.is_floating_point())
    ]
    problems += [
        f"{k}: {n} non-finite value(s) (NaN or inf); the checkpoint is damaged"
        for k, v in modules.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and (n := int((~torch.isfinite(v)).sum()))
    ]
    if problems:
        shown = problems[:5] + ([f"... and {len(problems) - 5} more tensor(s)"] if len(problems) > 5 else [])
        raise ConfigCompatibilityError(shown, context=f"checkpoint {path}")
    flash_ipa_layout = flash_ipa_keys.is_flash_ipa_checkpoint(modules)
    with open(path, "rb") as f:
        sha256, _ = sha256_of(f)
    return Checkpoint(modules, config, sha256, path, flash_ipa_layout)


def _read_export(directory: Path, given: Path | None = None) -> Checkpoint:
    """An export's tensors and complete config, checked as ``from_pretrained`` checks them.
    ``given``: the safetensors file named on the command line, which must be the export's."""
    if given is not None and not (given.name == WEIGHTS_NAME and (directory / CONFIG_NAME).is_file()):
        with safe_open(given, framework="pt") as f:
            known = implied_config({k: f.get_slice(k).get_shape() for k in f.keys()}).fields
        unknown = ", ".join(name for name in EncoderConfig.__dataclass_fields__ if name not in known)
        where = f"no {CONFIG_NAME} beside it" if given.name == WEIGHTS_NAME else f"not named {WEIGHTS_NAME}"
        raise InputError(
            f"{given}: {where}: a safetensors file converts only as an export's {WEIGHTS_NAME}, whose "
            f"{CONFIG_NAME} holds the fields its shapes cannot tell ({unknown}); pass the export directory"
        )
    header = read_header(directory, IPAEncoder)
    weights = read_weights(header)
    with open(directory / WEIGHTS_NAME, "rb") as f:
        sha256, _ = sha256_of(f)
    return Checkpoint(weights, header.config.to_dict(), sha256, directory, export=True)


def _check_torch_save_file(path: Path) -> str:
    """``"torch"`` for a file that torch.save can have written (a zip archive, or a pickle in
    the legacy format), ``"safetensors"`` for a safetensors file; refuse anything else, saying
    what the file looks like instead."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith((ZIP_MAGIC, PICKLE_PROTOCOL)) or not head:  # empty: torch.load's own message
        return "torch"
    if head[8:9] == SAFETENSORS_HEADER_START:
        return "safetensors"
    if head.startswith(GZIP_MAGIC):
        looks = "gzip-compressed data (a structure file such as .pdb.gz?)"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        looks = f"text starting {head.decode().splitlines()[0][:40]!r}"
    else:
        looks = f"binary data starting {head[:8].hex(' ')}"
    raise InputError(
        f"{path}: not a PyTorch checkpoint: torch.save writes a zip archive (or a legacy pickle), this file is "
        f"{looks}. Pass the .pt training checkpoint; structure files go to `ipa-export embed`"
    )


def infer_config(checkpoint: Checkpoint, overrides: Mapping[str, Any] | None = None) -> EncoderConfig:
    """Infer the encoder config from tensor shapes (:func:`~ipa_export.model.shapes.implied_config`);
    the checkpoint's config and ``overrides`` must agree with the shapes and give the fields
    shapes cannot tell (else their defaults; converted BINDRAE models use the reference
    frame-update clip)."""
    shapes = {k: tuple(v.shape) for k, v in checkpoint.encoder_state_dict().items()}
    stated, overrides = checkpoint.stated_fields(), dict(overrides or {})
    edge = "edge_embedder."
    if edge + "linear_s_p.weight" in shapes and not {edge + "linear_t_distogram.weight", COMPRESSOR} & shapes.keys():
        raise InputError(
            f"{checkpoint.path}: an orig_2d_bias edge embedder (a dense pair representation attended in every block) "
            "has no factorised form an export could hold; use it through ipa_export.flash_ipa instead"
        )
    inferred, malformed = implied_config(shapes, {**stated, **overrides}, name=checkpoint_name)
    if malformed:
        raise ConfigCompatibilityError(malformed, context=f"checkpoint {checkpoint.path}")
    if inferred["mode"] == "flash_no_bias" and checkpoint.flash_ipa_layout:  # flash_ipa's unused edge MLP still has c_p
        inferred["c_p"] = checkpoint.state_dict[flash_ipa_keys.MLP + "0.weight"].shape[0]
    problems = []
    for source, values in (("checkpoint config", stated), ("override", overrides)):
        for field, value in values.items():
            if field in inferred and inferred[field] != value:
                problems.append(f"{field}: {source} says {value!r}, the tensor shapes say {inferred[field]!r}")
    if problems:
        raise ConfigCompatibilityError(problems, context=f"checkpoint {checkpoint.path}")
    values = {"frame_update_clip": "reference", **stated, **overrides, **inferred}
    config = EncoderConfig.from_dict(values, require_all=False)
    expected = {k: tuple(v) for k, v in expected_tensors(IPAEncoder, config).items()}
    mismatched = sorted(k for k in expected.keys() | shapes.keys() if expected.get(k) != shapes.get(k))
    if mismatched:
        raise ConfigCompatibilityError(
            [
                f"tensor {checkpoint_name(k)}: checkpoint {shapes.get(k, 'has none')}, "
                f"inferred config needs {expected.get(k, 'none')}"
                for k in mismatched
            ],
            context=f"checkpoint {checkpoint.path}",
        )
    return config


def convert(
    checkpoint_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overrides: Mapping[str, Any] | None = None,
    residue_embedding_seed: int | None = None,
    overwrite: bool = False,
    note: str | None = None,
    license: str = "apache-2.0",
) -> dict[str, Any]:
    """Convert ``checkpoint_path`` into an export at ``out`` (atomically); returns the provenance
    written into the model card. ``residue_embedding_seed`` adds a randomly initialised
    21-type residue embedding table (untrained; for demos and tests)."""
    checkpoint = read_checkpoint(checkpoint_path)
    config = infer_config(checkpoint, overrides)
    if residue_embedding_seed is not None and config.num_residue_types:
        raise InputError(
            f"residue_embedding_seed: the source already holds a residue-type table ({RESIDUE_TABLE}, "
            f"{config.num_residue_types} types), which the export keeps; leave the seed out"
        )
    if residue_embedding_seed is not None:
        config = config.replace(num_residue_types=21)
    encoder = IPAEncoder(config)
    weights = checkpoint.encoder_state_dict()
    if residue_embedding_seed is not None:
        generator = torch.Generator().manual_seed(residue_embedding_seed)
        weights["residue_embedding.weight"] = torch.randn(21, config.c_s, generator=generator)
    encoder.load_state_dict(weights, strict=True)
    provenance: dict[str, Any] = {
        "source checkpoint": checkpoint.path.name,
        "source sha256": checkpoint.sha256,
        "converted": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if note:
        provenance["note"] = note
    protect = [checkpoint.path / n for n in (CONFIG_NAME, WEIGHTS_NAME)] if checkpoint.export else [checkpoint.path]
    with writing_export(out, overwrite=overwrite, protect=protect) as tmp:
        write_export(encoder, tmp, provenance=provenance, license=license)
        difference = parity_check(checkpoint, tmp)
        if not difference <= PARITY_ATOL:  # inf (non-finite outputs) fails too
            raise CheckFailedError(
                "conversion parity failed: "
                + (
                    f"the export differs from the source modules by {difference:.3g}"
                    if math.isfinite(difference)
                    else "the outputs are not finite (NaN or inf) on a random protein; check the weights and config"
                )
            )
        provenance["parity"] = (
            f"max |export - source| = {difference:.3g} over s, frames and edge factors "
            f"(random protein, N = {parity_length(config)}, seed 0; tolerance {PARITY_ATOL:g})"
        )
        write_model_card(tmp, provenance=provenance, license=license)
    return provenance


def parity_length(config: EncoderConfig) -> int:
    """The parity check's protein length: PARITY_LENGTH, or max_len if that is shorter."""
    return min(PARITY_LENGTH, config.max_len or PARITY_LENGTH)


def parity_check(checkpoint: Checkpoint, export_dir: Path) -> float:
    """Max abs difference (inf where an output is not finite) between the reloaded export and
    the source modules (an edge embedder and a FlashIPA stack loaded from the checkpoint's own
    keys, composed as BINDRAE does) on a random protein, and between their residue-type tables."""
    encoder = IPAEncoder.from_pretrained(export_dir, attention="dense")
    edge, stack = _source_modules(checkpoint, encoder.config)
    length = parity_length(encoder.config)
    g = torch.Generator().manual_seed(0)
    node_embed = torch.randn(1, length, encoder.config.c_s, generator=g)
    coords = torch.cumsum(3.8 * torch.nn.functional.normalize(torch.randn(1, length, 3, generator=g), dim=-1), dim=1)
    mask = torch.ones(1, length, dtype=torch.bool)
    with torch.no_grad():
        out = encoder(node_embed, coords, mask)
        z_f1, z_f2 = edge(node_embed, coords, mask)
        rigid = Frames(identity_rotations(mask.shape), coords)
        s, (rotations, translations) = stack(node_embed, rigid, z_f1, z_f2, mask, "dense")
    pairs = [
        (out.s, s),
        (out.rotations, rotations),
        (out.translations, translations),
        (out.z_f1, z_f1),
        (out.z_f2, z_f2),
    ]
    table = checkpoint.encoder_state_dict().get(RESIDUE_TABLE)
    if table is not None:
        pairs.append((encoder.residue_embedding.weight, table))
    pairs = [(a, b) for a, b in pairs if a.numel()]  # no factors without pair bias
    if not all(bool(torch.isfinite(a).all() and torch.isfinite(b).all()) for a, b in pairs):
        return math.inf
    return max((a - b).abs().max().item() for a, b in pairs)


EdgeFactors = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _source_modules(checkpoint: Checkpoint, config: EncoderConfig) -> tuple[EdgeFactors, FlashIPAStack]:
    """The checkpoint's edge embedder (as node_embed, coords, mask -> z_f1, z_f2) and FlashIPA
    stack, in eval mode, loaded strictly from its own keys: BINDRAE's adapter layout, or
    flash_ipa's EdgeEmbedder (:mod:`ipa_export.flash_ipa`) for a flash_ipa checkpoint (this
    package's with RBF distance features, which flash_ipa has not); an export's own encoder,
    built from its stored config."""
    if checkpoint.export:
        source = IPAEncoder(EncoderConfig.from_dict(checkpoint.config).replace(attention="dense")).eval()
        source.load_state_dict(checkpoint.state_dict, strict=True)
        return source.edge_embedder, source.ipa_stack
    stack = FlashIPAStack(config).eval()
    state = checkpoint.state_dict
    if not checkpoint.flash_ipa_layout:
        parts = stage1_modules(state)
        edge = EdgeEmbedder(config).eval()
        edge.load_state_dict({k.removeprefix(ADAPTER_EDGE): v for k, v in parts[STAGE1_EDGE].items()}, strict=True)
        stack.load_state_dict(parts[STAGE1_IPA], strict=True)
        return edge, stack
    stack_prefix = next(p for p in flash_ipa_keys.STACK_PREFIXES if any(k.startswith(p) for k in state))
    stack.load_state_dict({k.removeprefix(stack_prefix): v for k, v in state.items() if k.startswith(stack_prefix)})
    edge_state = {k.removeprefix(flash_ipa_keys.EDGE): v for k, v in state.items() if k.startswith(flash_ipa_keys.EDGE)}
    if config.distance_features == "rbf":  # flash_ipa has no RBF features; this package's embedder has its keys
        edge = EdgeEmbedder(config).eval()
        edge.load_state_dict(edge_state, strict=True)
        return edge, stack
    if config.mode == "flash_no_bias":  # flash_ipa's unused edge MLP is not part of the encoder
        flash_ipa_edge = None
    else:
        flash_ipa_edge = FlashIPAEdgeEmbedder(flash_ipa_edge_config(config)).eval()
        flash_ipa_edge.load_state_dict(edge_state)

    def edge_factors(node_embed: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor):  # type: ignore[no-untyped-def]
        if flash_ipa_edge is None:
            empty = node_embed.new_zeros(*mask.shape, 0, config.c_p)
            return empty, empty
        _, z_f1, z_f2, _ = flash_ipa_edge(node_embed, coords, coords, mask)
        return z_f1, z_f2

    return edge_factors, stack
