"""Tests for ipa_export.structures.reader against real PDB files in tests/data/structures.

Expected values come from the files themselves (plain-text scans of ATOM records), from
known facts about the proteins, or from textbook backbone geometry, never from the reader.
"""

from __future__ import annotations

import gzip
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

gemmi = pytest.importorskip("gemmi")

from ipa_export.structures.reader import RESIDUE_TYPES, Backbone, read_backbone  # noqa: E402

DATA = Path(__file__).parent / "data" / "structures"
FILES = ["1ahsA.pdb.gz", "4ake_adk_open.pdb.gz", "6kwc_openfold_pred.pdb.gz", "3a4rA.pdb.gz"]
THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E",
    "GLY": "G", "HIS": "H", "HSD": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M",
    "PHE": "F", "PRO": "P", "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V",
}  # fmt: skip


def scan_atom_records(path: Path) -> dict[str, str]:
    """Residue id -> residue name for ATOM residues with N, CA and C (plain PDB column scan)."""
    atoms: dict[str, set[str]] = {}
    names: dict[str, str] = {}
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if line.startswith("ATOM"):
                rid = f"{line[21].strip()}:{line[22:26].strip()}{line[26].strip()}"
                atoms.setdefault(rid, set()).add(line[12:16].strip())
                names[rid] = line[17:21].strip()
    return {rid: names[rid] for rid, got in atoms.items() if {"N", "CA", "C"} <= got}


def write_pdb(structure, path: Path) -> Path:
    structure.setup_entities()
    structure.write_pdb(str(path))
    return path


@pytest.mark.parametrize("fname", FILES)
def test_residues_match_plain_text_scan(fname: str) -> None:
    expected = scan_atom_records(DATA / fname)
    bb = read_backbone(DATA / fname)
    assert isinstance(bb, Backbone)
    assert list(bb.residue_ids) == list(expected)
    assert bb.sequence == "".join(THREE_TO_ONE[name] for name in expected.values())
    L = len(expected)
    assert bb.aatype.shape == (L,) and bb.aatype.dtype == torch.int64
    for xyz in (bb.n, bb.ca, bb.c):
        assert xyz.shape == (L, 3) and xyz.dtype == torch.float32
    assert bb.aatype.tolist() == [RESIDUE_TYPES.index(s) for s in bb.sequence]


def test_4ake_charmm_file() -> None:
    bb = read_backbone(DATA / "4ake_adk_open.pdb.gz")
    assert len(bb.sequence) == 214
    assert bb.sequence.startswith("MRIILLGAPGAGKGTQAQFIMEKYGIPQISTGDMLR")
    assert "X" not in bb.sequence and "H" in bb.sequence  # CHARMM HSD is histidine
    assert bb.name.startswith("4ake_adk_open:")


@pytest.mark.parametrize("fname", FILES)
def test_backbone_geometry(fname: str) -> None:
    bb = read_backbone(DATA / fname)
    assert abs((bb.ca - bb.n).norm(dim=-1).median().item() - 1.46) < 0.03
    assert abs((bb.c - bb.ca).norm(dim=-1).median().item() - 1.52) < 0.03
    peptide = (bb.n[1:] - bb.c[:-1]).norm(dim=-1)
    assert abs(peptide.median().item() - 1.33) < 0.03
    ca_ca = (bb.ca[1:] - bb.ca[:-1]).norm(dim=-1)
    assert ((ca_ca - 3.8).abs() < 0.1).float().mean() > 0.9


def test_altlocs_insertion_codes_and_microheterogeneity(tmp_path: Path) -> None:
    st = gemmi.read_structure(str(DATA / "1ahsA.pdb.gz"))
    chain = st[0][0]
    n_res = len(chain)
    shift = gemmi.Position(0.5, 0.0, 0.0)

    def split(i: int, occ_a: float, occ_b: float) -> None:
        res = chain[i]
        for atom in list(res):
            atom.altloc, atom.occ = "A", occ_a
            b = atom.clone()
            b.altloc, b.occ, b.pos = "B", occ_b, atom.pos + shift
            res.add_atom(b)

    split(10, 0.3, 0.7)  # B wins
    split(20, 0.5, 0.5)  # tie: first (A) wins
    ca10, ca20 = chain[10]["CA"][0].pos, chain[20]["CA"][0].pos
    # microheterogeneity: one residue is present as its own type (A, 0.4) or as alanine (B, 0.6)
    i_micro = next(i for i in range(40, n_res) if chain[i].name not in ("ALA", "GLY"))
    ala = gemmi.Residue()
    ala.name, ala.seqid = "ALA", chain[i_micro].seqid
    for atom in chain[i_micro]:
        atom.altloc, atom.occ = "A", 0.4
        if atom.name in ("N", "CA", "C", "O", "CB"):
            b = atom.clone()
            b.altloc, b.occ = "B", 0.6
            ala.add_atom(b)
    chain.add_residue(ala, i_micro + 1)
    # insertion codes: residues 31 and 32 become <num of 30>A and <num of 30>B
    base = chain[30].seqid.num
    for i, icode in ((31, "A"), (32, "B")):
        chain[i].seqid = gemmi.SeqId(base, icode)
    path = write_pdb(st, tmp_path / "altloc_icode.pdb")
    text = path.read_text()
    assert re.search(r"^ATOM.{12}B", text, re.M) and re.search(rf"^ATOM.{{18}}{base:4d}A", text, re.M)

    bb = read_backbone(path)
    assert len(bb.residue_ids) == len(set(bb.residue_ids)) == n_res
    i30 = bb.residue_ids.index(f"A:{base}")
    assert bb.residue_ids[i30 : i30 + 3] == (f"A:{base}", f"A:{base}A", f"A:{base}B")
    assert torch.allclose(bb.ca[10], torch.tensor([ca10.x + 0.5, ca10.y, ca10.z]), atol=1e-3)
    assert torch.allclose(bb.ca[20], torch.tensor([ca20.x, ca20.y, ca20.z]), atol=1e-3)
    assert bb.sequence[i_micro] == "A"
    # every chosen backbone atom comes from a single conformer: bond lengths stay physical
    assert ((bb.ca - bb.n).norm(dim=-1) - 1.46).abs().max() < 0.1


@pytest.mark.parametrize("suffix", [".cif", ".cif.gz"])
def test_mmcif_matches_pdb(tmp_path: Path, suffix: str) -> None:
    src = DATA / "6kwc_openfold_pred.pdb.gz"
    st = gemmi.read_structure(str(src))
    st.setup_entities()
    text = st.make_mmcif_document().as_string()
    path = tmp_path / f"6kwc{suffix}"
    if suffix.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    pdb, cif = read_backbone(src), read_backbone(path)
    assert cif.sequence == pdb.sequence and cif.residue_ids == pdb.residue_ids
    for a, b in ((pdb.n, cif.n), (pdb.ca, cif.ca), (pdb.c, cif.c)):
        assert torch.allclose(a, b, atol=1e-3)


def test_hetero_groups_modified_residues_and_chains(tmp_path: Path) -> None:
    st = gemmi.read_structure(str(DATA / "1ahsA.pdb.gz"))
    model = st[0]
    protein = model[0]
    expected_seq = "".join(THREE_TO_ONE[r.name] for r in protein)
    i_met = expected_seq.index("M")
    mse = protein[i_met]
    mse.name, mse.het_flag = "MSE", "H"
    for atom in mse:
        if atom.name == "SD":
            atom.name, atom.element = "SE", gemmi.Element("Se")
    # hetero groups in the protein chain: water, a calcium ion (atom named CA), a sulfate
    for k, (name, atom_names) in enumerate((("HOH", ["O"]), ("CA", ["CA"]), ("SO4", ["S", "O1"]))):
        res = gemmi.Residue()
        res.name, res.seqid, res.het_flag = name, gemmi.SeqId(900 + k, " "), "H"
        for atom_name in atom_names:
            atom = gemmi.Atom()
            atom.name, atom.pos = atom_name, gemmi.Position(k, k, k)
            atom.element = gemmi.Element("Ca" if name == "CA" else atom_name[0])
            res.add_atom(atom)
        protein.add_residue(res)
    water_chain = gemmi.Chain("W")
    water = gemmi.Residue()
    water.name, water.seqid, water.het_flag = "HOH", gemmi.SeqId(1, " "), "H"
    water.add_atom(gemmi.Atom())
    water[0].name, water[0].element = "O", gemmi.Element("O")
    water_chain.add_residue(water)
    copy = protein.clone()
    copy.name = "B"
    for res in copy:
        for atom in res:
            atom.pos = atom.pos + gemmi.Position(10.0, 0.0, 0.0)
    model.add_chain(copy)
    model.add_chain(water_chain, pos=0)  # the first chain in the file has no amino acids
    path = write_pdb(st, tmp_path / "hetero.pdb")

    first = read_backbone(path)
    assert first.name == "hetero:A" and first.sequence == expected_seq
    assert first.sequence[i_met] == "M"
    second = read_backbone(path, chain="B")
    assert second.sequence == expected_seq
    assert torch.allclose(second.ca - first.ca, torch.tensor([10.0, 0.0, 0.0]), atol=1e-3)


def test_missing_backbone_atom_is_skipped_with_warning(tmp_path: Path, caplog) -> None:
    st = gemmi.read_structure(str(DATA / "1ahsA.pdb.gz"))
    chain = st[0][0]
    n_res, victim = len(chain), chain[5]
    victim_id = f"A:{victim.seqid.num}"
    victim.remove_atom("CA", "\0")
    path = write_pdb(st, tmp_path / "missing_ca.pdb")
    with caplog.at_level(logging.WARNING, logger="ipa_export.structures.reader"):
        bb = read_backbone(path)
    assert len(bb.residue_ids) == n_res - 1 and victim_id not in bb.residue_ids
    assert any(victim_id in rec.getMessage() for rec in caplog.records)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pdb"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_backbone(path)


@pytest.mark.parametrize("name", ["garbage.pdb", "garbage.cif", "garbage.txt"])
def test_garbage_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("this is not a structure\n12 34 56\n")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_backbone(path)


def test_unknown_chain_lists_available() -> None:
    with pytest.raises(ValueError, match=r"'Z'.*available chains: \['A'\]"):
        read_backbone(DATA / "1ahsA.pdb.gz", chain="Z")


def test_missing_gemmi_gives_install_hint(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gemmi", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'ipa-export[structure]'")):
        read_backbone(DATA / "1ahsA.pdb.gz")


@pytest.mark.parametrize(
    "text, message",
    [
        ("{ not json }\n", r"odd.pdb: not a PDB/mmCIF file \(no ATOM/HETATM records found\)"),
        ("data_x\n_cell.length_a 1\n", r"odd.pdb: Incorrect file format \(perhaps it is cif not pdb\?\)"),
    ],
)
def test_the_format_follows_the_file_name_not_a_guess_from_the_content(tmp_path, text, message) -> None:
    # A .pdb file is read as PDB whatever its first bytes look like: mmJSON's '{' is no JSON
    # error (a file of random bytes was one in 1 of 256), mmCIF's 'data_' gets the PDB reader's hint.
    from ipa_export.structures.reader import read_chains

    path = tmp_path / "odd.pdb"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_chains(path)
