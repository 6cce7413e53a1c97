"""The usage document's API: names, defaults, shapes, keys and parameter count."""

from __future__ import annotations

import pytest
import torch

import ipa_export
from ipa_export import Frames, ProjectEdgeConfig, create_edge_embedder, create_flashipa_module


def test_usage_document_shapes_and_keys():
    g = torch.Generator().manual_seed(0)
    B, N = 2, 50
    node_embed = torch.randn(B, N, 384, generator=g)
    translations = 10 * torch.randn(B, N, 3, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, -5:] = False
    embedder = create_edge_embedder(c_s=384, c_p=128, z_rank=2, num_rbf=16).eval()
    with torch.no_grad():
        outputs = embedder(node_embed, translations, mask)
    assert set(outputs) == {"z_f1", "z_f2", "edge_mask"}
    assert outputs["z_f1"].shape == outputs["z_f2"].shape == (2, 50, 2, 128)
    assert outputs["edge_mask"].shape == (2, 50, 50) and outputs["edge_mask"].dtype == torch.bool
    assert torch.equal(outputs["edge_mask"], mask[:, :, None] & mask[:, None, :])

    module = create_flashipa_module(c_s=384, c_z=128, depth=3).eval()
    rotations = torch.eye(3).expand(B, N, 3, 3)
    with torch.no_grad():
        s_geo, frames = module(node_embed, (rotations, translations), outputs["z_f1"], outputs["z_f2"], mask)
    assert s_geo.shape == (2, 50, 384)
    rot, trans = frames  # a (rotations, translations) pair
    assert isinstance(frames, Frames) and rot.shape == (2, 50, 3, 3) and trans.shape == (2, 50, 3)


def test_usage_document_rank16_example_shapes():
    embedder = create_edge_embedder(c_s=384, c_p=128, z_rank=16, num_rbf=16)
    with torch.no_grad():
        out = embedder(torch.randn(2, 50, 384), torch.randn(2, 50, 3), torch.ones(2, 50, dtype=torch.bool))
    assert out["z_f1"].shape == (2, 50, 16, 128)


def test_parameter_count_matches_usage_document():
    module = create_flashipa_module(c_s=384, c_z=128, depth=3)
    assert sum(p.numel() for p in module.parameters()) == 9_958_146


def test_defaults_match_usage_document():
    assert ProjectEdgeConfig() == ProjectEdgeConfig(
        c_s=384, c_p=128, z_factor_rank=2, num_rbf=16, mode="flash_1d_bias", feat_dim=64, relpos_k=64
    )
    config = create_flashipa_module().config
    assert (config.c_s, config.c_z, config.c_hidden, config.no_heads, config.depth) == (384, 128, 128, 8, 3)
    assert (config.no_qk_points, config.no_v_points, config.z_factor_rank) == (8, 12, 2)
    assert (config.max_rot_update_deg, config.max_trans_update, config.frame_update_clip) == (15.0, 1.5, "reference")


def test_ignored_reference_fields_have_no_effect():
    torch.manual_seed(0)
    a = create_edge_embedder(num_rbf=16, relpos_k=64, use_rbf=True, self_condition=True)
    b = create_edge_embedder(num_rbf=32, relpos_k=8, use_rbf=False, self_condition=False)
    b.load_state_dict(a.state_dict(), strict=True)
    x, t, m = torch.randn(1, 20, 384), 5 * torch.randn(1, 20, 3), torch.ones(1, 20, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(a(x, t, m)["z_f1"], b(x, t, m)["z_f1"])


def test_trans_sc_defaults_to_translations():
    torch.manual_seed(0)
    embedder = create_edge_embedder(c_s=32, c_p=16, z_rank=1, feat_dim=16).eval()
    x, t, m = torch.randn(1, 15, 32), 5 * torch.randn(1, 15, 3), torch.ones(1, 15, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(embedder(x, t, m)["z_f2"], embedder(x, t, m, trans_sc=t)["z_f2"])
        assert not torch.equal(embedder(x, t, m)["z_f2"], embedder(x, t, m, trans_sc=t.flip(1))["z_f2"])


def test_public_api_is_exported():
    for name in ipa_export.__all__:
        assert hasattr(ipa_export, name), name


def test_invalid_config_reports_every_field():
    with pytest.raises(ipa_export.ConfigCompatibilityError) as info:
        ipa_export.IPAEncoder(c_p=30, no_heads=0, mode="flash_no_bias")
    assert info.value.problems == [
        "no_heads: must be positive, got 0",
        "c_p: must be divisible by 4 (the IPA projects it to c_p // 4), got 30",
        "z_factor_rank: mode 'flash_no_bias' needs z_factor_rank 0, got 2",
    ]
    assert isinstance(info.value, ValueError)
