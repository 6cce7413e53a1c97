"""The embedding pipeline gives the encoder each chain's residue numbers from the file, so a
gap in the numbering is seen as a gap (3a4rA numbers from -4 and skips one residue number)."""

from __future__ import annotations

import pytest
import torch
from conftest import STRUCTURES

pytest.importorskip("pyarrow")
pytest.importorskip("gemmi")

from ipa_export import IPAEncoder, load_embeddings  # noqa: E402
from ipa_export.model import frames  # noqa: E402
from ipa_export.structures.corpus import embed_corpus  # noqa: E402
from ipa_export.structures.reader import read_chains  # noqa: E402

SHIPPED = STRUCTURES.parents[2] / "checkpoints" / "bindrae-ipa-tiny"


def test_pipeline_passes_the_files_residue_numbers(tmp_path):
    path = STRUCTURES / "3a4rA.pdb.gz"
    embed_corpus(SHIPPED, [path], tmp_path / "out")
    (record,) = load_embeddings(tmp_path / "out")
    (backbone,) = read_chains(path).backbones
    numbers = backbone.residue_numbers
    assert numbers[0] == -4 and ((numbers[1:] - numbers[:-1]) != 1).any()  # offset and a gap
    encoder = IPAEncoder.from_pretrained(SHIPPED)
    rotations, ca = frames.from_backbone(backbone.n, backbone.ca, backbone.c)
    mask = torch.ones(1, len(numbers), dtype=torch.bool)
    with torch.no_grad():
        node = encoder.embed_residues(backbone.aatype[None])
        numbered = encoder(node, ca[None], mask, rotations[None], residue_index=numbers[None]).s[0]
        slots = encoder(node, ca[None], mask, rotations[None]).s[0]
    torch.testing.assert_close(record["s"], numbered, atol=1e-5, rtol=0)
    assert (record["s"] - slots).abs().max() > 1e-3  # the gap changes the features after it


def test_pipeline_gives_inserted_residues_their_own_positions(tmp_path):
    """149, 149A, 149B, 149C: four positions (149..152), not one number four times."""
    lines = [line for line in __import__("gzip").decompress((STRUCTURES / "3a4rA.pdb.gz").read_bytes()).decode()
             .splitlines() if line.startswith("ATOM")]  # fmt: skip
    keys = list(dict.fromkeys(line[22:27] for line in lines))
    ids = {key: f"{149 + max(0, k - 3):>4}{'ABC'[k - 1] if 1 <= k <= 3 else ' '}" for k, key in enumerate(keys)}
    path = tmp_path / "inserted.pdb"
    path.write_text("\n".join(line[:22] + ids[line[22:27]] + line[27:] for line in lines) + "\nEND\n")
    embed_corpus(SHIPPED, [path], tmp_path / "out")
    (record,) = load_embeddings(tmp_path / "out")
    (backbone,) = read_chains(path).backbones
    assert record["residue_ids"][:5] == ["A:149", "A:149A", "A:149B", "A:149C", "A:150"]
    positions = torch.arange(149, 149 + len(backbone.sequence))[None]
    encoder = IPAEncoder.from_pretrained(SHIPPED)
    rotations, ca = frames.from_backbone(backbone.n, backbone.ca, backbone.c)
    mask = torch.ones(1, len(backbone.sequence), dtype=torch.bool)
    with torch.no_grad():
        node = encoder.embed_residues(backbone.aatype[None])
        ordinal = encoder(node, ca[None], mask, rotations[None], residue_index=positions).s[0]
        as_numbers = encoder(node, ca[None], mask, rotations[None], residue_index=backbone.residue_numbers[None]).s[0]
    torch.testing.assert_close(record["s"], ordinal, atol=1e-5, rtol=0)
    assert (record["s"] - as_numbers).abs().max() > 1e-3  # the old input: 149 four times
