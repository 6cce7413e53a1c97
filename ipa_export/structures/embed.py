"""Embed protein structures with an export: backbone frames from N, CA, C; outputs to safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..errors import InputError
from ..export.files import atomic_file
from ..model import frames
from ..model.encoder import IPAEncoder
from .reader import Backbone, read_backbone


@dataclass(frozen=True)
class EmbedResult:
    name: str
    length: int
    mean_norm: float  #: mean L2 norm of the residues' ``s``
    path: Path


def embed_structures(
    export: str | os.PathLike,
    structures: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    node_embed_path: str | os.PathLike | None = None,
    chain: str | None = None,
) -> list[EmbedResult]:
    """Embed each structure (one padded batch) and write ``<out>/<name>.safetensors`` holding
    ``s`` [L, c_s], ``rotations`` [L, 3, 3], ``translations`` [L, 3] (Angstrom), ``z_f1`` and
    ``z_f2`` [L, R, c_p] and ``aatype`` [L]; metadata names the structure, sequence and residues.

    Node embeddings come from ``node_embed_path`` ([L, c_s]; one structure only) or else from
    the export's residue-type embedding table."""
    if node_embed_path is not None and len(structures) != 1:
        raise InputError(f"--node-embed: gives embeddings for one structure, got {len(structures)} structures")
    names = [_stem(Path(p)) for p in structures]
    if len(set(names)) != len(names):
        raise InputError(f"structures: output names must be unique, got {names}")
    encoder = IPAEncoder.from_pretrained(export)
    backbones = [read_backbone(p, chain) for p in structures]
    if node_embed_path is not None:
        node_embeds = [load_node_embed(node_embed_path, backbones[0].ca.shape[0], encoder.config.c_s)]
    elif encoder.config.num_residue_types:
        node_embeds = [encoder.embed_residues(b.aatype) for b in backbones]
    else:
        raise InputError(
            "--node-embed: required, because this export has no residue-type embedding table "
            "(config.num_residue_types is 0); pass per-residue embeddings [N, c_s], e.g. ESM-2 + adapter outputs"
        )
    outputs = _run(encoder, backbones, node_embeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, backbone, tensors in zip(names, backbones, outputs, strict=True):
        metadata = {
            "structure": name,
            "chain": backbone.name,
            "sequence": backbone.sequence,
            "residue_ids": json.dumps(backbone.residue_ids),
            "export": str(export),
            "ipa_export_version": __version__,
        }
        path = out / f"{name}.safetensors"
        _atomic_save(tensors | {"aatype": backbone.aatype}, path, metadata)
        results.append(EmbedResult(name, len(backbone.sequence), tensors["s"].norm(dim=-1).mean().item(), path))
    return results


def load_node_embed(path: str | os.PathLike, length: int, c_s: int) -> torch.Tensor:
    """[length, c_s] embeddings from a .safetensors file (its only tensor, or ``node_embed``)
    or a .pt file holding a tensor (read with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--node-embed: {path}: no such file")
    if path.suffix == ".safetensors":
        tensors = load_file(path)
        tensor = tensors.get("node_embed", next(iter(tensors.values())) if len(tensors) == 1 else None)
        if tensor is None:
            raise InputError(
                f"--node-embed: {path} holds {sorted(tensors)}; expected one tensor or one named 'node_embed'"
            )
    else:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"--node-embed: {path} holds a {type(tensor).__name__}, expected a tensor [N, c_s]")
    if tuple(tensor.shape) != (length, c_s) or not tensor.is_floating_point():
        raise InputError(
            f"--node-embed: expected a float tensor of shape [N={length}, c_s={c_s}], "
            f"got {tensor.dtype} {list(tensor.shape)}"
        )
    return tensor.float()


def _run(
    encoder: IPAEncoder, backbones: list[Backbone], node_embeds: list[torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """One padded batch through the encoder; per-structure outputs cut to their lengths."""
    lengths = [b.ca.shape[0] for b in backbones]
    batch, n = len(backbones), max(lengths)
    node_embed = torch.zeros(batch, n, encoder.config.c_s)
    ca = torch.zeros(batch, n, 3)
    rotations = torch.eye(3).repeat(batch, n, 1, 1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for i, (backbone, embed) in enumerate(zip(backbones, node_embeds, strict=True)):
        length = lengths[i]
        node_embed[i, :length], mask[i, :length] = embed, True
        rotations[i, :length], ca[i, :length] = frames.from_backbone(backbone.n, backbone.ca, backbone.c)
    with torch.no_grad():
        out = encoder(node_embed, ca, mask, rotations=rotations)
    return [{k: v[i, :length].contiguous() for k, v in out._asdict().items()} for i, length in enumerate(lengths)]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".pdb", ".cif", ".mmcif", ".ent"):
        name = name.removesuffix(suffix)
    return name
