"""Corpus embedding keeps every input: a bad chain, a full disk, a concurrent run, a changed
file or odd residue numbering never drop, mix up or keep stale records silently."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import STRUCTURES

pa = pytest.importorskip("pyarrow")
pytest.importorskip("gemmi")
import pyarrow.parquet as pq  # noqa: E402

from ipa_export import load_embeddings  # noqa: E402
from ipa_export.cli import main  # noqa: E402

SHIPPED = Path(__file__).parents[1] / "checkpoints" / "bindrae-ipa-tiny"


def atom_lines(name: str) -> list[str]:
    """The ATOM records of a real structure in tests/data/structures."""
    path = STRUCTURES / name
    text = gzip.decompress(path.read_bytes()).decode() if name.endswith(".gz") else path.read_text()
    return [line for line in text.splitlines() if line.startswith("ATOM")]


def with_chain(lines: list[str], chain: str) -> list[str]:
    return [line[:21] + chain + line[22:] for line in lines]


def with_xyz(line: str, xyz: tuple[str, str, str]) -> str:
    """An ATOM line with its coordinate fields (columns 31-54) replaced by the given texts."""
    return line[:30] + "".join(f"{v:>8}" for v in xyz) + line[54:]


def write_pdb(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- a bad chain is an error record; the rest of its batch is written ----------------------------


def test_nan_and_degenerate_chains_are_error_records_and_their_batch_is_written(tmp_path, capsys):
    good = atom_lines("3a4rA.pdb.gz")
    nan = with_chain(good, "B")
    nan[10] = with_xyz(nan[10], ("nan", "1.0", "2.0"))
    degenerate = with_chain(good, "C")  # N, CA and C of one residue at one point: no frame
    for i, line in enumerate(degenerate):
        if line[22:26].strip() == "-2" and line[12:16].strip() in ("N", "CA", "C"):
            degenerate[i] = with_xyz(line, ("9999.999",) * 3)
    path = write_pdb(tmp_path / "mixed.pdb", good + nan + degenerate + with_chain(good, "D"))
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "embed", SHIPPED, path, "--out", out, "--batch-size", "8")
    assert code == 3, stderr
    assert sorted(r["id"] for r in load_embeddings(out)) == ["mixed_A", "mixed_D"]
    reasons = {e["id"]: e for e in errors(out)}
    assert set(reasons) == {"mixed_B", "mixed_C"}
    assert reasons["mixed_B"]["chain"] == "B" and reasons["mixed_B"]["source"] == str(path)
    assert "finite" in reasons["mixed_B"]["reason"]
    assert "rotation" in reasons["mixed_C"]["reason"]
    # A re-run resumes: the good rows stay, the bad chains are tried again and fail again.
    code, stdout, _ = run(capsys, "embed", SHIPPED, path, "--out", out, "--batch-size", "8")
    assert code == 3 and "2 already done" in stdout and len(errors(out)) == 2


# --- a full disk never publishes a broken shard; the next run resumes -----------------------------

INPUTS = [STRUCTURES / n for n in ("two_chains.pdb", "3a4rA.pdb.gz", "1ahsA.pdb.gz", "4ake_adk_open.pdb.gz")]


def assert_only_whole_shards_and_resume(out: Path, stderr: str, capsys) -> None:
    """After a failed write: one error line, every visible shard is valid Parquet with whole
    records, no temporary file is left, and a re-run completes the directory."""
    assert stderr.count("\n") == 1 and "part-" in stderr and "Traceback" not in stderr
    shards = sorted(out.glob("part-*.parquet"))
    for shard in shards:
        assert pq.ParquetFile(shard).metadata.num_rows == 2
    # (a run whose first shard failed removes its state, and the directory it made)
    assert not out.exists() or not [p.name for p in out.iterdir() if p.name.startswith(".")]
    done = len(shards) * 2
    code, stdout, stderr = run(capsys, "embed", SHIPPED, *INPUTS, "--out", out, "--shard-size", "2", "--batch-size",
                               "2", "--outputs", "s,z_f1,z_f2")  # fmt: skip
    assert code == 0, stderr
    assert f"{done} already done" in stdout
    assert sorted(r["id"] for r in load_embeddings(out)) == sorted(
        ["two_chains_A", "two_chains_B", "3a4rA_A", "1ahsA_A", "4ake_adk_open"]
    )


def test_a_file_size_limit_fails_the_write_without_publishing_a_truncated_shard(tmp_path, capsys):
    import resource
    import signal

    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, hard))
    try:
        code, _, stderr = run(capsys, "embed", SHIPPED, *INPUTS, "--out", out, "--shard-size", "2", "--batch-size",
                              "2", "--outputs", "s,z_f1,z_f2")  # fmt: skip
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2 and "File too large" in stderr
    assert_only_whole_shards_and_resume(out, stderr, capsys)


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KB tmpfs mounted for the test (root only; skipped where mounting is not allowed),
    and a function that resizes it."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs privileges")
    try:
        yield mount, lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_the_write_without_publishing_a_truncated_shard(small_disk, capsys):
    disk, resize = small_disk
    out = disk / "out"
    code, _, stderr = run(capsys, "embed", SHIPPED, *INPUTS, "--out", out, "--shard-size", "2", "--batch-size", "2",
                          "--outputs", "s,z_f1,z_f2")  # fmt: skip
    assert code == 2 and "No space left on device" in stderr
    resize("4m")
    assert_only_whole_shards_and_resume(out, stderr, capsys)


# --- every residue with N, CA and C is kept, in file order; residue_index strictly increases -------


def renumbered(lines: list[str], number) -> list[str]:
    """ATOM lines with residue k (in file order) numbered ``number(k)`` -> (number, insertion code)."""
    out, key, k = [], None, -1
    for line in lines:
        if line[22:27] != key:
            key, k = line[22:27], k + 1
        num, icode = number(k)
        out.append(line[:22] + f"{num:>4}{icode or ' '}" + line[27:])
    return out


def backbone_residues(lines: list[str]) -> int:
    return len({line[22:27] for line in lines if line[12:16].strip() == "CA"})


def test_restarted_and_repeated_numbers_keep_every_residue_in_file_order(tmp_path, caplog):
    from ipa_export.structures.reader import read_chains

    lines = atom_lines("3a4rA.pdb.gz")
    count = backbone_residues(lines)
    (whole,) = read_chains(STRUCTURES / "3a4rA.pdb.gz").backbones
    cases = {
        "restart": renumbered(lines + lines, lambda k: (k % count + 1, "")),  # 1..79, 1..79
        "twice": renumbered(lines, lambda k: (k // 2 + 1, "")),  # 1, 1, 2, 2, ... (names differ or not)
        "wraps": renumbered(lines, lambda k: ((k + 9990) % 10000, "")),  # ... 9998, 9999, 0, 1, ...
    }
    for name, text in cases.items():
        caplog.clear()
        (chain,) = read_chains(write_pdb(tmp_path / f"{name}.pdb", text)).backbones
        assert "numbering" in caplog.text and "kept in file order" in caplog.text, name
        expected = 2 * count if name == "restart" else count
        assert len(chain.sequence) == expected, name
        torch.testing.assert_close(chain.ca[:count], whole.ca, atol=0, rtol=0)  # file order, nothing merged
        index = chain.residue_index
        assert (index[1:] > index[:-1]).all(), name


def test_insertion_codes_and_gaps_in_the_encoder_residue_index(tmp_path):
    from ipa_export.structures.reader import read_chains

    lines = atom_lines("3a4rA.pdb.gz")
    # 100, 100A, 100B, 100C, 101, then a gap of 10 (111, 112, ...)
    numbers = [(100, ""), (100, "A"), (100, "B"), (100, "C"), (101, "")]
    text = renumbered(lines, lambda k: numbers[k] if k < 5 else (106 + k, ""))
    (chain,) = read_chains(write_pdb(tmp_path / "icodes.pdb", text)).backbones
    assert chain.residue_ids[:5] == ("A:100", "A:100A", "A:100B", "A:100C", "A:101")
    assert chain.residue_numbers[:6].tolist() == [100, 100, 100, 100, 101, 111]
    # one step per inserted residue; a real gap stays a gap (101 -> 111: +10)
    assert chain.residue_index[:7].tolist() == [100, 101, 102, 103, 104, 114, 115]
    assert len(chain.sequence) == backbone_residues(lines)


def test_the_embedded_rows_of_a_restarted_chain_hold_every_residue(tmp_path, capsys):
    lines = atom_lines("3a4rA.pdb.gz")
    count = backbone_residues(lines)
    path = write_pdb(tmp_path / "restart.pdb", renumbered(lines + lines, lambda k: (k % count + 1, "")))
    code, _, stderr = run(capsys, "embed", SHIPPED, path, "--out", tmp_path / "out")
    assert code == 0, stderr
    (record,) = load_embeddings(tmp_path / "out")
    assert record["length"] == 2 * count and record["s"].shape[0] == 2 * count


# --- one writer per --out ------------------------------------------------------------------------


def test_a_second_run_into_a_locked_directory_fails_at_start_and_a_dead_holder_does_not_block(tmp_path, capsys):
    import subprocess
    import sys

    from ipa_export.structures.run_state import output_lock

    out = tmp_path / "out"
    with output_lock(out):  # another run writing out (this process, through its own open file)
        code, _, stderr = run(capsys, "embed", SHIPPED, STRUCTURES / "3a4rA.pdb.gz", "--out", out)
    assert code == 2 and f"another embed is writing {out} (pid {os.getpid()})" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["_lock"]  # nothing written by the refused run

    holder = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); os.abort()"
    assert subprocess.run([sys.executable, "-c", holder, str(out / "_lock")]).returncode < 0  # died holding it
    code, _, stderr = run(capsys, "embed", SHIPPED, STRUCTURES / "3a4rA.pdb.gz", "--out", out)
    assert code == 0, stderr
    assert [r["id"] for r in load_embeddings(out)] == ["3a4rA_A"]


@pytest.mark.slow
def test_two_concurrent_embeds_into_one_out_lose_nothing(tmp_path):
    # Two real processes race for one --out: one is refused at start naming the other's pid, or
    # (if the first finished before the second began) the second resumes; every record is kept.
    import subprocess
    import sys

    out, inputs = tmp_path / "out", [str(STRUCTURES / name) for name in ("3a4rA.pdb.gz", "1ahsA.pdb.gz", "2xcjA.cif")]
    command = [sys.executable, "-m", "ipa_export", "embed", str(SHIPPED), *inputs, "--out", str(out), "--quiet"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    if codes == [0, 2]:
        refused = next(stderr for code, stderr in results if code == 2)
        assert f"another embed is writing {out} (pid " in refused
    assert sorted(r["id"] for r in load_embeddings(out)) == ["1ahsA_A", "2xcjA_A", "3a4rA_A"]


# --- ids unique by construction -----------------------------------------------------------------


def test_a_file_whose_stem_is_another_files_record_id_is_refused_before_any_work(tmp_path, capsys):
    write_pdb(tmp_path / "prot.pdb", atom_lines("3a4rA.pdb.gz"))  # chain A -> prot_A
    write_pdb(tmp_path / "prot_A.pdb", with_chain(atom_lines("3a4rA.pdb.gz"), " "))  # no chain id -> prot_A
    code, _, stderr = run(capsys, "embed", SHIPPED, tmp_path / "prot.pdb", tmp_path / "prot_A.pdb", "--out",
                          tmp_path / "out")  # fmt: skip
    assert code == 2 and "prot_A" in stderr and "prot.pdb" in stderr and "prot_A.pdb" in stderr
    assert not (tmp_path / "out").exists()
    # no clash when the other file has no such chain
    write_pdb(tmp_path / "prot_B.pdb", with_chain(atom_lines("3a4rA.pdb.gz"), " "))
    code, _, stderr = run(capsys, "embed", SHIPPED, tmp_path / "prot.pdb", tmp_path / "prot_B.pdb", "--out",
                          tmp_path / "out")  # fmt: skip
    assert code == 0, stderr


def test_a_resumed_run_does_not_take_an_id_of_another_source_as_done(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_pdb(tmp_path / "a" / "prot.pdb", atom_lines("3a4rA.pdb.gz"))
    write_pdb(tmp_path / "b" / "prot.pdb", with_chain(atom_lines("1ahsA.pdb.gz"), "A"))
    out = tmp_path / "out"
    assert run(capsys, "embed", SHIPPED, tmp_path / "a" / "prot.pdb", "--out", out)[0] == 0
    code, stdout, _ = run(capsys, "embed", SHIPPED, tmp_path / "b" / "prot.pdb", "--out", out)
    assert code == 3, stdout
    (error,) = errors(out)
    assert error["id"] == "prot_A" and "already taken by" in error["reason"] and str(tmp_path / "a") in error["reason"]
    (record,) = load_embeddings(out)
    assert record["source"] == str(tmp_path / "a" / "prot.pdb")


# --- inputs hashed: a changed input is embedded again, never kept stale ----------------------------


def test_a_changed_input_replaces_its_old_rows_on_resume(tmp_path, capsys):
    path = write_pdb(tmp_path / "prot.pdb", atom_lines("3a4rA.pdb.gz"))
    other = write_pdb(tmp_path / "other.pdb", atom_lines("1ahsA.pdb.gz"))
    out = tmp_path / "out"
    assert run(capsys, "embed", SHIPPED, path, other, "--out", out)[0] == 0
    before = {r["id"]: r for r in load_embeddings(out)}
    stat = path.stat()
    write_pdb(path, with_chain(atom_lines("1ahsA.pdb.gz"), "A"))  # now other.pdb's chain
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: the content decides
    code, stdout, stderr = run(capsys, "embed", SHIPPED, path, other, "--out", out)
    assert code == 0, stderr
    after = {r["id"]: r for r in load_embeddings(out)}
    assert sorted(after) == sorted(before) == ["other_A", "prot_A"]
    assert after["prot_A"]["length"] == before["other_A"]["length"] != before["prot_A"]["length"]
    torch.testing.assert_close(after["prot_A"]["s"], before["other_A"]["s"], atol=1e-5, rtol=1e-5)
    assert torch.equal(after["other_A"]["s"], before["other_A"]["s"])  # untouched
    recorded = json.loads((out / "_run.json").read_text())["inputs"][str(path)]
    assert recorded["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    assert recorded["size"] == path.stat().st_size and recorded["mtime_ns"] == stat.st_mtime_ns


# --- bounded decompression -------------------------------------------------------------------------


def test_a_structure_past_the_decompression_cap_is_an_error_record(tmp_path, capsys):
    text = ("\n".join(atom_lines("3a4rA.pdb.gz")) + "\n").encode()
    bomb = tmp_path / "bomb.pdb.gz"
    bomb.write_bytes(gzip.compress(text + b"REMARK 999" + b" " * 70 + b"\n" * 3_000_000, 9))
    assert bomb.stat().st_size < 30_000
    out = tmp_path / "out"
    code, _, stderr = run(capsys, "embed", SHIPPED, bomb, STRUCTURES / "3a4rA.pdb.gz", "--out", out,
                          "--max-structure-bytes", "1000000")  # fmt: skip
    assert code == 3, stderr
    (error,) = errors(out)
    assert error["source"] == str(bomb) and "more than 1,000,000 bytes" in error["reason"]
    assert "--max-structure-bytes" in error["reason"]
    assert [r["id"] for r in load_embeddings(out)] == ["3a4rA_A"]
    code, _, _ = run(capsys, "embed", SHIPPED, bomb, STRUCTURES / "3a4rA.pdb.gz", "--out", out)  # default 256 MB
    assert code == 0 and sorted(r["id"] for r in load_embeddings(out)) == ["3a4rA_A", "bomb_A"]


# --- --overwrite removes only what embed wrote -----------------------------------------------------


def test_overwrite_never_removes_a_users_own_run_or_manifest_file(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_run.json").write_text('{"mine": true}')
    (out / "_manifest.json").write_text('{"mine": true}')
    code, _, stderr = run(capsys, "embed", SHIPPED, STRUCTURES / "3a4rA.pdb.gz", "--out", out, "--overwrite")
    assert code == 2 and "did not write (_run.json, _manifest.json)" in stderr
    assert (out / "_run.json").read_text() == (out / "_manifest.json").read_text() == '{"mine": true}'


# --- inputs: symbolic links and special files -----------------------------------------------------


def test_symlinked_directories_are_searched_once_and_odd_paths_are_named(tmp_path):
    from ipa_export.structures.inputs import collect_sources

    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    tree.mkdir()
    elsewhere.mkdir()
    (elsewhere / "a.pdb").write_text("ATOM\n")
    (tree / "b.pdb").write_text("ATOM\n")
    (tree / "linked").symlink_to(elsewhere)
    (elsewhere / "back").symlink_to(tree)  # a loop: tree/linked/back -> tree
    found = [s.path.relative_to(tree).as_posix() for s in collect_sources([tree])]
    assert found == ["b.pdb", "linked/a.pdb"]

    os.mkfifo(tmp_path / "pipe.pdb")
    with pytest.raises(FileNotFoundError, match=r"pipe\.pdb: a FIFO \(named pipe\)"):
        collect_sources([tmp_path / "pipe.pdb"])
    (tmp_path / "loop.pdb").symlink_to(tmp_path / "loop.pdb")
    with pytest.raises(FileNotFoundError, match=r"loop\.pdb: a symbolic link loop"):
        collect_sources([tmp_path / "loop.pdb"])
    (tmp_path / "dangling.pdb").symlink_to(tmp_path / "gone.pdb")
    with pytest.raises(FileNotFoundError, match=r"dangling\.pdb: a broken symbolic link"):
        collect_sources([tmp_path / "dangling.pdb"])
