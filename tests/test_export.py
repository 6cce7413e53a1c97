"""Frozen export: round trip, conversion, validation on load, atomic writes, Hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, assert_close_at, load_golden, make_encoder, random_chain, tiny_config
from safetensors.torch import load_file, save_file

import ipa_export.export.format as export_module
from ipa_export import ConfigCompatibilityError, IPAEncoder
from ipa_export.bindrae.convert import convert, read_checkpoint


@pytest.fixture
def saved(tmp_path) -> Path:
    return make_encoder(tiny_config(), seed=5).save_pretrained(tmp_path / "export")


def edit_config(directory: Path, **changes) -> None:
    data = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        target, _, field = key.rpartition(".")
        (data[target] if target else data)[field] = value
    (directory / "config.json").write_text(json.dumps(data))


def load_problems(directory: Path, **kwargs) -> list[str]:
    with pytest.raises(ConfigCompatibilityError) as info:
        IPAEncoder.from_pretrained(directory, **kwargs)
    return info.value.problems


def test_round_trip_is_bit_exact_and_frozen(saved):
    original = make_encoder(tiny_config(), seed=5)
    loaded = IPAEncoder.from_pretrained(saved)
    assert loaded.config == original.config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    pairs = zip(original.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    x = (
        torch.randn(1, 30, 32),
        random_chain(30, torch.Generator().manual_seed(0))[None],
        torch.ones(1, 30, dtype=torch.bool),
    )
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(original(*x), loaded(*x), strict=True))


def test_tie_tolerance_is_stored_shown_in_the_card_and_used_after_loading(tmp_path):
    # Residue 0's two nearest neighbours, 5 and 9, are 1e-5 A apart (the later index nearer):
    # the option decides their order, so outputs tell whether the loaded encoder uses it.
    coords = torch.zeros(1, 12, 3)
    coords[0, :, 0] = torch.arange(12.0) * 3.0 + 6.0
    coords[0, 0] = 0.0
    coords[0, 5], coords[0, 9] = torch.tensor([4.00001, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    x = (
        torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0)),
        coords,
        torch.ones(1, 12, dtype=torch.bool),
    )
    banded = make_encoder(tiny_config(knn_tie_tolerance=1e-4), seed=5)
    directory = banded.save_pretrained(tmp_path / "export")
    assert "| `knn_tie_tolerance` | `0.0001` |" in (directory / "README.md").read_text()
    loaded = IPAEncoder.from_pretrained(directory)
    assert loaded.config.knn_tie_tolerance == 1e-4
    with torch.no_grad():
        assert torch.equal(loaded(*x).z_f1, banded(*x).z_f1)
        assert not torch.equal(loaded(*x).z_f1, make_encoder(tiny_config(), seed=5)(*x).z_f1)


def test_export_layout_and_metadata(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["architecture"] == "IPAEncoder" and config["format_version"] == 2 and config["dtype"] == "float32"
    assert config["config"] == tiny_config().to_dict() and "ipa_export_version" in config
    from safetensors import safe_open

    with safe_open(saved / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["architecture"] == "IPAEncoder"
    card = (saved / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: ipa-export" in front and "license: apache-2.0" in front and "- protein" in front
    assert "| `c_s` | `32` |" in card


def test_load_options(saved):
    loaded = IPAEncoder.from_pretrained(
        saved, dtype=torch.float64, attention="dense", expected={"c_s": 32, "z_factor_rank": 2}
    )
    assert loaded.config.attention == "dense" and next(loaded.parameters()).dtype == torch.float64


def test_attention_dtype_is_a_load_option(saved):
    """bf16 attention for a stored fp32 export, without rebuilding the model; any name of the
    dtype is accepted (stored as the short name); a misspelt dtype is the config's error naming
    the field."""
    fp32 = IPAEncoder.from_pretrained(saved)
    bf16 = IPAEncoder.from_pretrained(saved, attn_dtype="bf16")
    assert fp32.config.attn_dtype == "fp32" and bf16.config.attn_dtype == "bf16"
    assert bf16.config.replace(attn_dtype="fp32") == fp32.config
    g = torch.Generator().manual_seed(0)
    node_embed, coords = torch.randn(1, 40, 32, generator=g), random_chain(40, g)[None]
    mask = torch.ones(1, 40, dtype=torch.bool)
    with torch.no_grad():
        error = (bf16(node_embed, coords, mask).s - fp32(node_embed, coords, mask).s).abs().max().item()
    assert 0 < error < 0.05
    for name in ("bfloat16", "BF16", torch.bfloat16):
        assert IPAEncoder.from_pretrained(saved, attn_dtype=name).config == bf16.config
    with pytest.raises(ConfigCompatibilityError, match=r"attn_dtype: expected .*'bfloat16' / 'bf16'.*, got 'bfloat17'"):
        IPAEncoder.from_pretrained(saved, attn_dtype="bfloat17")
    with pytest.raises(ConfigCompatibilityError, match=r"attn_dtype: .*, got 'fp64'"):
        IPAEncoder.from_pretrained(saved, attn_dtype="fp64")  # not an attention dtype


def test_conversion_reproduces_golden_outputs(tmp_path):
    provenance = convert(CHECKPOINT, tmp_path / "converted")
    encoder = IPAEncoder.from_pretrained(tmp_path / "converted")
    assert encoder.config.frame_update_clip == "reference"
    for name in ("tiny_r2_unpadded", "tiny_r2_padded"):
        case = load_golden(name)
        x, mask = case.inputs, case.mask
        with torch.no_grad():
            out = encoder(x["node_embed"], x["translations"], mask, rotations=x["rotations"])
        for field, key in (
            ("s", "s_geo"),
            ("z_f1", "z_f1"),
            ("z_f2", "z_f2"),
            ("rotations", "rot_mats"),
            ("translations", "trans"),
        ):
            assert_close_at(getattr(out, field), case.outputs[key], mask, name=field)
    card = (tmp_path / "converted" / "README.md").read_text()
    assert (
        read_checkpoint(CHECKPOINT).sha256 in card and provenance["parity"].replace("|", "\\|") in card
    )  # escaped in the table
    assert provenance["parity"].startswith("max |export - source| = 0 ")


def test_conversion_rejects_config_that_disagrees_with_shapes(tmp_path):
    with pytest.raises(ConfigCompatibilityError, match=r"c_s: override says 128, the tensor shapes say 64"):
        convert(CHECKPOINT, tmp_path / "out", overrides={"c_s": 128})
    assert not (tmp_path / "out").exists()


def test_conversion_of_bare_state_dict_and_overrides(tmp_path):
    state = torch.load(CHECKPOINT, weights_only=True)["model_state_dict"]
    bare = {k: v for k, v in state.items() if k.startswith(("edge_embedder.", "ipa_module."))}
    torch.save(bare, tmp_path / "bare.pt")
    convert(tmp_path / "bare.pt", tmp_path / "out", overrides={"frame_update_clip": "clip", "dropout": 0.0})
    config = IPAEncoder.from_pretrained(tmp_path / "out").config
    assert (config.c_s, config.depth, config.frame_update_clip, config.dropout) == (64, 2, "clip", 0.0)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 3], lambda b: b""], ids=["truncated", "empty"])
def test_broken_checkpoint_is_a_clear_error_and_nothing_is_written(tmp_path, damage):
    path = tmp_path / "broken.pt"
    path.write_bytes(damage(CHECKPOINT.read_bytes()))
    with pytest.raises(ValueError, match=r"broken\.pt: not a readable PyTorch checkpoint"):
        convert(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt"]


def test_pickle_checkpoint_with_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match=r"refused: this checkpoint needs arbitrary unpickling"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="refused"):
        convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- validation on load: one failure per test, each naming its field -------------------------


def test_unknown_architecture(saved):
    edit_config(saved, architecture="Transformer")
    assert load_problems(saved) == ["architecture: expected 'IPAEncoder', got 'Transformer'"]


def test_newer_format_version_says_which_version_to_upgrade_to(saved):
    edit_config(saved, format_version=3, ipa_export_version="0.3.0")
    [problem] = load_problems(saved)
    assert problem.startswith("format_version: 3 is newer than this ipa_export") and "ipa-export>=0.3.0" in problem


def test_missing_field(saved):
    data = json.loads((saved / "config.json").read_text())
    del data["config"]["no_heads"]
    (saved / "config.json").write_text(json.dumps(data))
    assert load_problems(saved) == ["config.no_heads: missing field"]


def test_unknown_field(saved):
    edit_config(saved, **{"config.use_magic": True})
    assert load_problems(saved) == ["config.use_magic: unknown field"]


def test_mistyped_field(saved):
    edit_config(saved, **{"config.c_s": "32"})
    assert load_problems(saved) == ["config.c_s: must be an integer, got str '32'"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("z_factor_rank", -1, "config.z_factor_rank: must be >= 0, got -1"),
        ("no_heads", 0, "config.no_heads: must be positive, got 0"),
        ("c_p", 18, "config.c_p: must be divisible by 4 (the IPA projects it to c_p // 4), got 18"),
        ("knn_tie_tolerance", -1e-4, "config.knn_tie_tolerance: must be >= 0 Angstrom, got -0.0001"),
        (
            "attention",
            "xformers",
            "config.attention: must be one of ['auto', 'sdpa', 'flash_attn', 'dense'], got 'xformers'",
        ),
    ],
)
def test_value_out_of_range(saved, field, value, message):
    edit_config(saved, **{f"config.{field}": value})
    assert load_problems(saved) == [message]


def test_tensor_shape_disagrees_with_config(saved):
    weights = load_file(saved / "model.safetensors")
    weights["ipa_stack.final_norm.weight"] = torch.ones(33)
    save_file(weights, saved / "model.safetensors")
    assert load_problems(saved) == [  # the config field first, then the tensor
        "c_s: config says 32, the weights imply 33",
        "tensor ipa_stack.final_norm.weight: shape [33] disagrees with the config, which needs [32]",
    ]


def test_tensor_dtype_disagrees_with_config(saved):
    edit_config(saved, dtype="float16")
    problems = load_problems(saved)
    assert problems and all(p.endswith("dtype F32 disagrees with config dtype F16") for p in problems)


def test_missing_and_unexpected_tensors_are_listed_by_name(saved):
    weights = load_file(saved / "model.safetensors")
    del weights["edge_embedder.edge_embedder.0.bias"]
    weights["extra.head.weight"] = torch.zeros(2)
    save_file(weights, saved / "model.safetensors")
    assert load_problems(saved) == [
        "tensor edge_embedder.edge_embedder.0.bias: missing from model.safetensors",
        "tensor extra.head.weight: unexpected in model.safetensors",
    ]


def test_caller_expectations(saved):
    problems = load_problems(saved, expected={"c_s": 384, "z_factor_rank": 2, "colour": "red"})
    assert problems == ["c_s: the caller expects 384, the export has 32", "expected.colour: unknown config field"]


def test_all_problems_are_reported_together(saved):
    edit_config(saved, architecture="X", **{"config.no_heads": 0, "config.c_s": "big"})
    problems = load_problems(saved)
    assert any(p.startswith("architecture:") for p in problems) and any(p.startswith("config.c_s:") for p in problems)


# --- broken files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"\x00\x01garbage" * 10, id="corrupt"),
        pytest.param(lambda b: (10**9).to_bytes(8, "little") + b[8:], id="header-length-too-large"),
    ],
)
def test_broken_safetensors_is_a_clear_error(saved, damage):
    path = saved / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=r"model\.safetensors: (not a valid safetensors file|cannot read weights)"):
        IPAEncoder.from_pretrained(saved)


def test_config_that_is_not_json(saved):
    (saved / "config.json").write_text("{architecture: IPAEncoder")
    assert load_problems(saved)[0].startswith("config.json: not valid JSON")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{name}: missing from the export"):
        IPAEncoder.from_pretrained(saved)


def test_missing_directory_or_unknown_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="nowhere: no such export directory"):
        IPAEncoder.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="neither a local export directory nor a Hub repository") as caught:
        IPAEncoder.from_pretrained("org/not-cached", cache_dir=tmp_path, local_files_only=True)
    assert "\n" not in str(caught.value)


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch):
    """huggingface_hub's offline message spans lines; the error stays one line (the network call is faked)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: Name or service not known\nAn error happened while trying")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        IPAEncoder.from_pretrained("org/bindrae-ipa")
    assert str(caught.value) == (
        "org/bindrae-ipa: neither a local export directory nor a Hub repository that could be resolved "
        "(Got: ConnectError: Name or service not known An error happened while trying)"
    )


# --- atomic writes ----------------------------------------------------------------------------


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        make_encoder().save_pretrained(tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_existing_export_is_kept_unless_overwrite(saved, monkeypatch):
    before = (saved / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        make_encoder(seed=9).save_pretrained(saved)
    monkeypatch.setattr(export_module, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        make_encoder(seed=9).save_pretrained(saved, overwrite=True)
    assert (saved / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["export"]
    monkeypatch.undo()
    make_encoder(seed=9).save_pretrained(saved, overwrite=True)
    assert (saved / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["export"]


# --- Hugging Face cache -----------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_hub_cache(export: Path, hub_cache: Path, repo_id: str) -> Path:
    """The layout huggingface_hub keeps: blobs by hash, snapshots/<commit> symlinks, refs/main."""
    import hashlib

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for file in export.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_offline_load_by_repo_id_from_hf_cache(saved, tmp_path):
    hf_home = tmp_path / "hf_home"
    build_hub_cache(saved, hf_home / "hub", "org/bindrae-ipa")
    script = (
        "import torch; from ipa_export import IPAEncoder\n"
        "m = IPAEncoder.from_pretrained('org/bindrae-ipa')\n"
        "r = IPAEncoder.from_pretrained('org/bindrae-ipa', revision='main', local_files_only=True)\n"
        "same = torch.equal(m.ipa_stack.final_norm.weight, r.ipa_stack.final_norm.weight)\n"
        "print(sum(p.numel() for p in m.parameters()), same)\n"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = sum(p.numel() for p in make_encoder().parameters())
    assert result.stdout.split() == [str(expected), "True"]


def test_load_from_explicit_cache_dir(saved, tmp_path):
    build_hub_cache(saved, tmp_path / "cache", "org/bindrae-ipa")
    loaded = IPAEncoder.from_pretrained("org/bindrae-ipa", cache_dir=tmp_path / "cache", local_files_only=True)
    assert torch.equal(
        loaded.ipa_stack.final_norm.weight, IPAEncoder.from_pretrained(saved).ipa_stack.final_norm.weight
    )
    with pytest.raises(FileNotFoundError):
        IPAEncoder.from_pretrained(
            "org/bindrae-ipa", revision="v2", cache_dir=tmp_path / "cache", local_files_only=True
        )


def closed_port() -> str:
    """An endpoint on this machine that refuses connections (a port bound, never listened on)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def test_hub_failures_are_one_type(saved, tmp_path, monkeypatch):
    """Every Hub failure is a HubError: a download that finds no export (offline, real cache
    layout) also a FileNotFoundError, as before; an unreachable Hub on upload a ConnectionError.
    No network: the endpoint is a closed local port."""
    import huggingface_hub.constants

    from ipa_export.errors import HubConnectionError, HubError, HubNotFoundError

    build_hub_cache(saved, tmp_path / "cache", "org/bindrae-ipa")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo, revision in (("org/bindrae-ipa", "v2"), ("org/not-cached", None)):
        with pytest.raises(HubNotFoundError, match=f"{repo}: neither a local export directory") as caught:
            IPAEncoder.from_pretrained(repo, revision=revision, cache_dir=tmp_path / "cache", local_files_only=True)
        assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, HubError)

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed_port())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match="org/bindrae-ipa: neither a local export directory") as caught:
        IPAEncoder.from_pretrained("org/bindrae-ipa", cache_dir=tmp_path / "empty-cache")
    assert isinstance(caught.value, HubNotFoundError)  # nothing cached: no export found
    with pytest.raises(HubError, match="cannot upload to Hub repo org/bindrae-ipa: .*check the network") as caught:
        IPAEncoder.from_pretrained(saved).push_to_hub("org/bindrae-ipa", token="hf_fake")
    assert isinstance(caught.value, HubConnectionError) and isinstance(caught.value, ConnectionError)


def test_format_version_1_exports_still_load(saved, tmp_path):
    """Version 1 named the edge MLP ``edge_embedder.mlp.*``; such an export loads to the same model."""
    old = tmp_path / "v1"
    old.mkdir()
    weights = load_file(saved / "model.safetensors")
    renamed = {k.replace("edge_embedder.edge_embedder.", "edge_embedder.mlp."): v for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    save_file(renamed, old / "model.safetensors", metadata={"format": "pt", "architecture": "IPAEncoder"})
    config = json.loads((saved / "config.json").read_text()) | {"format_version": 1}
    (old / "config.json").write_text(json.dumps(config))
    current, legacy = IPAEncoder.from_pretrained(saved), IPAEncoder.from_pretrained(old)
    assert all(torch.equal(a, legacy.state_dict()[k]) for k, a in current.state_dict().items())
    with pytest.raises(ConfigCompatibilityError, match=r"tensor edge_embedder\.edge_embedder\.0\.bias: missing"):
        (old / "config.json").write_text(json.dumps(config | {"format_version": 2}))
        IPAEncoder.from_pretrained(old)
