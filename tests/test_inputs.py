"""Bad input raises ValueError or TypeError naming the argument, the expected and the received."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_encoder, random_chain, tiny_config

from ipa_export import create_edge_embedder, create_flashipa_module

C_S = tiny_config().c_s
B, N = 2, 12


def good():
    return {
        "node_embed": torch.randn(B, N, C_S),
        "translations": torch.stack([random_chain(N, torch.Generator().manual_seed(b)) for b in range(B)]),
        "node_mask": torch.ones(B, N, dtype=torch.bool),
    }


def with_(**changes):
    args = good()
    args.update(changes)
    return args


def nan_at(index):
    t = 5 * torch.randn(B, N, 3)
    t[index] = float("nan")
    return t


CASES = {
    "node_embed rank": (
        with_(node_embed=torch.randn(N, C_S)),
        ValueError,
        r"node_embed: expected shape \[B, N, c_s=32\], got \[12, 32\]",
    ),
    "node_embed width": (
        with_(node_embed=torch.randn(B, N, 7)),
        ValueError,
        r"node_embed: expected shape \[B, N, c_s=32\], got \[2, 12, 7\]",
    ),
    "node_embed int": (
        with_(node_embed=torch.ones(B, N, C_S, dtype=torch.long)),
        TypeError,
        r"node_embed: expected a floating-point tensor, got torch.int64",
    ),
    "node_embed not a tensor": (with_(node_embed=[[0.0]]), TypeError, r"node_embed: expected a torch.Tensor, got list"),
    "translations last dim": (
        with_(translations=torch.randn(B, N, 4)),
        ValueError,
        r"translations: expected shape \[B=2, N=12, 3\], got \[2, 12, 4\]",
    ),
    "translations N disagrees": (
        with_(translations=torch.randn(B, N + 1, 3)),
        ValueError,
        r"translations: expected shape \[B=2, N=12, 3\], got \[2, 13, 3\]",
    ),
    "translations B disagrees": (
        with_(translations=torch.randn(B + 1, N, 3)),
        ValueError,
        r"translations: expected shape \[B=2, N=12, 3\], got \[3, 12, 3\]",
    ),
    "translations int": (
        with_(translations=torch.ones(B, N, 3, dtype=torch.int32)),
        TypeError,
        r"translations: expected a floating-point tensor, got torch.int32",
    ),
    "translations NaN": (
        with_(translations=nan_at((1, 3))),
        ValueError,
        r"translations: expected finite values at valid residues, found NaN or inf at \(batch, residue\) \(1, 3\)",
    ),
    "translations inf": (
        with_(translations=torch.full((B, N, 3), float("inf"))),
        ValueError,
        r"translations: expected finite values",
    ),
    "mask float": (
        with_(node_mask=torch.ones(B, N)),
        TypeError,
        r"node_mask: expected a torch.bool tensor, got torch.float32",
    ),
    "mask shape": (
        with_(node_mask=torch.ones(B, N, 1, dtype=torch.bool)),
        ValueError,
        r"node_mask: expected shape \[B=2, N=12\], got \[2, 12, 1\]",
    ),
    "mask no broadcast": (
        with_(node_mask=torch.ones(1, N, dtype=torch.bool)),
        ValueError,
        r"node_mask: expected shape \[B=2, N=12\], got \[1, 12\]",
    ),
    "empty batch": (
        {
            "node_embed": torch.randn(0, N, C_S),
            "translations": torch.randn(0, N, 3),
            "node_mask": torch.ones(0, N, dtype=torch.bool),
        },
        ValueError,
        r"node_mask: empty batch, got shape \[0, 12\]",
    ),
    "empty length": (
        {
            "node_embed": torch.randn(B, 0, C_S),
            "translations": torch.randn(B, 0, 3),
            "node_mask": torch.ones(B, 0, dtype=torch.bool),
        },
        ValueError,
        r"node_mask: empty batch",
    ),
    "protein without residues": (
        with_(node_mask=torch.tensor([[True] * N, [False] * N])),
        ValueError,
        r"node_mask: protein\(s\) \[1\] have no valid residue",
    ),
    "rotations shape": (
        with_(rotations=torch.eye(3).expand(B, N, 3, 3)[..., :2]),
        ValueError,
        r"rotations: expected shape \[B=2, N=12, 3, 3\], got \[2, 12, 3, 2\]",
    ),
    "rotations NaN": (
        with_(rotations=torch.full((B, N, 3, 3), float("nan"))),
        ValueError,
        r"rotations: expected finite values",
    ),
    "trans_sc shape": (
        with_(trans_sc=torch.randn(B, N - 1, 3)),
        ValueError,
        r"trans_sc: expected shape \[B=2, N=12, 3\], got \[2, 11, 3\]",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_encoder_rejects_bad_input(case):
    args, error, message = CASES[case]
    with pytest.raises(error, match=message):
        make_encoder()(**args)


def test_nan_in_padding_is_allowed_and_ignored():
    args = good()
    args["node_mask"][1, -2:] = False
    clean = make_encoder()(**args)
    args["translations"][1, -2:] = float("nan")
    args["node_embed"][1, -2:] = float("inf")
    args["rotations"] = torch.eye(3).repeat(B, N, 1, 1)
    args["rotations"][1, -2:] = float("nan")
    with torch.no_grad():
        out = make_encoder()(**args)
    for field in out._fields:
        torch.testing.assert_close(getattr(out, field), getattr(clean, field), rtol=0, atol=0)


def test_edge_adapter_rejects_bad_input():
    embedder = create_edge_embedder(c_s=C_S, c_p=16, z_rank=1, feat_dim=16)
    args = good()
    with pytest.raises(ValueError, match=re.escape("translations: expected shape [B=2, N=12, 3], got [2, 12]")):
        embedder(args["node_embed"], args["translations"][..., 0], args["node_mask"])
    with pytest.raises(TypeError, match="node_mask: expected a torch.bool tensor, got torch.uint8"):
        embedder(args["node_embed"], args["translations"], args["node_mask"].to(torch.uint8))


def test_flashipa_module_rejects_bad_input():
    module = create_flashipa_module(c_s=C_S, c_z=16, depth=1, c_hidden=8, no_heads=2, no_qk_points=2, no_v_points=2)
    args = good()
    frames = (torch.eye(3).expand(B, N, 3, 3), args["translations"])
    z = torch.randn(B, N, 2, 16)
    with pytest.raises(
        ValueError, match=re.escape("z_f1: expected shape [B=2, N=12, R=2, c_z=16], got [2, 12, 3, 16]")
    ):
        module(args["node_embed"], frames, torch.randn(B, N, 3, 16), z, args["node_mask"])
    with pytest.raises(TypeError, match=r"frames: expected a \(rotations, translations\) pair, got Tensor"):
        module(args["node_embed"], frames[1], z, z, args["node_mask"])
    with pytest.raises(
        ValueError, match=re.escape("frames.rotations: expected shape [B=2, N=12, 3, 3], got [2, 12, 9]")
    ):
        module(args["node_embed"], (frames[0].flatten(-2), frames[1]), z, z, args["node_mask"])


def stack_entry_points():
    """The three entry points into the IPA stack, each as f(s, rotations, translations, mask),
    with the names their signatures give these arguments."""
    from ipa_export.flash_ipa import InvariantPointAttention, IPAConfig

    encoder = make_encoder()
    module = create_flashipa_module(c_s=C_S, c_z=16, depth=1, c_hidden=8, no_heads=2, no_qk_points=2, no_v_points=2)
    ipa = InvariantPointAttention(IPAConfig(c_s=C_S, c_z=16, c_hidden=8, no_heads=2, no_qk_points=2, no_v_points=2))
    z = torch.zeros(B, N, 2, 16)
    return {
        ("node_embed", "rotations", "translations"): lambda s, r, t, m: encoder(s, t, m, r),
        ("s", "frames.rotations", "frames.translations"): lambda s, r, t, m: module(s, (r, t), z, z, m),
        ("s", "r rotations", "r translations"): lambda s, r, t, m: ipa(s, None, z, z, (r, t), m),
    }


def test_the_stack_entry_points_check_the_same_things():
    """Reflections, NaN features and infinite coordinates at valid residues are refused by the
    encoder, BINDRAE's FlashIPAModule and flash_ipa's IPA alike, each naming its own argument."""
    args = good()
    s, t, m = args["node_embed"], args["translations"], args["node_mask"]
    rotations = torch.eye(3).repeat(B, N, 1, 1)
    reflected = rotations.clone()
    reflected[1, 4, 2, 2] = -1.0
    for (s_name, r_name, t_name), call in stack_entry_points().items():
        reflection = rf"^{re.escape(r_name)}: .* at \(batch, residue\) \(1, 4\): determinant -1"
        with pytest.raises(ValueError, match=reflection):
            call(s, reflected, t, m)
        with pytest.raises(ValueError, match=rf"^{s_name}: expected finite values .* \(batch, residue\) \(0, 3\)"):
            call(s.index_put((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("nan"))), rotations, t, m)
        with pytest.raises(ValueError, match=rf"^{re.escape(t_name)}: expected finite values .* \(1, 2\)"):
            call(s, rotations, t.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("inf"))), m)
        with pytest.raises(ValueError, match=r"^(node_)?mask: protein\(s\) \[1\] have no valid residue"):
            call(s, rotations, t, m & torch.tensor([[True], [False]]))
