"""Writes never destroy what they do not own: refused targets, exclusive creation, kills
(real SIGKILL in a subprocess) recovered on the next write, real I/O errors, no leftovers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import CHECKPOINT, make_encoder

from ipa_export import IPAEncoder
from ipa_export.export import files

EXPORT_FILES = ["README.md", "config.json", "model.safetensors"]


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def cli(*argv, cwd: Path | None = None, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ipa_export.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        preexec_fn=preexec,
        timeout=300,
    )


@pytest.fixture
def saved(tmp_path) -> Path:
    return make_encoder(seed=5).save_pretrained(tmp_path / "export")


def test_convert_refuses_the_directory_holding_its_checkpoint_even_with_overwrite(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(CHECKPOINT, proj / "ckpt.pt")
    (proj / "notes.txt").write_text("mine")
    result = cli("convert", proj / "ckpt.pt", "--out", proj, "--overwrite")
    assert result.returncode == 2 and f"{proj}: holds the input {proj / 'ckpt.pt'}" in result.stderr
    assert listing(proj) == ["ckpt.pt", "notes.txt"] and listing(tmp_path) == ["proj"]


def test_a_directory_that_is_not_an_export_is_never_replaced(tmp_path, saved):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes: not an export directory \(it holds notes.txt\); refusing"):
        make_encoder().save_pretrained(notes, overwrite=True)
    (saved / "notes.txt").write_text("mine too")  # an export with a file of the user's
    with pytest.raises(FileExistsError, match=r"it holds notes.txt"):
        make_encoder().save_pretrained(saved, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        make_encoder().save_pretrained(tmp_path / "file", overwrite=True)
    (tmp_path / "link").symlink_to(saved)
    with pytest.raises(FileExistsError, match="is a symbolic link"):
        make_encoder().save_pretrained(tmp_path / "link", overwrite=True)
    assert (notes / "notes.txt").read_text() == "mine"
    assert listing(saved) == ["README.md", "config.json", "model.safetensors", "notes.txt"]
    assert listing(tmp_path) == ["export", "file", "link", "notes"]


def test_an_empty_directory_and_a_new_nested_one_are_valid_targets(tmp_path):
    (tmp_path / "empty").mkdir()
    make_encoder().save_pretrained(tmp_path / "empty")
    make_encoder().save_pretrained(tmp_path / "a" / "b")
    assert listing(tmp_path / "empty") == EXPORT_FILES and listing(tmp_path / "a" / "b") == EXPORT_FILES
    assert listing(tmp_path) == ["a", "empty"] and listing(tmp_path / "a") == ["b"]


def test_out_dot_fails_cleanly(saved):
    before = {name: (saved / name).read_bytes() for name in EXPORT_FILES}
    result = cli("convert", CHECKPOINT, "--out", ".", "--overwrite", cwd=saved)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{saved}: is the current directory (or holds it); write to another directory" in result.stderr
    assert {name: (saved / name).read_bytes() for name in EXPORT_FILES} == before
    assert listing(saved.parent) == ["export"]


def test_overwrite_replaces_an_export_and_leaves_nothing_else(saved):
    make_encoder(seed=9).save_pretrained(saved, overwrite=True)
    loaded = IPAEncoder.from_pretrained(saved)
    assert all((a == b).all() for a, b in zip(loaded.parameters(), make_encoder(seed=9).parameters(), strict=True))
    assert listing(saved.parent) == ["export"]


def test_a_real_io_error_is_one_line_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes the real write fail (EFBIG), as a full disk would (ENOSPC)."""

    def limit_file_size():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = cli("convert", CHECKPOINT, "--out", tmp_path / "a" / "export", preexec=limit_file_size)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "File too large" in result.stderr, result.stderr
    assert listing(tmp_path) == []


WRITER = textwrap.dedent(
    """
    import os, signal, sys, time
    import ipa_export.export.format as fmt
    from ipa_export import EncoderConfig, IPAEncoder
    target, mode = sys.argv[1], sys.argv[2]
    rename, save_file = os.rename, fmt.save_file
    def rename_then_die(src, dst):  # SIGKILL right after the old export was moved away
        rename(src, dst)
        if os.path.abspath(src) == os.path.abspath(target):
            os.kill(os.getpid(), signal.SIGKILL)
    def save_then_wait(*args, **kwargs):
        save_file(*args, **kwargs)
        print("writing", flush=True)
        time.sleep(120)
    if mode == "between":
        os.rename = rename_then_die
    else:
        fmt.save_file = save_then_wait
    config = EncoderConfig(c_s=32, c_p=16, feat_dim=16, c_hidden=8, no_heads=2, no_qk_points=3, no_v_points=4, depth=1)
    IPAEncoder(config).save_pretrained(target, overwrite=True)
    """
)


def start_writer(tmp_path: Path, target: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(target), mode], stdout=subprocess.PIPE, text=True)


def test_sigkill_between_the_two_renames_is_recovered_on_the_next_write(tmp_path):
    work = tmp_path / "work"
    saved = make_encoder(seed=5).save_pretrained(work / "export")
    before = (saved / "model.safetensors").read_bytes()
    writer = start_writer(tmp_path, saved, "between")
    assert writer.wait(timeout=120) == -signal.SIGKILL
    assert "export" not in listing(work)  # the old export is only under its temporary name
    with pytest.raises(FileExistsError, match="already exists"):  # put back first, then refused
        make_encoder(seed=9).save_pretrained(saved)
    assert listing(work) == ["export"] and (saved / "model.safetensors").read_bytes() == before
    make_encoder(seed=9).save_pretrained(saved, overwrite=True)
    assert listing(work) == ["export"] and (saved / "model.safetensors").read_bytes() != before


def test_concurrent_writer_fails_loudly_and_a_killed_one_is_cleaned_up(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    writer = start_writer(tmp_path, work / "export", "wait")
    try:
        assert writer.stdout.readline() == "writing\n"
        with pytest.raises(FileExistsError, match=r"export: another process is writing it"):
            make_encoder().save_pretrained(work / "export")
        result = cli("convert", CHECKPOINT, "--out", work / "export", "--overwrite")
        assert result.returncode == 2 and "another process is writing it" in result.stderr
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    assert len(listing(work)) == 1 and listing(work)[0].startswith(".export.ipa-export-tmp-")
    make_encoder().save_pretrained(work / "export")
    assert listing(work) == ["export"] and listing(work / "export") == EXPORT_FILES


def test_leftovers_holding_foreign_files_are_kept(tmp_path):
    stale = tmp_path / f".export.{files.TAG}-tmp-1-0123abcd"
    stale.mkdir()
    (stale / "notes.txt").write_text("mine")
    make_encoder().save_pretrained(tmp_path / "export")
    assert (stale / "notes.txt").read_text() == "mine"


def test_atomic_file_failure_keeps_the_previous_file(tmp_path):
    with files.atomic_file(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"one")
    with pytest.raises(OSError, match="disk full"):
        with files.atomic_file(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"tw")
            raise OSError(28, "disk full")
    assert listing(tmp_path) == ["x.bin"] and (tmp_path / "x.bin").read_bytes() == b"one"
    assert os.stat(tmp_path / "x.bin").st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_leftovers_of_earlier_versions_are_recovered_and_removed(tmp_path):
    """ipa_export <= 0.2 left .<name>.tmp-XXXXXXXX and .<name>.old-XXXXXXXX/<name> (mkdtemp)."""
    work = tmp_path / "work"
    saved = make_encoder(seed=5).save_pretrained(work / "export")
    before = (saved / "model.safetensors").read_bytes()
    (work / ".export.old-ab_cd123").mkdir()
    saved.rename(work / ".export.old-ab_cd123" / "export")  # killed between the two renames
    shutil.copytree(work / ".export.old-ab_cd123" / "export", work / ".export.tmp-x1y2z3w4")  # and a new one
    (work / ".export.tmp-k9k9k9k9").mkdir()
    (work / ".export.tmp-k9k9k9k9" / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="already exists"):  # put back first, then refused
        make_encoder(seed=9).save_pretrained(saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert listing(work) == [".export.tmp-k9k9k9k9", "export"]
