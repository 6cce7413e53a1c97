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
