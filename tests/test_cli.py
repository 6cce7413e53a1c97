"""The ipa-export command line, end to end on the shipped export and real structures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, STRUCTURES

from ipa_export import IPAEncoder, load_embeddings
from ipa_export.cli import main
from ipa_export.structures.reader import read_backbone

SHIPPED = Path(__file__).parents[1] / "checkpoints" / "bindrae-ipa-tiny"
STRUCTURE = STRUCTURES / "1ahsA.pdb.gz"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "export"
    assert main(["convert", str(CHECKPOINT), "--out", str(out)]) == 0
    return out


def test_convert_then_validate(converted, capsys):
    code, out, _ = run(capsys, "validate", converted, "--expect", "c_s=64", "--expect", "z_factor_rank=2")
    assert code == 0 and "SE(3)-invariance self-check: max deviation" in out and out.rstrip().endswith("ok")


def test_convert_refuses_to_overwrite(converted, capsys):
    code, _, err = run(capsys, "convert", CHECKPOINT, "--out", converted)
    assert code == 2 and "already exists" in err and "--overwrite" in err


def test_validate_fails_on_unmet_expectation(converted, capsys):
    # An unmet expectation is a failed check (exit 1); a mistyped field name is bad input (exit 2).
    code, _, err = run(capsys, "validate", converted, "--expect", "c_s=384")
    assert code == 1 and "--expect: c_s: the caller expects 384, the export has 64" in err
    code, _, err = run(capsys, "validate", converted, "--expect", "cs=64")
    assert code == 2 and "--expect: cs: unknown config field (did you mean 'c_s'?)" in err


def test_validate_fails_when_the_self_check_fails(converted, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ipa_export.cli.se3_self_check", lambda encoder: 0.5)
    code, out, _ = run(capsys, "validate", converted)
    assert code == 1 and out.rstrip().endswith("FAILED")


def test_inspect_reads_the_header_only(capsys):
    code, out, _ = run(capsys, "inspect", SHIPPED, "--json")
    info = json.loads(out)
    model = IPAEncoder.from_pretrained(SHIPPED)
    assert code == 0 and info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["tensors"]["residue_embedding.weight"] == {"shape": [21, 64], "dtype": "F32"}
    assert info["config"] == model.config.to_dict() and info["metadata"]["format"] == "pt"
    code, out, _ = run(capsys, "inspect", SHIPPED)
    assert code == 0 and "parameters: 353,964 in 73 tensors" in out and "ipa_stack.final_norm.weight" in out


def test_embed_real_structures_with_the_shipped_export(tmp_path, capsys):
    # The README's main-job command: two files -> one Parquet shard, one row per chain.
    structures = [STRUCTURE, STRUCTURES / "4ake_adk_open.pdb.gz"]
    code, out, _ = run(capsys, "embed", SHIPPED, *structures, "--out", tmp_path)
    assert code == 0 and "2 chain(s) embedded" in out and "0 error(s)" in out
    records = {r["id"]: r for r in load_embeddings(tmp_path)}
    backbone = read_backbone(STRUCTURES / "4ake_adk_open.pdb.gz")  # a file without chain ids
    length = len(backbone.sequence)
    record = records["4ake_adk_open"]
    assert sorted(records) == ["1ahsA_A", "4ake_adk_open"] and record["chain"] == ""
    assert record["s"].shape == (length, 64) and record["rotations"].shape == (length, 3, 3)
    assert record["sequence"] == backbone.sequence and record["residue_ids"] == list(backbone.residue_ids)
    rotations = record["rotations"]
    torch.testing.assert_close(
        rotations @ rotations.transpose(-1, -2), torch.eye(3).expand(length, 3, 3), atol=1e-5, rtol=0
    )


def test_embed_without_node_embeddings_needs_a_residue_table(converted, tmp_path, capsys):
    code, _, err = run(capsys, "embed", converted, STRUCTURE, "--out", tmp_path / "out")
    assert code == 2 and "--node-embed: required, because this export has no residue-type embedding table" in err
    assert not (tmp_path / "out").exists()


def test_push_dry_run_makes_no_network_call(capsys, monkeypatch):
    from huggingface_hub import HfApi

    def no_network(*args, **kwargs):
        raise AssertionError("network call in a dry run")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    monkeypatch.setattr(HfApi, "upload_folder", no_network)
    code, out, _ = run(capsys, "push", SHIPPED, "org/bindrae-ipa", "--dry-run", "--private", "--revision", "dev")
    size = (SHIPPED / "model.safetensors").stat().st_size
    assert (
        code == 0
        and "org/bindrae-ipa (revision dev, private=True" in out
        and f"model.safetensors  {size:,} bytes" in out
    )


def test_push_uploads_the_export_folder(capsys, monkeypatch):
    """The one test that fakes the network: only HfApi's two remote calls are replaced,
    for the CLI and for IPAEncoder.push_to_hub."""
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create_repo", (repo_id, kw))
    )

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())}
        return type("CommitInfo", (), {"commit_url": "https://hub.example/org/bindrae-ipa/commit/1"})()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    code, out, _ = run(capsys, "push", SHIPPED, "org/bindrae-ipa", "--create-pr", "--commit-message", "tiny export")
    assert code == 0 and "commit/1" in out
    assert calls["create_repo"] == ("org/bindrae-ipa", {"private": None, "exist_ok": True})
    upload = calls["upload_folder"]
    assert (
        upload["repo_id"] == "org/bindrae-ipa"
        and upload["create_pr"] is True
        and upload["commit_message"] == "tiny export"
    )
    assert upload["files"] == ["README.md", "config.json", "model.safetensors"]

    encoder = IPAEncoder.from_pretrained(SHIPPED)
    url = encoder.push_to_hub("org/other", private=True, revision="dev")
    assert url.endswith("commit/1") and calls["upload_folder"]["files"] == upload["files"]
    assert calls["upload_folder"]["revision"] == "dev" and calls["upload_folder"]["repo_id"] == "org/other"


@pytest.mark.parametrize("command", ["convert", "inspect", "validate", "push", "embed"])
def test_help_for_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:  # in-process: no interpreter and torch import per command
        main([command, "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: ipa-export {command}")


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "ipa-export"  # installed next to this interpreter
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "convert" in result.stdout and "embed" in result.stdout


def test_help_and_usage_errors_do_not_import_torch():
    # `ipa-export --help` and a mistyped option answer at once: torch is imported by the commands.
    code = (
        "import sys\n"
        "from ipa_export.cli import main\n"
        "for argv in (['--help'], ['embed', '--help'], ['embed', 'e', 'x', '--ouput', 'o']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr
    assert "``" not in result.stdout  # no reStructuredText markup in the help


@pytest.mark.parametrize(
    "typo, hint",
    [("--ouput", "(did you mean --outputs or --out?)"), ("--output", "(did you mean --outputs or --out?)")],
)
def test_a_mistyped_option_is_named_not_taken_for_another(typo, hint, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["embed", str(SHIPPED), str(STRUCTURE), "--out", str(tmp_path / "o"), typo, "s"])
    assert exit_.value.code == 2 and f"unrecognized option {typo} {hint}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_is_one_line_with_the_resume_hint_and_the_rerun_resumes(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "out"
    inputs = [str(p) for p in sorted(STRUCTURES.glob("*.pdb.gz"))]
    command = [sys.executable, "-m", "ipa_export", "embed", str(SHIPPED), *inputs, "--out", str(out), "--quiet"]
    run_ = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "_lock").exists() and run_.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the run holds its output lock: past start-up, inside the command
    run_.send_signal(signal.SIGINT)
    stderr = run_.communicate(timeout=120)[1]
    if run_.returncode == 0:  # finished before the signal arrived: nothing to check
        pytest.skip("the run finished before SIGINT")
    assert run_.returncode == 130
    assert stderr.strip().splitlines() == [
        "ipa-export embed: interrupted (finished shards are kept: re-run the same command to resume)"
    ]
    assert subprocess.run(command, timeout=300).returncode == 0
    assert len(list(load_embeddings(out, columns=["id"]))) == len(inputs)
    assert os.listdir(out)  # the resumed run completed the directory


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_errors_name_flags_not_python_parameters(capsys, tmp_path):
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURE, "--out", tmp_path / "o", "--device", "cuda")
    assert code == 2
    assert err.startswith("ipa-export embed: error: --device: 'cuda' is not available here")
    assert "pass --device cpu," in err and "device='cpu'" not in err


def test_inspect_of_a_directory_that_is_not_an_export_says_so(capsys):
    code, _, err = run(capsys, "inspect", STRUCTURES)
    assert code == 2 and err.strip() == (
        f"ipa-export inspect: error: {STRUCTURES}: not an export (no config.json, no model.safetensors); "
        "an export is what save_pretrained or `ipa-export convert` writes"
    )
