"""Every config option survives save_pretrained -> from_pretrained, and the shapes are read once.

The config strategy is built from ``dataclasses.fields(EncoderConfig)`` by type, so a field added
later is explored without a change here; only the rules that tie fields together are written out.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from conftest import random_chain, randomize_, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from ipa_export import EncoderConfig, IPAEncoder
from ipa_export.cli import main
from ipa_export.export.format import expected_tensors
from ipa_export.model.shapes import implied_config

FIELDS = dataclasses.fields(EncoderConfig)
HINTS = typing.get_type_hints(EncoderConfig)
BASE = tiny_config(depth=1)
PROTEIN_LENGTH = 12
#: fields whose allowed values depend on another field, or on the machine
DEPENDENT = ("mode", "z_factor_rank", "max_len", "distance_features", "attention")
#: the fields that only the shapes of a mode's tensors determine (others come from config.json)
SHAPE_FIELDS = {
    "flash_1d_bias": {"c_p", "feat_dim", "knn_k", "z_factor_rank", "max_len"},
    "flash_2d_factorize_bias": {"c_p", "feat_dim", "num_bins", "z_factor_rank", "max_len"},
    "flash_no_bias": {"z_factor_rank", "max_len"},
}
COMMON_SHAPE_FIELDS = {"c_s", "c_hidden", "no_heads", "no_qk_points", "no_v_points", "depth", "num_residue_types"}


def field_values(field: dataclasses.Field) -> st.SearchStrategy:
    """The tiny config's value, or another valid one drawn by the field's type: a choice of its
    Literal, a small integer (a multiple of 4 for c_p, even for feat_dim), a float in (0, 1)."""
    hint = HINTS[field.name]
    base = getattr(BASE, field.name)
    if typing.get_origin(hint) is typing.Literal:
        return st.sampled_from(typing.get_args(hint))
    if hint is int:
        step = {"c_p": 4, "feat_dim": 2}.get(field.name, 1)
        return st.one_of(st.just(base), st.integers(1, 3).map(lambda n: step * n) if step > 1 else st.integers(2, 4))
    if hint is float:
        return st.one_of(st.just(base), st.floats(0.05, 0.95))
    raise TypeError(f"{field.name}: no strategy for type {hint}; add one here")


@st.composite
def configs(draw: st.DrawFn) -> EncoderConfig:
    values = {f.name: draw(field_values(f)) for f in FIELDS if f.name not in DEPENDENT}
    mode = values["mode"] = draw(field_values(EncoderConfig.__dataclass_fields__["mode"]))
    values["z_factor_rank"] = 0 if mode == "flash_no_bias" else draw(st.integers(1, 3))
    values["max_len"] = draw(st.integers(PROTEIN_LENGTH, 16)) if mode == "flash_2d_factorize_bias" else 0
    values["distance_features"] = draw(st.sampled_from(["one_hot", "rbf"])) if mode == "flash_1d_bias" else "one_hot"
    usable = ["auto", "sdpa", "dense"] + (["flash_attn"] if torch.cuda.is_available() else [])  # flash_attn: CUDA
    values["attention"] = draw(st.sampled_from(usable))
    return EncoderConfig(**values)


def assert_round_trip(config: EncoderConfig, directory, seed: int = 0) -> None:
    """save_pretrained -> from_pretrained keeps the config, every tensor and the outputs, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    encoder = randomize_(IPAEncoder(config), g).freeze()  # as loaded: 2-D mode differs by an ulp unfrozen
    encoder.save_pretrained(directory, overwrite=True)
    loaded = IPAEncoder.from_pretrained(directory)
    assert loaded.config == config
    original, reloaded = encoder.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    mask = torch.ones(1, PROTEIN_LENGTH, dtype=torch.bool)
    mask[0, -2:] = False
    inputs = (torch.randn(1, PROTEIN_LENGTH, config.c_s, generator=g), random_chain(PROTEIN_LENGTH, g)[None], mask)
    with torch.no_grad():
        expected, actual = encoder(*inputs), loaded(*inputs)
    for name, a, b in zip(expected.keys(), expected, actual, strict=True):
        assert torch.equal(a, b), name


@settings(max_examples=25, deadline=None)
@given(config=configs(), seed=st.integers(0, 2**16))
def test_every_config_round_trips_bit_exactly(tmp_path_factory, config, seed):
    assert_round_trip(config, tmp_path_factory.mktemp("export") / "e", seed)


def non_default(**changes) -> EncoderConfig:
    """The tiny config with every float moved off its default, then ``changes``."""
    floats = {f.name: f.default + 0.25 for f in FIELDS if isinstance(f.default, float)}
    return tiny_config(**floats).replace(**changes)


#: Between them, every field at a value other than its default (the modes exclude each other).
NON_DEFAULT = {
    "rbf_1d": non_default(
        c_s=24, c_p=12, z_factor_rank=3, feat_dim=6, knn_k=5, num_bins=7, distance_features="rbf", num_rbf=9,
        c_hidden=5, no_heads=3, no_qk_points=2, no_v_points=3, depth=2, frame_update_clip="clip",
        attention="dense", attn_dtype="bf16", num_residue_types=21,
    ),
    "factorized_2d": non_default(
        c_s=20, c_p=8, z_factor_rank=3, mode="flash_2d_factorize_bias", feat_dim=4, knn_k=3, num_bins=5,
        max_len=PROTEIN_LENGTH + 3, num_rbf=4, c_hidden=6, no_heads=2, no_qk_points=3, no_v_points=2, depth=2,
        frame_update_clip="clip", attention="sdpa", attn_dtype="fp16", num_residue_types=4,
    ),
    "no_bias": non_default(
        mode="flash_no_bias", z_factor_rank=0, num_bins=9, knn_k=4, num_rbf=3, frame_update_clip="clip",
        attention="dense", attn_dtype="bf16", num_residue_types=3,
    ),
}  # fmt: skip


def test_the_non_default_configs_cover_every_field():
    defaults = EncoderConfig()
    for field in FIELDS:
        values = [getattr(c, field.name) for c in NON_DEFAULT.values()]
        assert any(v != getattr(defaults, field.name) for v in values), f"{field.name}: add a non-default value"


@pytest.mark.parametrize("name", NON_DEFAULT)
def test_every_field_at_a_non_default_value_round_trips(tmp_path, name):
    assert_round_trip(NON_DEFAULT[name], tmp_path / "export")


@pytest.mark.parametrize("name", NON_DEFAULT)
def test_the_shapes_determine_their_fields_and_nothing_else(name):
    config = NON_DEFAULT[name]
    shapes = expected_tensors(IPAEncoder, config)
    fields, problems = implied_config(shapes, config.to_dict())
    assert problems == []
    determined = COMMON_SHAPE_FIELDS | SHAPE_FIELDS[config.mode] | {"mode"}
    if config.mode == "flash_1d_bias":
        determined.add("num_rbf" if config.distance_features == "rbf" else "num_bins")
    assert fields == {k: getattr(config, k) for k in determined}


def test_the_distance_width_is_num_rbf_with_rbf_features():
    config = tiny_config(distance_features="rbf", num_rbf=16)  # num_bins 22 stays in the config, unused
    shapes = expected_tensors(IPAEncoder, config)
    assert implied_config(shapes, {"distance_features": "rbf"}).fields["num_rbf"] == 16
    assert implied_config(shapes).fields["num_bins"] == 16  # what one-hot features of the same shapes mean


def test_an_rbf_export_loads_inspects_and_validates(tmp_path, capsys):
    config = tiny_config(distance_features="rbf", num_rbf=16)
    assert_round_trip(config, tmp_path / "rbf")
    assert main(["inspect", str(tmp_path / "rbf"), "--json"]) == 0
    assert '"num_rbf": 16' in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "rbf"), "--expect", "num_rbf=16"]) == 0
    assert "self-check" in capsys.readouterr().out


def test_a_malformed_tensor_is_named():
    shapes = expected_tensors(IPAEncoder, tiny_config())
    shapes["edge_embedder.linear_t_distogram.weight"] = [2 * 2 * 22, 10 * (22 + 16) + 1]
    problems = implied_config(shapes).problems
    assert problems == [
        "tensor edge_embedder.linear_t_distogram.weight: size 381 is not a positive multiple of "
        "num_bins + feat_dim = 38"
    ]
