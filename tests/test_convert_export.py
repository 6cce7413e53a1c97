"""``convert`` of an export (its directory or model.safetensors) or of an IPAEncoder state dict
keeps every tensor and every config field, or refuses."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import make_encoder, tiny_config
from safetensors.torch import load_file

from ipa_export import IPAEncoder
from ipa_export.bindrae.convert import convert
from ipa_export.cli import main
from ipa_export.errors import InputError

#: fields the shapes cannot tell, all off their defaults, and a residue-type table
SOURCE_CONFIG = tiny_config(
    num_residue_types=21, frame_update_clip="clip", distance_features="rbf", num_rbf=12, max_trans_update=2.0,
    max_rot_update_deg=20.0, dropout=0.2, attention="dense",
)  # fmt: skip


@pytest.fixture
def source(tmp_path):
    encoder = make_encoder(SOURCE_CONFIG, seed=4)
    encoder.save_pretrained(tmp_path / "source")
    return encoder, tmp_path / "source"


def assert_same_export(converted, encoder: IPAEncoder) -> None:
    loaded = IPAEncoder.from_pretrained(converted)
    assert loaded.config == encoder.config
    want, got = encoder.state_dict(), load_file(converted / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("given", ["directory", "model.safetensors"])
def test_convert_of_an_export_keeps_every_tensor_and_field(tmp_path, capsys, source, given):
    encoder, directory = source
    path = directory if given == "directory" else directory / "model.safetensors"
    assert main(["convert", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "num_residue_types=21" in capsys.readouterr().out
    assert_same_export(tmp_path / "out", encoder)


def test_convert_of_an_encoder_state_dict_keeps_its_residue_table(tmp_path):
    encoder = make_encoder(tiny_config(num_residue_types=21), seed=2)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    provenance = convert(tmp_path / "encoder.pt", tmp_path / "out")
    assert_same_export(tmp_path / "out", encoder)
    assert provenance["parity"].startswith("max |export - source| = 0 ")


def test_a_state_dict_of_rbf_weights_converts_with_the_stated_distance_features(tmp_path):
    encoder = make_encoder(tiny_config(distance_features="rbf", num_rbf=12), seed=2)
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    convert(tmp_path / "encoder.pt", tmp_path / "out", overrides={"distance_features": "rbf"})
    assert_same_export(tmp_path / "out", encoder)


def test_a_safetensors_file_without_its_config_is_refused(tmp_path, source):
    _, directory = source
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(directory / "model.safetensors", lone / "model.safetensors")
    with pytest.raises(InputError, match=r"no config.json beside it.*frame_update_clip.*pass the export directory"):
        convert(lone / "model.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_second_residue_table_is_refused(tmp_path, source):
    _, directory = source
    with pytest.raises(InputError, match=r"residue_embedding_seed: the source already holds a residue-type table"):
        convert(directory, tmp_path / "out", residue_embedding_seed=0)
    assert not (tmp_path / "out").exists()
