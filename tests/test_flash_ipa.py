"""flash_ipa's native API (ipa_export.flash_ipa): golden parity for every edge mode with
flash_ipa's own state-dict keys loaded strictly, Rigid-like frames, padding invariance."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ipa_export import ConfigCompatibilityError, EncoderConfig, FlashIPAStack, Frames, IPAEncoder
from ipa_export.bindrae.convert import convert
from ipa_export.cli import main as cli_main
from ipa_export.errors import InputError, InputTypeError
from ipa_export.flash_ipa import EdgeEmbedder, EdgeEmbedderConfig, InvariantPointAttention, IPAConfig

GOLDEN = Path(__file__).parent / "data" / "golden" / "native"
MODES = ("flash_1d_bias", "flash_no_bias", "orig_2d_bias", "orig_no_bias", "flash_2d_factorize_bias")
ATOL = 1e-4


def load_case(mode: str) -> tuple[dict[str, torch.Tensor], EdgeEmbedder, InvariantPointAttention]:
    """The golden tensors and the two native modules with the golden weights, loaded strictly."""
    path = GOLDEN / f"native_{mode}.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edge = EdgeEmbedder(EdgeEmbedderConfig(**json.loads(metadata["edge_config"]))).eval()
    ipa = InvariantPointAttention(IPAConfig(**json.loads(metadata["ipa_config"]))).eval()
    for module, prefix in ((edge, "weights.edge_embedder."), (ipa, "weights.ipa.")):
        module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})
    return tensors, edge, ipa


class Rotation:
    """The part of flash_ipa's / OpenFold's Rotation that the IPA uses."""

    def __init__(self, rot_mats: torch.Tensor):
        self._rot_mats = rot_mats

    def get_rot_mats(self) -> torch.Tensor:
        return self._rot_mats


class Rigid:
    """The part of flash_ipa's / OpenFold's Rigid that the IPA uses."""

    def __init__(self, rots: Rotation, trans: torch.Tensor):
        self._rots, self._trans = rots, trans

    def get_rots(self) -> Rotation:
        return self._rots

    def get_trans(self) -> torch.Tensor:
        return self._trans


@pytest.mark.parametrize("mode", MODES)
def test_golden_parity_with_flash_ipa_keys(mode: str) -> None:
    t, edge, ipa = load_case(mode)
    node_embed, translations, rotations = t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"]
    node_mask = t["inputs.node_mask"]
    with torch.no_grad():
        edge_embed, z_f1, z_f2, edge_mask = edge(node_embed, translations, translations, node_mask)
        s = ipa(node_embed, edge_embed, z_f1, z_f2, Rigid(Rotation(rotations), translations), node_mask.float())
    torch.testing.assert_close(s, t["outputs.s"], atol=ATOL, rtol=0)
    if "outputs.z_f1" in t:
        torch.testing.assert_close(z_f1, t["outputs.z_f1"], atol=ATOL, rtol=0)
        torch.testing.assert_close(z_f2, t["outputs.z_f2"], atol=ATOL, rtol=0)
    else:
        assert z_f1 is None and z_f2 is None
    if "outputs.edge_embed" in t:
        torch.testing.assert_close(edge_embed, t["outputs.edge_embed"], atol=ATOL, rtol=0)
        assert edge_mask.shape == (1, 48, 48)
    else:
        assert edge_embed is None and edge_mask is None


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_keys_are_flash_ipas(mode: str) -> None:
    t, edge, ipa = load_case(mode)
    for module, prefix in ((edge, "weights.edge_embedder."), (ipa, "weights.ipa.")):
        golden = {k.removeprefix(prefix): tuple(v.shape) for k, v in t.items() if k.startswith(prefix)}
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == golden


def test_config_defaults_are_flash_ipas() -> None:
    assert dataclasses.asdict(EdgeEmbedderConfig()) == {
        "z_factor_rank": 2,
        "single_bias_transition_n": 2,
        "c_s": 256,
        "c_p": 128,
        "relpos_k": 64,
        "use_rbf": True,
        "num_rbf": 32,
        "feat_dim": 64,
        "num_bins": 22,
        "self_condition": True,
        "mode": "flash_1d_bias",
        "k": 10,
        "max_len": None,
    }
    assert dataclasses.asdict(IPAConfig()) == {
        "use_flash_attn": True,
        "attn_dtype": "bf16",
        "use_packed": True,
        "c_s": 256,
        "c_z": 128,
        "c_hidden": 128,
        "no_heads": 8,
        "z_factor_rank": 2,
        "no_qk_points": 8,
        "no_v_points": 12,
        "seq_tfmr_num_heads": 4,
        "seq_tfmr_num_layers": 2,
        "num_blocks": 6,
    }


def test_rigid_pair_and_rigid_object_give_the_same_update() -> None:
    t, edge, ipa = load_case("flash_1d_bias")
    node_embed, translations, rotations = t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"]
    mask = t["inputs.node_mask"].bool()
    with torch.no_grad():
        _, z_f1, z_f2, _ = edge(node_embed, translations, translations, mask)
        from_rigid = ipa(node_embed, None, z_f1, z_f2, Rigid(Rotation(rotations), translations), mask)
        from_pair = ipa(node_embed, None, z_f1, z_f2, (rotations, translations), mask)
    assert torch.equal(from_rigid, from_pair)
    torch.testing.assert_close(from_pair, t["outputs.s"], atol=ATOL, rtol=0)
    with pytest.raises(TypeError, match=r"r: expected a \(rotations, translations\) pair or a Rigid"):
        ipa(node_embed, None, z_f1, z_f2, translations, mask)


@pytest.mark.parametrize("mode", MODES)
def test_padding_and_batch_neighbours_do_not_change_a_protein(mode: str) -> None:
    """A protein alone and padded to 60 next to a longer protein: the same outputs at its
    residues, zeros at its padding (flash_ipa's kNN lets padding into the neighbours)."""
    t, edge, ipa = load_case(mode)
    node_embed, translations, rotations = t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"]
    n, padded = node_embed.shape[1], 60
    g = torch.Generator().manual_seed(0)
    other = (torch.randn(1, padded, 64, generator=g), 30 * torch.randn(1, padded, 3, generator=g))

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        filler = torch.full((1, padded - n, *x.shape[2:]), value)
        return torch.cat([x, filler], dim=1)

    batch_embed = torch.cat([pad(node_embed, 7.0), other[0]])
    batch_trans = torch.cat([pad(translations, 1.0), other[1]])  # padding right on top of residue 0's neighbours
    batch_rot = torch.cat([pad(rotations, 0.0), torch.eye(3).expand(1, padded, 3, 3)])
    batch_mask = torch.ones(2, padded)
    batch_mask[0, n:] = 0
    with torch.no_grad():
        single = run(edge, ipa, node_embed, translations, rotations, torch.ones(1, n))
        batch = run(edge, ipa, batch_embed, batch_trans, batch_rot, batch_mask)
    for name, a, b in zip(("edge_embed", "z_f1", "z_f2", "s"), single, batch, strict=True):
        if a is None:
            assert b is None
            continue
        b0 = b[0, :n, :n] if name == "edge_embed" else b[0, :n]
        torch.testing.assert_close(b0, a[0], atol=1e-5, rtol=0, msg=f"{name} changed")
        assert b[0, n:].abs().max() == 0, f"{name} not zero at padding"


def step(edge: EdgeEmbedder, ipa: InvariantPointAttention, rigid: bool = False):  # type: ignore[no-untyped-def]
    """(node_embed, translations, rotations, mask) -> s through both modules, frames as a Rigid or a pair."""

    def call(node_embed, translations, rotations, mask):  # type: ignore[no-untyped-def]
        edge_embed, z_f1, z_f2, _ = edge(node_embed, translations, translations, mask)
        r = Rigid(Rotation(rotations), translations) if rigid else (rotations, translations)
        return ipa(node_embed, edge_embed, z_f1, z_f2, r, mask)

    return call


def run(edge, ipa, node_embed, translations, rotations, mask):  # type: ignore[no-untyped-def]
    edge_embed, z_f1, z_f2, _ = edge(node_embed, translations, translations, mask)
    s = ipa(node_embed, edge_embed, z_f1, z_f2, (rotations, translations), mask)
    return edge_embed, z_f1, z_f2, s


def test_encoder_factorize_mode_gives_flash_ipas_factors() -> None:
    """IPAEncoder(mode="flash_2d_factorize_bias") holds flash_ipa's EdgeEmbedder keys under
    ``edge_embedder.`` and makes the reference's factors."""
    t, _, _ = load_case("flash_2d_factorize_bias")
    config = EncoderConfig(
        c_s=64, c_p=32, feat_dim=16, c_hidden=16, no_heads=4, no_qk_points=4, no_v_points=6, depth=1,
        mode="flash_2d_factorize_bias", max_len=64, attention="dense",
    )  # fmt: skip
    encoder = IPAEncoder(config).eval()
    edge_weights = {k.removeprefix("weights."): v for k, v in t.items() if k.startswith("weights.edge_embedder.")}
    missing, unexpected = encoder.load_state_dict(edge_weights, strict=False)
    assert not unexpected and all(k.startswith("ipa_stack.") for k in missing)
    mask = t["inputs.node_mask"].bool()
    with torch.no_grad():
        out = encoder(t["inputs.node_embed"], t["inputs.translations"], mask, t["inputs.rotations"])
    torch.testing.assert_close(out.z_f1, t["outputs.z_f1"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.z_f2, t["outputs.z_f2"], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="N = 65 residues exceeds the factoriser's max_len 64"):
        encoder(torch.randn(1, 65, 64), torch.randn(1, 65, 3), torch.ones(1, 65, dtype=torch.bool))


def test_max_len_is_required_by_the_factorize_mode_only() -> None:
    with pytest.raises(
        ConfigCompatibilityError, match="max_len: mode 'flash_2d_factorize_bias' needs max_len >= 1, got 0"
    ):
        EncoderConfig(mode="flash_2d_factorize_bias")
    with pytest.raises(ConfigCompatibilityError, match="max_len: mode 'flash_1d_bias' needs max_len 0, got 64"):
        EncoderConfig(max_len=64)
    with pytest.raises(ValueError, match="max_len: mode 'flash_2d_factorize_bias' needs the longest protein length"):
        EdgeEmbedder(EdgeEmbedderConfig(mode="flash_2d_factorize_bias"))
    # a config written before max_len existed still reads, with the default
    old = {k: v for k, v in EncoderConfig().to_dict().items() if k != "max_len"}
    assert EncoderConfig.from_dict(old) == EncoderConfig()


def native_checkpoint(mode: str, layout: str) -> tuple[dict, EdgeEmbedder, FlashIPAStack]:
    """A flash_ipa-native checkpoint: the golden EdgeEmbedder and a 2-block stack whose IPAs are
    the golden one (block 0) and a random one, as BINDRAE builds the stack."""
    t, edge, ipa = load_case(mode)
    config = EncoderConfig(
        c_s=64, c_p=32, c_hidden=16, no_heads=4, no_qk_points=4, no_v_points=6, depth=2,
        z_factor_rank=2 if ipa.c_z else 0, mode="flash_1d_bias" if ipa.c_z else "flash_no_bias",
    )  # fmt: skip
    torch.manual_seed(0)
    stack = FlashIPAStack(config).eval()
    stack.ipa_blocks[0].ipa.load_state_dict(ipa.state_dict())
    edge_state, stack_state = edge.state_dict(), stack.state_dict()
    if layout == "modules":
        return {"edge_embedder": edge_state, "ipa_module": stack_state}, edge, stack
    flat = {f"edge_embedder.{k}": v for k, v in edge_state.items()} | {
        f"ipa_module.{k}": v for k, v in stack_state.items()
    }
    return {"model_state_dict": flat}, edge, stack


@pytest.mark.parametrize(
    ("mode", "layout"),
    [
        ("flash_1d_bias", "checkpoint"),
        ("flash_2d_factorize_bias", "checkpoint"),
        ("flash_no_bias", "modules"),
        ("orig_no_bias", "checkpoint"),
    ],
)
def test_native_checkpoint_converts_to_an_export_that_reproduces_the_modules(
    tmp_path: Path, mode: str, layout: str
) -> None:
    data, edge, stack = native_checkpoint(mode, layout)
    torch.save(data, tmp_path / "native.pt")
    convert(tmp_path / "native.pt", tmp_path / "export")
    encoder = IPAEncoder.from_pretrained(tmp_path / "export", attention="dense")
    assert encoder.config.mode == ("flash_no_bias" if "no_bias" in mode else mode)
    t = load_file(GOLDEN / f"native_{mode}.safetensors")
    node_embed, translations, rotations = t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"]
    mask = t["inputs.node_mask"].bool()
    with torch.no_grad():
        out = encoder(node_embed, translations, mask, rotations)
        _, z_f1, z_f2, _ = edge(node_embed, translations, translations, mask)
        if z_f1 is None:
            z_f1 = z_f2 = torch.zeros(1, 48, 0, 32)
        s, (rot, trans) = stack(node_embed, Frames(rotations, translations), z_f1, z_f2, mask, "dense")
    for name, a, b in (("s", out.s, s), ("rotations", out.rotations, rot), ("translations", out.translations, trans)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(out.z_f1, z_f1, atol=1e-5, rtol=0)
    if "outputs.z_f1" in t:  # and the factors are flash_ipa's
        torch.testing.assert_close(out.z_f1, t["outputs.z_f1"], atol=ATOL, rtol=0)


def test_orig_2d_bias_checkpoint_is_refused_with_a_reason(tmp_path: Path) -> None:
    data, _, _ = native_checkpoint("orig_2d_bias", "checkpoint")
    torch.save(data, tmp_path / "native.pt")
    with pytest.raises(ValueError, match="an orig_2d_bias edge embedder .* has no factorised form"):
        convert(tmp_path / "native.pt", tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("mode", ("flash_1d_bias", "flash_no_bias", "flash_2d_factorize_bias"))
def test_flash_modes_compile_without_graph_breaks(mode: str) -> None:
    t, edge, ipa = load_case(mode)
    node_embed, translations, rotations = t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"]
    mask = t["inputs.node_mask"].float()
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(step(edge, ipa, rigid=True))(node_embed, translations, rotations, mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_factorize_mode_encoder_compiles_without_graph_breaks() -> None:
    config = EncoderConfig(
        c_s=32, c_p=16, feat_dim=16, c_hidden=8, no_heads=2, no_qk_points=2, no_v_points=3, depth=1,
        mode="flash_2d_factorize_bias", max_len=64,
    )  # fmt: skip
    encoder = IPAEncoder(config).eval()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 40, 32, generator=g), 10 * torch.randn(2, 40, 3, generator=g), torch.ones(2, 40).bool())
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(encoder)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow  # Inductor builds C++: minutes on a small CPU
@pytest.mark.parametrize("mode", ("flash_1d_bias", "flash_2d_factorize_bias"))
def test_compiled_native_modules_match_eager_and_the_golden(mode: str) -> None:
    t, edge, ipa = load_case(mode)
    node_embed, translations, rotations = t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"]
    mask = t["inputs.node_mask"].bool()
    eager = step(edge, ipa)
    torch._dynamo.reset()
    compiled = torch.compile(eager, fullgraph=True, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(node_embed, translations, rotations, mask), t["outputs.s"], atol=ATOL, rtol=0
        )
        short = [x[:, :40] for x in (node_embed, translations, rotations, mask)]  # another length, same graph
        torch.testing.assert_close(compiled(*short), eager(*short), atol=ATOL, rtol=0)
    torch._dynamo.reset()


def test_errors_name_the_argument_and_the_fix() -> None:
    t, edge, ipa = load_case("flash_1d_bias")
    node_embed, translations, rotations = t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"]
    mask = t["inputs.node_mask"]
    _, z_f1, z_f2, _ = edge(node_embed, translations, translations, mask)
    modes = "['orig_no_bias', 'orig_2d_bias', 'flash_no_bias', 'flash_1d_bias', 'flash_2d_factorize_bias']"
    with pytest.raises(InputError, match=re.escape(f"mode: must be one of {modes}, got 'flash_3d_bias'")):
        EdgeEmbedder(EdgeEmbedderConfig(mode="flash_3d_bias"))
    with pytest.raises(InputError, match=r"edge_embed, edge_mask: must be None in mode 'flash_1d_bias'"):
        edge(node_embed, translations, translations, mask, edge_embed=torch.zeros(1, 48, 48, 32))
    with pytest.raises(InputTypeError, match="node_mask: expected a torch.Tensor, got list"):
        edge(node_embed, translations, translations, [1] * 48)
    frames = (rotations, translations)
    with pytest.raises(InputError, match=re.escape("z_factor_1 and z_factor_2: required by an IPA with c_z = 32")):
        ipa(node_embed, None, None, None, frames, mask)
    with pytest.raises(InputError, match=re.escape("z_factor_1: expected shape [B=1, N=48, R=2, c_z=32], got")):
        ipa(node_embed, None, z_f1[:, :, :1], z_f2, frames, mask)
    no_pair = InvariantPointAttention(IPAConfig(c_s=64, c_z=0, z_factor_rank=0, c_hidden=16, no_heads=4))
    with pytest.raises(InputError, match=re.escape("this IPA has no pair term (c_z = 0); pass None")):
        no_pair(node_embed, None, z_f1, z_f2, frames, mask)
    with pytest.raises(InputError, match=re.escape("eps: only 1e-08 (flash_ipa's default) is supported, got 1e-06")):
        InvariantPointAttention(IPAConfig(), eps=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_every_parameter_a_mode_uses_gets_a_gradient(mode: str) -> None:
    """The native modules train: a loss on s reaches every parameter that enters the output."""
    t, edge, ipa = load_case(mode)
    node_embed, translations, rotations = t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"]
    s = step(edge.train(), ipa.train())(node_embed, translations, rotations, t["inputs.node_mask"])
    s.square().mean().backward()
    unused = {"edge_embedder."} if "no_bias" in mode else set()  # flash_ipa's MLP, never used there
    for module, name in ((edge, "edge"), (ipa, "ipa")):
        for key, p in module.named_parameters():
            if any(key.startswith(u) for u in unused) and name == "edge":
                assert p.grad is None, key
                continue
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}.{key}"


def test_new_ipa_is_initialised_as_flash_ipa() -> None:
    """LeCun-normal weights truncated at 2 std, zero biases, a zero linear_out: a new block's
    update is exactly zero, as in flash_ipa."""
    torch.manual_seed(0)
    ipa = InvariantPointAttention(IPAConfig(c_s=256, c_z=128, attn_dtype="fp32"))
    for name in ("linear_q", "linear_kv", "linear_q_points", "linear_kv_points", "linear_b", "down_z"):
        layer = getattr(ipa, name)
        std = layer.in_features**-0.5
        assert abs(layer.weight.std().item() / std - 1) < 0.05, name
        assert layer.weight.abs().max() <= 2 * std / 0.87962566 + 1e-6 and not layer.bias.any(), name
    assert not ipa.linear_out.weight.any() and not ipa.linear_out.bias.any()
    s = torch.randn(1, 20, 256)
    frames = (torch.eye(3).expand(1, 20, 3, 3), torch.randn(1, 20, 3))
    z = torch.randn(1, 20, 2, 128)
    assert not ipa(s, None, z, z, frames, torch.ones(1, 20)).any()


@pytest.mark.parametrize("mode", ("flash_no_bias", "flash_2d_factorize_bias"))
def test_cli_validates_exports_of_the_new_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str) -> None:
    """The SE(3) self-check works without edge factors and within a factoriser's max_len (32 here)."""
    config = EncoderConfig(
        c_s=32, c_p=16, feat_dim=16, c_hidden=8, no_heads=2, no_qk_points=2, no_v_points=3, depth=1,
        mode=mode, z_factor_rank=0 if mode == "flash_no_bias" else 2, max_len=32 if "2d" in mode else 0,
    )  # fmt: skip
    torch.manual_seed(0)
    IPAEncoder(config).save_pretrained(tmp_path / "export")
    assert cli_main(["validate", str(tmp_path / "export")]) == 0, capsys.readouterr()


@pytest.mark.parametrize("mode", MODES)
def test_deepcopy_keeps_the_mode_and_owns_its_parameters(mode: str) -> None:
    """Training loops copy modules (EMA weights): the copy is the same mode, computes the same
    outputs, and does not share parameters."""
    t, edge, ipa = load_case(mode)
    edge_copy, ipa_copy = copy.deepcopy(edge), copy.deepcopy(ipa)
    assert type(edge_copy) is type(edge) and isinstance(edge_copy, EdgeEmbedder)
    inputs = (t["inputs.node_embed"], t["inputs.translations"], t["inputs.rotations"], t["inputs.node_mask"])
    with torch.no_grad():
        torch.testing.assert_close(step(edge_copy, ipa_copy)(*inputs), t["outputs.s"], atol=ATOL, rtol=0)
        for p in (*edge_copy.parameters(), *ipa_copy.parameters()):
            p.zero_()
    assert all(p.any() for p in ipa.parameters())
