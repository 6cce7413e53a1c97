"""Errors a user meets first: each names the argument, what was expected and how to fix it;
the CLI prints the package's own errors in one line (exit 2, or 1 for a failed check) and
lets real bugs through with their traceback."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHECKPOINT, STRUCTURES

from ipa_export import IPAEncoder
from ipa_export.cli import main

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "checkpoints" / "bindrae-ipa-tiny"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("checkpoints/bindrae-ipa-tinyy", "the directory checkpoints/ exists here"),
        ("./export", "written as a local path"),
        ("exports/run1/", "written as a local path"),
        ("a/b/c", "not a Hub repo id either"),
        ("~/no-such-export", "written as a local path"),
    ],
)
def test_a_mistyped_local_path_is_never_sent_to_the_hub(name, reason, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was sent to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError) as error:
        IPAEncoder.from_pretrained(name)
    assert str(error.value).startswith(f"{name}: no such export directory (") and reason in str(error.value)


def test_a_near_miss_suggests_the_existing_export(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError, match=r"did you mean checkpoints/bindrae-ipa-tiny\?$"):
        IPAEncoder.from_pretrained("checkpoints/bindrae-ipa-tinyy")


def test_convert_a_structure_file_says_it_is_not_a_checkpoint(tmp_path, capsys):
    pdb = tmp_path / "1ahs.pdb"
    pdb.write_bytes(gzip.decompress((STRUCTURES / "1ahsA.pdb.gz").read_bytes()))
    for path, looks in ((pdb, "text starting 'ATOM "), (STRUCTURES / "1ahsA.pdb.gz", "gzip-compressed")):
        code = main(["convert", str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert f"{path}: not a PyTorch checkpoint: torch.save writes a zip archive" in err and looks in err
        assert "unpickling" not in err
    assert not (tmp_path / "out").exists()


def test_push_offline_is_one_line_and_exit_2(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code = main(["push", str(SHIPPED), "org/bindrae-ipa"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("ipa-export push: error: cannot upload to Hub repo org/bindrae-ipa: ")
    assert "HF_HUB_OFFLINE" in err


def test_push_without_a_network_is_one_line_and_exit_2(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    code = main(["push", str(SHIPPED), "org/bindrae-ipa"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("ipa-export push: error: cannot upload to Hub repo org/bindrae-ipa: ")
    assert err.rstrip().endswith("check the network, HF_ENDPOINT and your token (`hf auth login`)")


def test_inspect_into_a_closed_pipe_is_quiet():
    read, write = os.pipe()
    os.close(read)  # like `| head` that has already exited
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ipa_export", "inspect", str(SHIPPED)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode == 141


def test_real_bugs_are_not_reported_as_bad_input(monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr("ipa_export.export.format.read_header", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["inspect", str(SHIPPED)])


def test_convert_parity_failure_is_a_failed_check(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ipa_export.bindrae.convert.parity_check", lambda *args: 0.5)
    code = main(["convert", str(CHECKPOINT), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("ipa-export convert: error: conversion parity failed")
    assert not (tmp_path / "out").exists()


def test_version_flag(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"ipa-export {version('ipa-export')}\n"


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "ipa_export", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: ipa-export")
    assert all(command in result.stdout for command in ("convert", "inspect", "validate", "push", "embed"))
