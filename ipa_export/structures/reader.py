"""Read protein backbones (N, CA, C) from PDB / mmCIF files, optionally gzipped.

Parsing is done by gemmi, an optional dependency (``pip install 'ipa-export[structure]'``),
imported only when a file is read. Coordinates are returned in Angstrom as float32 tensors.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, MissingDependencyError

__all__ = ["RESIDUE_TYPES", "Backbone", "read_backbone"]

log = logging.getLogger(__name__)

RESIDUE_TYPES: str = "ARNDCQEGHILKMFPSTWYV"  # index 0..19; 20 = unknown ("X")
_BACKBONE = ("N", "CA", "C")
# Protonation-state names written by MD force fields (CHARMM, AMBER); gemmi does not tabulate them.
_FORCE_FIELD_NAMES = {
    "HSD": "H", "HSE": "H", "HSP": "H", "HID": "H", "HIE": "H", "HIP": "H",
    "CYX": "C", "CYM": "C", "ASH": "D", "GLH": "E", "LYN": "K",
}  # fmt: skip


@dataclass(frozen=True)
class Backbone:
    """Backbone atoms of one protein chain, in Angstrom.

    ``aatype`` is [L] int64 (index into :data:`RESIDUE_TYPES`, 20 = unknown);
    ``n``, ``ca``, ``c`` are [L, 3] float32 coordinates of the N, CA and C atoms.
    """

    name: str  # file stem + chain, e.g. "1ahsA:A"
    sequence: str  # one-letter codes, "X" for unknown residue types
    residue_ids: tuple[str, ...]  # "<chain>:<seqnum><icode>", e.g. "A:42", "A:42A"
    aatype: torch.Tensor  # [L] int64 in 0..20
    n: torch.Tensor  # [L, 3] float32
    ca: torch.Tensor  # [L, 3] float32
    c: torch.Tensor  # [L, 3] float32


def _one_letter(gemmi: Any, name: str) -> str:
    """One-letter code of a residue name, its parent's for modified residues, else "X"."""
    code = gemmi.find_tabulated_residue(name).one_letter_code.upper()
    code = _FORCE_FIELD_NAMES.get(name, code)
    return code if code in RESIDUE_TYPES else "X"


def _is_amino_acid(gemmi: Any, res: Any) -> bool:
    """Tabulated amino acid, or an untabulated residue (e.g. HSD) that has N, CA and C."""
    info = gemmi.find_tabulated_residue(res.name)
    if info.found():
        return bool(info.is_amino_acid())
    return not res.is_water() and all(res.find_atom(a, "*") for a in _BACKBONE)


def _conformer(group: list[Any]) -> tuple[Any, str]:
    """Pick (residue, altloc) with the highest mean heavy-atom occupancy; first wins ties."""
    best: tuple[float, Any, str] | None = None
    for res in group:
        occ: dict[str, list[float]] = {}
        for atom in res:
            if not atom.is_hydrogen():
                occ.setdefault(atom.altloc, []).append(atom.occ)
        for alt in [a for a in occ if a != "\0"] or ["\0"]:
            values = occ.get(alt) or [0.0]
            score = sum(values) / len(values)
            if best is None or score > best[0]:
                best = (score, res, alt)
    assert best is not None
    return best[1], best[2]


def _chain_residues(gemmi: Any, chain: Any) -> tuple[list[tuple[str, str, list[Any]]], list[str]]:
    """(residue id, one-letter code, [N, CA, C] atoms) per kept residue, and skipped residue ids."""
    groups: dict[str, list[Any]] = {}
    for res in chain:
        if _is_amino_acid(gemmi, res):
            groups.setdefault(f"{chain.name}:{res.seqid.num}{res.seqid.icode.strip()}", []).append(res)
    kept, skipped = [], []
    for rid, group in groups.items():
        res, alt = _conformer(group)
        atoms = [res.find_atom(a, alt) for a in _BACKBONE]
        if all(atoms):
            kept.append((rid, _one_letter(gemmi, res.name), atoms))
        else:
            missing = ",".join(a for a, atom in zip(_BACKBONE, atoms, strict=True) if not atom)
            skipped.append(f"{rid}({res.name} lacks {missing})")
    return kept, skipped


def read_backbone(path: str | os.PathLike, chain: str | None = None) -> Backbone:
    """Read the N, CA, C atoms (Angstrom) of one protein chain from the first model of a file.

    ``path`` is a PDB or mmCIF file, optionally gzipped. ``chain=None`` takes the first chain
    with an amino-acid residue that has N, CA and C. Waters, ligands and hydrogens are ignored;
    alternate locations resolve to the highest-occupancy conformer; residues lacking N, CA or C
    are skipped with a logged warning. Raises FileNotFoundError, or ValueError for an unreadable
    file, a file without protein chains, or an unknown ``chain``.
    """
    try:
        import gemmi
    except ImportError as err:
        raise MissingDependencyError("reading structures needs gemmi: pip install 'ipa-export[structure]'") from err

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such structure file: {path}")
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as err:  # gemmi raises RuntimeError/ValueError for malformed input
        raise InputError(f"cannot parse structure file {path}: {err}") from err
    if len(structure) == 0:
        raise InputError(f"no models in structure file {path}")
    structure.merge_chain_parts()

    chains: dict[str, tuple[list[tuple[str, str, list[Any]]], list[str]]] = {}
    for ch in structure[0]:
        kept, skipped = _chain_residues(gemmi, ch)
        if kept and ch.name not in chains:
            chains[ch.name] = (kept, skipped)
    if not chains:
        raise InputError(f"no amino-acid chain with N, CA and C atoms in {path}")
    if chain is None:
        chain = next(iter(chains))
    elif chain not in chains:
        raise InputError(f"chain {chain!r} not found in {path}; available chains: {sorted(chains)}")
    kept, skipped = chains[chain]
    if skipped:
        log.warning("%s: skipped %d residue(s) missing backbone atoms: %s", path, len(skipped), "; ".join(skipped))

    stem = path.name.removesuffix(".gz").rsplit(".", 1)[0]
    sequence = "".join(code for _, code, _ in kept)
    xyz = torch.tensor([[a.pos.tolist() for a in atoms] for _, _, atoms in kept], dtype=torch.float32)
    return Backbone(
        name=f"{stem}:{chain}",
        sequence=sequence,
        residue_ids=tuple(rid for rid, _, _ in kept),
        aatype=torch.tensor([RESIDUE_TYPES.find(s) if s != "X" else 20 for s in sequence], dtype=torch.int64),
        n=xyz[:, 0].contiguous(),
        ca=xyz[:, 1].contiguous(),
        c=xyz[:, 2].contiguous(),
    )
