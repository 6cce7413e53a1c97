"""Convert a BINDRAE Stage-1 training checkpoint into a frozen export.

The checkpoint is read with ``torch.load(..., weights_only=True)`` only. The config is
inferred from tensor shapes, cross-checked against the checkpoint's own config dict and
the caller's overrides; any disagreement is an error, never a guess. After writing, the
export is reloaded and compared with the source modules on a random protein.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigCompatibilityError, EncoderConfig
from ..export.format import expected_tensors, write_export, write_model_card, writing_export
from ..model.edge_embedder import EdgeEmbedder
from ..model.encoder import IPAEncoder
from ..model.frames import Frames, identity_rotations
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
    """The two modules' tensors (BINDRAE keys) and the checkpoint's own config dict."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    sha256: str
    path: Path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a Stage-1 checkpoint (``model_state_dict`` + ``config``) or a bare state dict
    with ``edge_embedder.`` and ``ipa_module.`` keys. Refuses anything needing unpickling."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused: this checkpoint needs arbitrary unpickling, which can run code "
            f"(torch.load(weights_only=True) failed: {str(error).splitlines()[0]}). Re-save its state dict as "
            "plain tensors, e.g. torch.save({'model_state_dict': model.state_dict()}, path)"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({error})") from error
    state, config = (data.get(STATE_DICT_KEY), data.get(CONFIG_KEY) or {}) if isinstance(data, dict) else (None, {})
    if state is None and isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        state = data
    if not isinstance(state, dict) or not isinstance(config, dict):
        raise ValueError(
            f"{path}: expected a dict with 'model_state_dict' (and optionally 'config'), or a bare state dict"
        )
    modules = {k: v for k, v in state.items() if k.startswith((STAGE1_EDGE, STAGE1_IPA))}
    if not modules:
        raise ValueError(f"{path}: no '{STAGE1_EDGE}*' or '{STAGE1_IPA}*' tensors in the state dict")
    return Checkpoint(modules, config, hashlib.sha256(path.read_bytes()).hexdigest(), path)


def infer_config(checkpoint: Checkpoint, overrides: Mapping[str, Any] | None = None) -> EncoderConfig:
    """Infer the encoder config from tensor shapes; the checkpoint's config and ``overrides``
    must agree with the shapes. Converted BINDRAE models use the reference frame-update clip."""
    shapes = {k: tuple(v.shape) for k, v in checkpoint_to_encoder(checkpoint.state_dict).items()}
    overrides = dict(overrides or {})

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"{checkpoint.path}: missing tensor {checkpoint_name(key)!r}; cannot infer the config")
        return shapes[key]

    ipa = "ipa_stack.ipa_blocks.0.ipa."
    s_p_out, c_s = shape("edge_embedder.linear_s_p.weight")
    feat_dim = shape("edge_embedder.linear_relpos.weight")[1]
    rank = s_p_out // (2 * feat_dim)
    t_out, t_in = shape("edge_embedder.linear_t_distogram.weight")
    num_bins = t_out // (2 * rank)
    heads_c, _ = shape(ipa + "linear_q.weight")
    heads = shape(ipa + "linear_b.weight")[0]
    qk_points = shape(ipa + "linear_q_points.weight")[0] // (3 * heads)
    inferred = {
        "c_s": c_s,
        "c_p": shape("edge_embedder.edge_embedder.0.weight")[0],
        "z_factor_rank": rank,
        "feat_dim": feat_dim,
        "num_bins": num_bins,
        "knn_k": t_in // (num_bins + feat_dim),
        "no_heads": heads,
        "c_hidden": heads_c // heads,
        "no_qk_points": qk_points,
        "no_v_points": shape(ipa + "linear_kv_points.weight")[0] // (3 * heads) - qk_points,
        "depth": len({m.group(1) for k in shapes if (m := re.match(r"ipa_stack\.ipa_blocks\.(\d+)\.", k))}),
    }
    problems = []
    stated = {CHECKPOINT_CONFIG_FIELDS[k]: v for k, v in checkpoint.config.items() if k in CHECKPOINT_CONFIG_FIELDS}
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
                f"tensor {checkpoint_name(k)}: checkpoint {shapes.get(k)}, inferred config needs {expected.get(k)}"
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
    if residue_embedding_seed is not None:
        config = config.replace(num_residue_types=21)
    encoder = IPAEncoder(config)
    weights = checkpoint_to_encoder(checkpoint.state_dict)
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
    with writing_export(out, overwrite=overwrite, protect=[checkpoint.path]) as tmp:
        write_export(encoder, tmp, provenance=provenance, license=license)
        difference = parity_check(checkpoint.state_dict, tmp)
        if difference > PARITY_ATOL:
            raise RuntimeError(
                f"conversion parity failed: the export differs from the source modules by {difference:.3g}"
            )
        provenance["parity"] = (
            f"max |export - source| = {difference:.3g} over s, frames and edge factors "
            f"(random protein, N = {PARITY_LENGTH}, seed 0; tolerance {PARITY_ATOL:g})"
        )
        write_model_card(tmp, provenance=provenance, license=license)
    return provenance


def parity_check(state_dict: Mapping[str, torch.Tensor], export_dir: Path) -> float:
    """Max abs difference between the reloaded export and the source modules (an EdgeEmbedder
    and a FlashIPA stack loaded from the checkpoint's own Stage-1 keys, composed as BINDRAE
    does) on a random protein."""
    encoder = IPAEncoder.from_pretrained(export_dir, attention="dense")
    parts = stage1_modules(state_dict)
    edge, stack = EdgeEmbedder(encoder.config), FlashIPAStack(encoder.config)
    edge.load_state_dict({k.removeprefix(ADAPTER_EDGE): v for k, v in parts[STAGE1_EDGE].items()}, strict=True)
    stack.load_state_dict(parts[STAGE1_IPA], strict=True)
    g = torch.Generator().manual_seed(0)
    node_embed = torch.randn(1, PARITY_LENGTH, encoder.config.c_s, generator=g)
    coords = torch.cumsum(
        3.8 * torch.nn.functional.normalize(torch.randn(1, PARITY_LENGTH, 3, generator=g), dim=-1), dim=1
    )
    mask = torch.ones(1, PARITY_LENGTH, dtype=torch.bool)
    with torch.no_grad():
        out = encoder(node_embed, coords, mask)
        z_f1, z_f2 = edge.eval()(node_embed, coords, mask)
        rigid = Frames(identity_rotations(mask.shape), coords)
        s, (rotations, translations) = stack.eval()(node_embed, rigid, z_f1, z_f2, mask, "dense")
    pairs = [
        (out.s, s),
        (out.rotations, rotations),
        (out.translations, translations),
        (out.z_f1, z_f1),
        (out.z_f2, z_f2),
    ]
    return max((a - b).abs().max().item() for a, b in pairs)
