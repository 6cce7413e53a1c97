"""Untrusted exports: nothing in an export or a Hub snapshot is executed, hostile files are
rejected cheaply with the field named, links out of an export are refused, non-finite
values never pass silently."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, make_encoder
from safetensors.torch import load_file, save_file
from torch.utils._appending_byte_serializer import AppendingByteSerializer, BytesWriter

from ipa_export import ConfigCompatibilityError, IPAEncoder
from ipa_export.cli import main
from ipa_export.config import raised_limits
from ipa_export.errors import UntrustedFileError
from ipa_export.export.compile_cache import compile_cache_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def saved(tmp_path) -> Path:
    return make_encoder(seed=5).save_pretrained(tmp_path / "export")


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IPA_EXPORT_CACHE", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


# --- compile caches ---------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: stands for any code a crafted cache could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_cache(path: Path, marker: Path) -> Path:
    """A file in torch's compile-cache format whose loading unpickles :class:`Payload`."""

    def write(writer: BytesWriter, item: tuple[str, str, bytes]) -> None:
        kind, key, content = item
        writer.write_str(kind)
        writer.write_uint64(1)
        writer.write_str(key)
        writer.write_bytes(content)

    serializer = AppendingByteSerializer(serialize_fn=write)
    serializer.append(("inductor", "fxplanted", pickle.dumps(Payload(marker))))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serializer.to_bytes())
    return path


def legacy_cache_file(export: Path) -> Path:
    """Where ipa_export <= 0.2 looked for a compile cache: inside the export."""
    return export / "compile_cache" / f"{re.sub(r'[^A-Za-z0-9.+_-]', '_', torch.__version__)}-cpu.bin"


def test_the_planted_cache_runs_code_when_torch_loads_it(tmp_path):
    """The reproducer works: loading it through torch does run the payload."""
    cache = plant_cache(tmp_path / "planted.bin", tmp_path / "PWNED")
    with pytest.raises(Exception):  # noqa: B017 - the payload is not a graph; it has run by then
        torch.compiler.load_cache_artifacts(cache.read_bytes())
    assert (tmp_path / "PWNED").exists()


def test_a_compile_cache_planted_in_an_export_never_runs(saved, tmp_path):
    marker = tmp_path / "PWNED"
    plant_cache(legacy_cache_file(saved), marker)
    IPAEncoder.from_pretrained(saved, compile=True)
    assert not marker.exists()


def test_a_compile_cache_planted_in_a_hub_snapshot_never_runs(saved, tmp_path):
    repo = tmp_path / "hub" / "models--org--bindrae-ipa"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "model.safetensors", "README.md"):
        data = (saved / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    marker = tmp_path / "PWNED"
    plant_cache(legacy_cache_file(snapshot), marker)
    IPAEncoder.from_pretrained("org/bindrae-ipa", cache_dir=tmp_path / "hub", local_files_only=True, compile=True)
    assert not marker.exists()


def test_an_explicit_cache_path_needs_the_trusted_code_flag(saved, tmp_path):
    marker = tmp_path / "PWNED"
    cache = plant_cache(tmp_path / "downloaded.bin", marker)
    with pytest.raises(UntrustedFileError, match=r"downloaded.bin: refusing to load a compile cache from outside"):
        IPAEncoder.from_pretrained(saved, compile=True, compile_cache=cache)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - trusted: it is loaded (and the payload runs)
        IPAEncoder.from_pretrained(saved, compile=True, compile_cache=cache, trust_compile_cache=True)
    assert marker.exists()


def test_a_cache_others_can_write_is_refused(saved, tmp_path):
    marker = tmp_path / "PWNED"
    cache = plant_cache(compile_cache_file(saved, "cpu"), marker)
    cache.chmod(0o666)
    with pytest.raises(UntrustedFileError, match=r"another user owns or can write \(owner uid \d+, mode 666\)"):
        IPAEncoder.from_pretrained(saved, compile=True)
    assert not marker.exists()


def test_caches_are_keyed_by_the_exports_content(saved, tmp_path, user_cache):
    cache = compile_cache_file(saved, "cpu")
    assert cache.parent == user_cache / "compile" and f"torch{torch.__version__}-cpu" in cache.name
    copy = Path(shutil.copytree(saved, tmp_path / "copy"))
    other = make_encoder(seed=6).save_pretrained(tmp_path / "other")
    assert compile_cache_file(copy, "cpu") == cache != compile_cache_file(other, "cpu")
    assert compile_cache_file(saved, "cuda") != cache


# --- hostile configs: rejected before anything is built, each naming its field ----------------


def edit_config(export: Path, edit) -> Path:
    data = json.loads((export / "config.json").read_text())
    edit(data)
    (export / "config.json").write_text(json.dumps(data))
    return export


def load_problems(export: Path) -> list[str]:
    with pytest.raises(ConfigCompatibilityError) as info:
        IPAEncoder.from_pretrained(export)
    return info.value.problems


LIMIT = "(the documented maximum; raise it with ipa_export.config.raised_limits({0}=...))"
HOSTILE_CONFIGS = {
    "depth=10^6": (
        lambda c: c["config"].update(depth=10**6),
        f"config.depth: must be <= 64 {LIMIT.format('depth')}, got 1000000",
    ),
    "c_s=10^9": (
        lambda c: c["config"].update(c_s=10**9),
        f"config.c_s: must be <= 8192 {LIMIT.format('c_s')}, got 1000000000",
    ),
    "c_s=2^63": (
        lambda c: c["config"].update(c_s=2**63),
        f"config.c_s: must be <= 8192 {LIMIT.format('c_s')}, got {2**63}",
    ),
    "no_heads=2^40": (
        lambda c: c["config"].update(no_heads=2**40),
        f"config.no_heads: must be <= 64 {LIMIT.format('no_heads')}, got {2**40}",
    ),
    "max_trans_update=NaN": (
        lambda c: c["config"].update(max_trans_update=float("nan")),
        "config.max_trans_update: must be a finite number, got nan",
    ),
    "max_rot_update_deg=inf": (
        lambda c: c["config"].update(max_rot_update_deg=float("inf")),
        "config.max_rot_update_deg: must be a finite number, got inf",
    ),
    "format_version=0": (
        lambda c: c.update(format_version=0),
        "format_version: expected a known version (1 to 2), got 0",
    ),
    "format_version=-5": (
        lambda c: c.update(format_version=-5),
        "format_version: expected a known version (1 to 2), got -5",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_CONFIGS, ids=list(HOSTILE_CONFIGS))
def test_hostile_config_values_are_named(saved, case):
    edit, message = HOSTILE_CONFIGS[case]
    assert load_problems(edit_config(saved, edit)) == [message]


def test_oversized_and_deeply_nested_config_json(saved):
    text = '{"pad": "' + "x" * (2 << 20) + '"}'
    (saved / "config.json").write_text(text)
    assert load_problems(saved) == [
        f"config.json: {len(text):,} bytes, more than the 1,048,576 an export's config may have"
    ]
    (saved / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert load_problems(saved) == ["config.json: nested too deeply"]
    (saved / "config.json").write_text('{"format_version": ' + "9" * 5000 + "}")
    assert load_problems(saved)[0].startswith("config.json: not valid JSON")


def test_oversized_safetensors_header_is_the_same_error_as_an_oversized_config(saved):
    """Both files are refused unread beyond their limit, as one ConfigCompatibilityError naming the file."""
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((32 << 20).to_bytes(8, "little") + data[8:])
    assert load_problems(saved) == [
        f"{path}: not a valid safetensors file (its header claims 33,554,432 bytes, more than the "
        "16,777,216 an export's header may have)"
    ]


def test_limits_are_raised_explicitly_and_the_header_is_compared_before_any_model_is_built(saved):
    edit_config(saved, lambda c: c["config"].update(depth=10**6))
    with raised_limits(depth=10**6):  # would take minutes and GBs if a (meta) model were built
        assert load_problems(saved) == ["depth: config says 1000000, the weights imply 2"]
    with pytest.raises(ValueError, match=r"raised_limits: no maximum for \['colour'\]"):
        with raised_limits(colour=3):
            pass


def test_config_weights_disagreement_names_the_field_first(saved):
    edit_config(saved, lambda c: c["config"].update(c_s=72))
    problems = load_problems(saved)
    assert problems[0] == "c_s: config says 72, the weights imply 32" and len(problems) == 1


def test_metadata_architecture_must_match(saved):
    weights = load_file(saved / "model.safetensors")
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt", "architecture": "Bogus"})
    assert load_problems(saved) == ["model.safetensors metadata architecture: expected 'IPAEncoder', got 'Bogus'"]


def test_symlinks_out_of_an_export_are_refused(saved, tmp_path):
    outside = tmp_path / "outside.json"
    (saved / "config.json").rename(outside)
    (saved / "config.json").symlink_to(outside)
    with pytest.raises(ValueError, match=r"config.json: refused: a symbolic link out of the export directory"):
        IPAEncoder.from_pretrained(saved)
    (saved / "config.json").unlink()
    (saved / "elsewhere.json").write_bytes(outside.read_bytes())
    (saved / "config.json").symlink_to("elsewhere.json")  # inside the export: fine
    IPAEncoder.from_pretrained(saved)


# --- non-finite values ------------------------------------------------------------------------


def test_non_finite_or_huge_inputs_at_valid_residues_are_errors():
    encoder = make_encoder()
    node_embed, coords = torch.randn(1, 20, 32), 10 * torch.randn(1, 20, 3)
    mask = torch.ones(1, 20, dtype=torch.bool)
    bad_embed = node_embed.clone()
    bad_embed[0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"node_embed: expected finite values at valid residues, .* \(0, 3\)"):
        encoder(bad_embed, coords, mask)
    bad_embed[0, 3, 5] = 1e30
    with pytest.raises(ValueError, match=r"node_embed: expected \|values\| <= 1e\+06 .* got 1e\+30 at .* \(0, 3\)"):
        encoder(bad_embed, coords, mask)
    far = coords.clone()
    far[0, 7] = 1e20
    with pytest.raises(ValueError, match=r"translations: expected \|values\| <= 1e\+05 .*Angstrom.* \(0, 7\)"):
        encoder(node_embed, far, mask)
    mask[0, 7] = False  # padding is ignored, whatever it holds
    assert torch.isfinite(encoder(node_embed, far, mask).s).all()


# --- malformed and non-finite checkpoints: one-line errors, nothing written --------------------


def damaged_checkpoint(tmp_path: Path, edit) -> Path:
    data = torch.load(CHECKPOINT, weights_only=True)
    edit(data["model_state_dict"], data)
    torch.save(data, tmp_path / "damaged.pt")
    return tmp_path / "damaged.pt"


EDGE, BLOCK = "edge_embedder.edge_embedder.", "ipa_module.ipa_blocks.0.ipa."
DAMAGED_CHECKPOINTS = {
    "1-D weight": (
        lambda s, d: s.update({EDGE + "linear_s_p.weight": torch.zeros(5)}),
        f"{EDGE}linear_s_p.weight: expected 2 non-empty dimension(s), got shape [5]",
    ),
    "zero heads": (
        lambda s, d: s.update({BLOCK + "linear_b.weight": torch.zeros(0, 16)}),
        f"{BLOCK}linear_b.weight: expected 2 non-empty dimension(s), got shape [0, 16]",
    ),
    "zero-wide features": (
        lambda s, d: s.update({EDGE + "linear_relpos.weight": torch.zeros(16, 0)}),
        f"{EDGE}linear_relpos.weight: expected 2 non-empty dimension(s), got shape [16, 0]",
    ),
    "a list for a tensor": (
        lambda s, d: s.update({BLOCK + "linear_q.weight": [1, 2]}),
        f"{BLOCK}linear_q.weight: expected a floating-point tensor, got list",
    ),
    "NaN weight": (
        lambda s, d: s[BLOCK + "linear_q.weight"].view(-1)[:3].fill_(float("nan")),
        f"{BLOCK}linear_q.weight: 3 non-finite value(s) (NaN or inf); the checkpoint is damaged",
    ),
    "NaN in its config": (
        lambda s, d: d.update(config={**d.get("config", {}), "max_trans_update": float("nan")}),
        "max_trans_update: must be a finite number, got nan",
    ),
    "finite weights, overflowing outputs": (
        lambda s, d: s[BLOCK + "linear_q.weight"].fill_(3e38),
        "conversion parity failed: the outputs are not finite (NaN or inf) on a random protein",
    ),
    "missing block": (
        lambda s, d: [s.pop(k) for k in list(s) if k.startswith("ipa_module.ipa_blocks.0.")],
        "ipa_module.ipa_blocks: block numbers [1] are not 0, 1, 2, ...",
    ),
}


@pytest.mark.parametrize("case", DAMAGED_CHECKPOINTS, ids=list(DAMAGED_CHECKPOINTS))
def test_damaged_checkpoints_are_one_line_errors_and_nothing_is_written(tmp_path, capsys, case):
    edit, message = DAMAGED_CHECKPOINTS[case]
    path = damaged_checkpoint(tmp_path, edit)
    failed_check = message.startswith("conversion parity failed")  # exit 1: a check failed; else 2: bad input
    assert main(["convert", str(path), "--out", str(tmp_path / "out")]) == (1 if failed_check else 2)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.pt"]


def test_non_finite_weights_in_an_export_are_refused_on_load(saved, capsys):
    weights = load_file(saved / "model.safetensors")
    weights["ipa_stack.final_norm.bias"][2] = float("inf")
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt", "architecture": "IPAEncoder"})
    with pytest.raises(
        ValueError, match=r"non-finite weights \(NaN or inf\) in 1 tensor\(s\): ipa_stack.final_norm.bias \(1\)"
    ):
        IPAEncoder.from_pretrained(saved)
    assert main(["validate", str(saved)]) == 2 and "non-finite weights" in capsys.readouterr().err


def test_a_model_card_linked_out_of_the_export_is_refused(saved, tmp_path):
    """push uploads README.md: a link to a private file must never be followed."""
    (tmp_path / "private.txt").write_text("secret")
    (saved / "README.md").unlink()
    (saved / "README.md").symlink_to(tmp_path / "private.txt")
    with pytest.raises(ValueError, match=r"README.md: refused: a symbolic link out of the export directory"):
        IPAEncoder.from_pretrained(saved)


def test_validate_fails_on_non_finite_outputs_of_finite_weights(tmp_path, capsys):
    encoder = make_encoder()
    with torch.no_grad():
        encoder.ipa_stack.ipa_blocks[0].ipa.linear_q.weight.fill_(3e38)  # finite, but q overflows
    export = encoder.save_pretrained(tmp_path / "export")
    assert main(["validate", str(export)]) == 1
    assert "max deviation inf (tolerance 0.001): FAILED" in capsys.readouterr().out


def test_duplicate_keys_in_config_json_are_refused_by_name(saved):
    text = (saved / "config.json").read_text()
    twice = text.replace('"max_trans_update":', '"max_trans_update": 99.0, "max_trans_update":', 1)
    (saved / "config.json").write_text(twice)
    assert load_problems(saved) == ["config.json: key 'max_trans_update' appears twice in one object"]
    (saved / "config.json").write_text(text[:-2] + ', "config": {}}\n')
    assert load_problems(saved) == ["config.json: key 'config' appears twice in one object"]


def test_a_version_1_export_holding_both_tensor_name_schemes_is_refused(saved):
    weights = load_file(saved / "model.safetensors")
    both = weights | {k.replace("edge_embedder.edge_embedder.", "edge_embedder.mlp."): v + 1 for k, v in weights.items()
                      if k.startswith("edge_embedder.edge_embedder.")}  # fmt: skip
    save_file(both, saved / "model.safetensors", metadata={"format": "pt", "architecture": "IPAEncoder"})
    edit_config(saved, lambda c: c.update(format_version=1))
    problems = load_problems(saved)
    assert problems[0].startswith("model.safetensors: holds tensors under both the version 1 name")
    assert "edge_embedder.mlp.0.bias" in problems[0] and "edge_embedder.edge_embedder.0.bias" in problems[0]
