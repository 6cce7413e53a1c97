"""Read protein backbones (N, CA, C) from PDB / mmCIF files, optionally gzipped.

Parsing is done by gemmi, an optional dependency (``pip install 'ipa-export[structure]'``),
imported only when a file is read. Coordinates are returned in Angstrom as float32 tensors.

Every residue with N, CA and C is kept, in file order: residues are never merged by number, so a
chain whose numbering restarts, wraps or repeats is read whole (with a logged warning). The
encoder's ``residue_index`` (:func:`encoder_residue_index`) increases strictly along a chain.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, MissingDependencyError
from .options import DEFAULT_MAX_STRUCTURE_BYTES

__all__ = [
    "STRUCTURE_FORMATS",
    "DEFAULT_MAX_STRUCTURE_BYTES",
    "RESIDUE_TYPES",
    "Backbone",
    "ChainFailure",
    "StructureChains",
    "encoder_residue_index",
    "read_backbone",
    "read_chains",
    "structure_stem",
]

log = logging.getLogger(__name__)

#: structure file suffixes (each optionally followed by ``.gz``) -> gemmi's coordinate format
STRUCTURE_FORMATS = {".pdb": "Pdb", ".ent": "Pdb", ".cif": "Mmcif", ".mmcif": "Mmcif"}

RESIDUE_TYPES: str = "ARNDCQEGHILKMFPSTWYV"  # index 0..19; 20 = unknown ("X")
#: Largest structure text read (bytes, after gzip decompression): a bigger file is refused
#: unparsed, so a small .gz cannot expand into gigabytes of memory.
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
    ``residue_numbers`` [L] int64 and ``chain_ids`` are the file's own numbering per residue;
    ``n``, ``ca``, ``c`` are [L, 3] float32 coordinates of the N, CA and C atoms.
    """

    name: str  # file stem + chain, e.g. "1ahsA:A"
    chain: str  # chain id as written in the file ("" when the file has none)
    sequence: str  # one-letter codes, "X" for unknown residue types
    residue_ids: tuple[str, ...]  # "<chain>:<seqnum><icode>", e.g. "A:42", "A:42A"
    residue_numbers: torch.Tensor  # [L] int64 author residue numbers as written (insertion codes dropped)
    chain_ids: tuple[str, ...]  # [L] chain id of each residue
    aatype: torch.Tensor  # [L] int64 in 0..20
    n: torch.Tensor  # [L, 3] float32
    ca: torch.Tensor  # [L, 3] float32
    c: torch.Tensor  # [L, 3] float32

    @property
    def residue_index(self) -> torch.Tensor:
        """[L] int64 positions for the encoder: :func:`encoder_residue_index` of the numbers."""
        return encoder_residue_index(self.residue_numbers)


def encoder_residue_index(numbers: torch.Tensor) -> torch.Tensor:
    """[L] int64 residue numbers in file order -> [L] strictly increasing positions: the first
    number, then one step per residue, or the file's gap when the number grows by more than one
    (an insertion code, a repeated, restarted or wrapped number continues at previous + 1)."""
    steps = (numbers[1:] - numbers[:-1]).clamp(min=1)
    return torch.cat([numbers[:1], numbers[:1] + steps.cumsum(0)])


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


def _has_altlocs(res: Any) -> bool:
    return any(atom.altloc != "\0" for atom in res)


def _chain_residues(gemmi: Any, chain: Any) -> tuple[list[tuple[str, int, str, list[Any]]], list[str]]:
    """(residue id, residue number, one-letter code, [N, CA, C] atoms) per kept residue, in
    file order, and skipped residue ids. Consecutive residues with one number are alternative
    conformers (microheterogeneity) only when they have alternate locations; else both are kept."""
    groups: list[list[Any]] = []
    for res in chain:
        if not _is_amino_acid(gemmi, res):
            continue
        previous = groups[-1][-1] if groups else None
        if previous is not None and previous.seqid == res.seqid and _has_altlocs(previous) and _has_altlocs(res):
            groups[-1].append(res)
        else:
            groups.append([res])
    kept, skipped = [], []
    for group in groups:
        res, alt = _conformer(group)
        rid = f"{chain.name}:{res.seqid.num}{res.seqid.icode.strip()}"
        atoms = [res.find_atom(a, alt) for a in _BACKBONE]
        if all(atoms):
            kept.append((rid, res.seqid.num, _one_letter(gemmi, res.name), atoms))
        else:
            missing = ",".join(a for a, atom in zip(_BACKBONE, atoms, strict=True) if not atom)
            skipped.append(f"{rid}({res.name} lacks {missing})")
    return kept, skipped


def _merged_residues(structure: Any) -> list[str]:
    """Residues of the first model holding one backbone atom twice (same name and altloc):
    gemmi merges the atoms of residues that share chain, number, insertion code and name."""
    merged = []
    for chain in structure[0]:
        for res in chain:
            names = [(atom.name, atom.altloc) for atom in res if atom.name in _BACKBONE]
            if len(names) != len(set(names)):
                merged.append(f"{chain.name}:{res.seqid.num}{res.seqid.icode.strip()}")
    return merged


def _separate_repeats(data: bytes) -> bytes:
    """PDB text in which every residue that repeats an earlier (chain, number, insertion code,
    name, segment) of its chain part is given its own segment id (columns 73-76), so that gemmi
    keeps it as a residue of its own. A residue begins where those fields change from the line
    before, or where an atom name and altloc repeat."""
    lines = data.split(b"\n")
    seen: dict[bytes, int] = {}
    chain, key, atoms, tag = None, None, set(), b""
    for i, line in enumerate(lines):
        if line.startswith((b"MODEL", b"ENDMDL")):
            seen, chain, key = {}, None, None
        if not line.startswith((b"ATOM  ", b"HETATM")):
            continue
        if line[20:22] != chain:  # a new chain part: gemmi's residue lookup starts afresh
            seen, chain = {}, line[20:22]
        this, atom = line[17:27] + line[72:76], line[12:17]
        if this != key or atom in atoms:
            key, atoms = this, set()
            count = seen[this] = seen.get(this, -1) + 1
            tag = b"~%03x" % (count % 4096) if count else b""
        atoms.add(atom)
        if tag:
            lines[i] = line[:72].ljust(72) + tag + line[76:]
    return b"\n".join(lines)


def _structure_bytes(path: Path, max_bytes: int) -> bytes:
    """The file's text, gunzipped if it is gzip (streamed; at most ``max_bytes`` are read)."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        try:
            data = (gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw).read(max_bytes + 1)
        except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            raise InputError(f"{path}: not a valid gzip file ({err})") from err
    if len(data) > max_bytes:
        raise InputError(
            f"{path}: more than {max_bytes:,} bytes of structure text{' once decompressed' if compressed else ''} "
            "(the cap on one structure); raise it with --max-structure-bytes (embed_corpus: max_structure_bytes)"
        )
    return data


@dataclass(frozen=True)
class ChainFailure:
    """A protein chain that cannot be embedded, and why."""

    chain: str
    reason: str


@dataclass(frozen=True)
class StructureChains:
    """The protein chains of one file: those read, and those with amino acids but no usable backbone."""

    backbones: list[Backbone]
    failures: list[ChainFailure]


def structure_stem(path: str | os.PathLike) -> str:
    """File name without ``.gz`` and the format suffix: ``data/1abc.cif.gz`` -> ``1abc``."""
    name = Path(path).name.removesuffix(".gz")
    for suffix in STRUCTURE_FORMATS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _coor_format(gemmi: Any, path: Path) -> Any:
    """gemmi's format for ``path`` by its name (as ``gemmi.read_structure(path)`` decides), so a
    file's first bytes never switch the parser; an unknown suffix lets gemmi look at the content."""
    name = path.name.lower().removesuffix(".gz")
    found = next((fmt for suffix, fmt in STRUCTURE_FORMATS.items() if name.endswith(suffix)), "Unknown")
    return getattr(gemmi.CoorFormat, found)


def read_chains(
    path: str | os.PathLike, chain: str | None = None, *, max_bytes: int = DEFAULT_MAX_STRUCTURE_BYTES
) -> StructureChains:
    """Read the N, CA, C atoms (Angstrom) of every protein chain (or only ``chain``) from the
    first model of a PDB or mmCIF file, optionally gzipped, in file order.

    Waters, ligands and hydrogens are ignored; alternate locations resolve to the
    highest-occupancy conformer; residues lacking N, CA or C are skipped with a logged warning;
    every other residue is kept in file order, also where numbers repeat (logged); a chain with
    amino acids but no residue holding all three is a :class:`ChainFailure`, and so is an mmCIF
    chain whose residues repeat a number and name (gemmi merges them). Raises
    FileNotFoundError, or ValueError (naming the file) for an empty or unparsable file, a file
    that is not PDB/mmCIF, one past ``max_bytes`` of text (after decompression), a file
    without protein chains, or an unknown ``chain``.
    """
    try:
        import gemmi
    except ImportError as err:
        raise MissingDependencyError("reading structures needs gemmi: pip install 'ipa-export[structure]'") from err

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a structure file (.pdb, .cif, optionally .gz)")
    if not path.is_file():
        raise FileNotFoundError(f"no such structure file: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, expected a PDB or mmCIF structure")
    data = _structure_bytes(path, max_bytes)
    try:
        structure = gemmi.read_structure_string(data, format=_coor_format(gemmi, path))
        if (merged := _merged_residues(structure)) and structure.input_format == gemmi.CoorFormat.Pdb:
            structure = gemmi.read_structure_string(_separate_repeats(data), format=gemmi.CoorFormat.Pdb)
            merged = _merged_residues(structure)
    except Exception as err:  # gemmi raises RuntimeError/ValueError for malformed input
        raise InputError(f"cannot parse structure file {path}: {err}") from err
    del data
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise InputError(
            f"{path}: not a PDB/mmCIF file (no ATOM/HETATM records found); "
            "expected a .pdb or .cif structure, optionally gzipped"
        )
    structure.merge_chain_parts()

    read: dict[str, Backbone | ChainFailure] = {}
    stem = structure_stem(path)
    for ch in structure[0]:
        if ch.name in read or (chain is not None and ch.name != chain):
            continue
        repeats = [rid for rid in merged if rid.split(":", 1)[0] == ch.name]
        if repeats:
            read[ch.name] = ChainFailure(
                ch.name,
                f"chain {ch.name!r}: residues {', '.join(repeats[:5])} repeat a number and name in this mmCIF "
                "file and cannot be told apart; renumber them (e.g. gemmi convert via PDB) or drop the copies",
            )
            continue
        kept, skipped = _chain_residues(gemmi, ch)
        _warn_repeated_numbering(path, ch.name, kept)
        if kept:
            if skipped:
                log.warning(
                    "%s: skipped %d residue(s) missing backbone atoms: %s", path, len(skipped), "; ".join(skipped)
                )
            read[ch.name] = _backbone(f"{stem}:{ch.name}", ch.name, kept)
        elif skipped:
            read[ch.name] = ChainFailure(ch.name, f"chain {ch.name!r}: no residue with all of N, CA and C atoms")
    if chain is not None and chain not in read:
        available = sorted(c.name for c in structure[0] if _chain_residues(gemmi, c)[0])
        raise InputError(f"chain {chain!r} not found in {path}; available chains: {available}")
    if not read:
        raise InputError(f"no amino-acid chain with N, CA and C atoms in {path}")
    return StructureChains(
        backbones=[b for b in read.values() if isinstance(b, Backbone)],
        failures=[f for f in read.values() if isinstance(f, ChainFailure)],
    )


def _warn_repeated_numbering(path: Path, chain: str, kept: list[tuple[str, int, str, list[Any]]]) -> None:
    """Log where residue (number, insertion code) stops increasing along a chain."""
    keys = [(num, rid.rsplit(":", 1)[1].lstrip("-0123456789")) for rid, num, _, _ in kept]
    at = [i for i in range(1, len(keys)) if keys[i] <= keys[i - 1]]
    if at:
        i = at[0]
        log.warning(
            "%s: chain %r: residue numbering repeats or decreases %d time(s) (first %s after %s); every residue "
            "is kept in file order, and residue_index continues at the previous + 1 there",
            path, chain, len(at), kept[i][0], kept[i - 1][0],
        )  # fmt: skip


def read_backbone(path: str | os.PathLike, chain: str | None = None) -> Backbone:
    """Read one protein chain (``chain=None``: the first with N, CA and C atoms); see :func:`read_chains`."""
    chains = read_chains(path, chain)
    if not chains.backbones:
        raise InputError(f"{path}: {chains.failures[0].reason}")
    return chains.backbones[0]


def _backbone(name: str, chain: str, kept: list[tuple[str, int, str, list[Any]]]) -> Backbone:
    sequence = "".join(code for _, _, code, _ in kept)
    xyz = torch.tensor([[a.pos.tolist() for a in atoms] for *_, atoms in kept], dtype=torch.float32)
    return Backbone(
        name=name,
        chain=chain,
        sequence=sequence,
        residue_ids=tuple(rid for rid, *_ in kept),
        residue_numbers=torch.tensor([num for _, num, _, _ in kept], dtype=torch.int64),
        chain_ids=(chain,) * len(kept),
        aatype=torch.tensor([RESIDUE_TYPES.find(s) if s != "X" else 20 for s in sequence], dtype=torch.int64),
        n=xyz[:, 0].contiguous(),
        ca=xyz[:, 1].contiguous(),
        c=xyz[:, 2].contiguous(),
    )
