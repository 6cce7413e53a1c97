"""A Stage-1 checkpoint with a non-default knn_k converts and reproduces its source; the
model card's tables survive ``|`` in their values."""

from __future__ import annotations

import torch
from conftest import make_encoder, random_chain, tiny_config
from markdown_it import MarkdownIt

from ipa_export import IPAEncoder
from ipa_export.bindrae.convert import convert
from ipa_export.bindrae.keys import encoder_to_checkpoint
from ipa_export.export.card import render_model_card


def test_checkpoint_with_knn_k_16_converts_and_reproduces_its_source(tmp_path):
    source = make_encoder(tiny_config(knn_k=16), seed=3)
    checkpoint = tmp_path / "stage1_k16.pt"
    config = {"c_s": 32, "c_p": 16, "z_factor_rank": 2, "depth": 2, "no_heads": 2, "c_hidden": 8}
    torch.save({"model_state_dict": encoder_to_checkpoint(source.state_dict()), "config": config}, checkpoint)

    provenance = convert(checkpoint, tmp_path / "export")
    export = IPAEncoder.from_pretrained(tmp_path / "export")
    assert export.config.knn_k == 16 and export.config == source.config
    assert provenance["parity"].startswith("max |export - source| = 0 ")
    g = torch.Generator().manual_seed(0)
    length = 40  # more than k + 1 residues: all 16 neighbour slots are filled
    x, ca = torch.randn(2, length, 32, generator=g), torch.stack([random_chain(length, g) for _ in range(2)])
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, 30:] = False
    with torch.no_grad():
        want, got = source(x, ca, mask), export(x, ca, mask)
    for name in want.keys():
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The cell texts of the first table after ``heading``, parsed as the Hub (GitHub markdown) does."""
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown)
    start = next(i for i, t in enumerate(tokens) if t.type == "inline" and t.content == heading)
    rows: list[list[str]] = []
    for token in tokens[start:]:
        if token.type == "table_close":
            break
        if token.type == "tr_open":
            rows.append([])
        elif token.type == "inline" and rows:
            rows[-1].append(token.content)
    return rows[1:]  # without the header row


def test_model_card_escapes_pipes_in_table_cells():
    config_json = {
        "architecture": "IPAEncoder",
        "format_version": 2,
        "ipa_export_version": "0.2.0",
        "dtype": "float32",
        "config": {"c_s": 64, "attention": "sdpa"},
    }
    provenance = {
        "parity": "max |export - source| = 0 (tolerance 1e-05)",
        "note": "trained on A|B split | fold 3",
        "a | key": "value",
    }
    card = render_model_card(config_json, num_parameters=10, provenance=provenance)
    assert table_rows(card, "Provenance") == [[k, v] for k, v in provenance.items()]
    assert table_rows(card, "Config") == [["`c_s`", "`64`"], ["`attention`", "`sdpa`"]]
