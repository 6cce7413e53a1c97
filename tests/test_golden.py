"""Parity with the FlashIPA + BINDRAE reference (tests/data/golden, fp32, atol 1e-4)."""

from __future__ import annotations

import pytest
import torch
from conftest import CHECKPOINT, assert_close_at, load_golden

from ipa_export import EncoderConfig, IPAEncoder, create_edge_embedder, create_flashipa_module
from ipa_export.bindrae.adapter import load_stage1_state_dict
from ipa_export.bindrae.keys import checkpoint_to_encoder, encoder_to_checkpoint


def adapter_modules(case, attention: str):
    edge = create_edge_embedder(
        c_s=case.edge_config["c_s"],
        c_p=case.edge_config["c_p"],
        z_rank=case.edge_config["z_factor_rank"],
        num_rbf=case.edge_config["num_rbf"],
        feat_dim=case.edge_config["feat_dim"],
        relpos_k=case.edge_config["relpos_k"],
    )
    module = create_flashipa_module(**case.module_config, attention=attention)
    load_stage1_state_dict(case.weights, edge, module)
    return edge.eval(), module.eval()


@pytest.mark.parametrize("attention", ["dense", "sdpa"])
def test_adapter_api_matches_reference(golden, attention):
    edge, module = adapter_modules(golden, attention)
    x, mask = golden.inputs, golden.mask
    with torch.no_grad():
        edges = edge(x["node_embed"], x["translations"], mask)
        s_geo, (rotations, translations) = module(
            x["node_embed"], (x["rotations"], x["translations"]), edges["z_f1"], edges["z_f2"], mask
        )
    expected = golden.outputs
    assert_close_at(edges["z_f1"], expected["z_f1"], mask, name="z_f1")
    assert_close_at(edges["z_f2"], expected["z_f2"], mask, name="z_f2")
    assert_close_at(s_geo, expected["s_geo"], mask, name="s_geo")
    assert_close_at(rotations, expected["rot_mats"], mask, name="rot_mats")
    assert_close_at(translations, expected["trans"], mask, name="trans")


def encoder_config(case, attention: str) -> EncoderConfig:
    e, m = case.edge_config, case.module_config
    return EncoderConfig(
        c_s=e["c_s"],
        c_p=e["c_p"],
        z_factor_rank=e["z_factor_rank"],
        feat_dim=e["feat_dim"],
        c_hidden=m["c_hidden"],
        no_heads=m["no_heads"],
        no_qk_points=m["no_qk_points"],
        no_v_points=m["no_v_points"],
        depth=m["depth"],
        attention=attention,
    )


@pytest.mark.parametrize("attention", ["dense", "sdpa"])
def test_encoder_matches_reference(golden, attention):
    encoder = IPAEncoder(encoder_config(golden, attention))
    encoder.load_state_dict(checkpoint_to_encoder(golden.weights), strict=True)
    encoder.eval()
    x, mask = golden.inputs, golden.mask
    with torch.no_grad():
        out = encoder(x["node_embed"], x["translations"], mask, rotations=x["rotations"])
    expected = golden.outputs
    for field, key in (
        ("z_f1", "z_f1"),
        ("z_f2", "z_f2"),
        ("s", "s_geo"),
        ("rotations", "rot_mats"),
        ("translations", "trans"),
    ):
        assert_close_at(getattr(out, field), expected[key], mask, name=field)
    # Padded positions: zeros and identity rotations.
    pad = ~mask
    assert (
        not out.s[pad].any() and not out.z_f1[pad].any() and not out.z_f2[pad].any() and not out.translations[pad].any()
    )
    assert torch.equal(out.rotations[pad], torch.eye(3).expand_as(out.rotations[pad]))


def test_layout_map_is_a_bijection_on_encoder_keys():
    case = load_golden("tiny_r2_unpadded")
    native = checkpoint_to_encoder(case.weights)
    assert len(native) == len(case.weights) == 72
    assert encoder_to_checkpoint(native) == case.weights
    assert set(native) == set(IPAEncoder(encoder_config(case, "dense")).state_dict())


def test_stage1_checkpoint_loads_strict_into_adapter_modules():
    checkpoint = torch.load(CHECKPOINT, weights_only=True, map_location="cpu")
    state, config = checkpoint["model_state_dict"], checkpoint["config"]
    edge = create_edge_embedder(
        c_s=config["c_s"], c_p=config["c_p"], z_rank=config["z_factor_rank"], num_rbf=config["num_rbf"]
    )
    module = create_flashipa_module(
        c_s=config["c_s"],
        c_z=config["c_p"],
        depth=config["depth"],
        c_hidden=config["c_hidden"],
        no_heads=config["no_heads"],
        no_qk_points=config["no_qk_points"],
        no_v_points=config["no_v_points"],
        z_factor_rank=config["z_factor_rank"],
    )
    for target, prefix in ((edge, "edge_embedder."), (module, "ipa_module.")):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        target.load_state_dict(part, strict=True)
        # state_dict() gives BINDRAE's keys back, bit-identical.
        assert target.state_dict().keys() == part.keys()
        assert all(torch.equal(target.state_dict()[k], v) for k, v in part.items())
