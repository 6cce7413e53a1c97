"""Corpus embedding at cluster scale: workers write their own shards, the driver receives small
summaries, runs survive a lost node or driver, and inputs come from file-system URLs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import STRUCTURES

pa = pytest.importorskip("pyarrow")
pytest.importorskip("gemmi")
fsspec = pytest.importorskip("fsspec")
import pyarrow.parquet as pq  # noqa: E402

from ipa_export import load_embeddings  # noqa: E402
from ipa_export.structures.corpus import embed_corpus  # noqa: E402
from ipa_export.structures.inputs import collect_sources  # noqa: E402
from ipa_export.structures.local_engine import run_local  # noqa: E402
from ipa_export.structures.pipeline import Batching  # noqa: E402
from ipa_export.structures.ray_engine import Partition, RayJob, _to_run, embed_partition, partitions  # noqa: E402
from ipa_export.structures.storage import Location  # noqa: E402

SHIPPED = Path(__file__).parents[1] / "checkpoints" / "bindrae-ipa-tiny"
ROOT = Path(__file__).parents[1]
TENSORS = ("s", "rotations", "translations", "s_mean")
NAMES = ("1ahsA.pdb.gz", "3a4rA.pdb.gz", "two_chains.pdb", "2xcjA.cif")


def small_corpus(directory: Path, copies: int = 1) -> Path:
    """Real structures (PDB, gzipped PDB, mmCIF, a two-chain file) and one unreadable file."""
    directory.mkdir(parents=True)
    for copy in range(copies):
        for name in NAMES:
            shutil.copy(STRUCTURES / name, directory / f"c{copy}_{name}")
    (directory / "broken.pdb").write_text("not a structure\n")
    return directory


def records(directory: Path | str) -> dict[str, dict]:
    rows = list(load_embeddings(directory))
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate ids"
    return by_id


def assert_same_rows(got: dict[str, dict], want: dict[str, dict], exact: bool = False) -> None:
    assert set(got) == set(want)
    for rid, row in got.items():
        assert row["residue_ids"] == want[rid]["residue_ids"] and row["sequence"] == want[rid]["sequence"]
        for key in TENSORS:
            if exact:
                assert torch.equal(row[key], want[rid][key]), (rid, key)
            else:  # other batches and thread counts: the README's batching bound, 5e-5 x (1 + |value|)
                assert ((row[key] - want[rid][key]).abs() / (1 + want[rid][key].abs())).max() <= 5e-5, (rid, key)


def errors(directory: Path) -> list[dict]:
    return sorted(map(json.loads, (directory / "_errors.jsonl").read_text().splitlines()), key=str)


def job_for(local_run: Path, out: str) -> RayJob:
    """The job of a Ray run with the local run's export, schema (with its run identity) and budget."""
    schema = pq.read_schema(next(local_run.glob("part-*.parquet")))
    load = (("device", None), ("dtype", None), ("attention", None), ("compile", False))
    return RayJob(str(SHIPPED.resolve()), load, None, out, schema, Batching(8192, 64), run_local)


def test_each_partition_task_writes_its_own_shard_and_a_retry_rewrites_it(tmp_path):
    tree = small_corpus(tmp_path / "corpus")
    local = tmp_path / "local"
    embed_corpus(SHIPPED, [tree], local)
    out = tmp_path / "out"
    out.mkdir()
    parts = partitions(collect_sources([tree]), 2)
    job = job_for(local, str(out))
    payloads = [embed_partition(job, part) for part in parts]

    # every partition with rows has its own shard, named from the partition; the task returns
    # a summary of a few hundred bytes, not the embeddings
    summaries = [json.loads(p) for p in payloads]
    written = sorted(p.name for p in out.glob("part-*.parquet"))
    assert written == sorted(part.shard for part, s in zip(parts, summaries, strict=True) if s["rows"])
    assert len(written) == 3 and all(part.shard.startswith(f"part-{part.index:05d}-") for part in parts)
    shard_bytes = sum(p.stat().st_size for p in out.glob("part-*.parquet"))
    assert max(map(len, payloads)) < 600 and sum(map(len, payloads)) * 50 < shard_bytes
    assert sum(s["rows"] for s in summaries) == sum(pq.ParquetFile(p).metadata.num_rows for p in out.iterdir())
    assert sorted((f["source"], f["chain"], f["id"]) for s in summaries for f in s["failures"]) == sorted(
        (e["source"], e["chain"], e["id"]) for e in errors(local)
    )
    assert_same_rows(records(out), records(local))

    # a re-run skips partitions with a complete shard and no failure, and re-runs the one whose
    # file failed (failures are retried) without the ids of its own shard in its done set
    (failed,) = [part for part, s in zip(parts, summaries, strict=True) if s["failures"]]
    done = {rid: row["source"] for rid, row in records(out).items()}
    assert _to_run(parts, Location(str(out), "--out"), done) == [Partition(failed.index, failed.sources)]

    # Ray retries a task whose worker died: it rewrites the same shard, whole
    before = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    assert embed_partition(job, parts[0]) == payloads[0]
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_urls_for_inputs_manifest_node_embed_and_output(tmp_path):
    """memory:// inputs, manifest and node embeddings, file:// output; a task writing to memory://."""
    memory = fsspec.filesystem("memory")
    tree = small_corpus(tmp_path / "corpus")
    memory.put(str(tree), "/corpus", recursive=True)
    listed = STRUCTURES / "6kwc_openfold_pred.pdb.gz"
    memory.put_file(str(listed), "/listed/6kwc_openfold_pred.pdb.gz")
    memory.pipe_file("/lists/manifest.txt", b"../listed/6kwc_openfold_pred.pdb.gz\n")
    # node embeddings keyed by record id, as a Parquet file on the same file system
    local = tmp_path / "local"
    embed_corpus(SHIPPED, [tree, listed], local)
    g = torch.Generator().manual_seed(0)
    embeds = {rid: torch.randn(row["length"], 64, generator=g) for rid, row in records(local).items()}
    table = pa.table({"id": list(embeds), "node_embed": [e.tolist() for e in embeds.values()]})
    pq.write_table(table, tmp_path / "embeds.parquet")
    memory.put_file(str(tmp_path / "embeds.parquet"), "/embeds/node.parquet")
    shutil.copy(tmp_path / "embeds.parquet", tmp_path / "local-embeds.parquet")

    want = tmp_path / "want"
    embed_corpus(SHIPPED, [tree, listed], want, node_embed=tmp_path / "local-embeds.parquet")
    got = tmp_path / "got"
    summary = embed_corpus(SHIPPED, ["memory://corpus"], f"file://{got}", manifest="memory://lists/manifest.txt",
                           node_embed="memory://embeds/node.parquet")  # fmt: skip
    assert summary.out == got and (got / "_manifest.json").is_file()
    rows = records(got)
    assert_same_rows(rows, records(want), exact=True)  # same chains in the same order: the same batches
    assert rows["c0_1ahsA_A"]["source"] == "memory://corpus/c0_1ahsA.pdb.gz"
    (broken,) = errors(got)  # the unreadable file is named by its URL, not a temporary copy
    assert broken["source"] == "memory://corpus/broken.pdb" and "memory://corpus/broken.pdb" in broken["reason"]

    # a worker whose --out is an object store publishes its shard there in one put
    parts = partitions(collect_sources(["memory://corpus"]), 8)
    summary = json.loads(embed_partition(job_for(local, "memory://shards"), parts[0]))
    (shard,) = [p for p in memory.ls("/shards", detail=False)]
    assert shard.endswith(parts[0].shard) and summary["shard"] == parts[0].shard
    with memory.open(shard, "rb") as f:
        table = pq.read_table(f)
    assert sorted(table.column("id").to_pylist()) == sorted(r for r in records(local) if r.startswith("c0_"))
    memory.rm("/", recursive=True)


def test_object_store_out_needs_ray_workers(capsys):
    from ipa_export.cli import main

    code = main(["embed", str(SHIPPED), str(STRUCTURES / "1ahsA.pdb.gz"), "--out", "memory://embeddings"])
    assert code == 2
    assert "--out: memory://embeddings: an object-store output is written by Ray workers: pass --engine ray" in (
        capsys.readouterr().err
    )


def test_object_store_out_is_checked_and_resumed_like_a_directory(tmp_path):
    from ipa_export.structures.ray_engine import RemoteOut
    from ipa_export.structures.run_state import IDENTITY_KEYS

    memory = fsspec.filesystem("memory")
    local, tree = tmp_path / "local", small_corpus(tmp_path / "corpus")
    embed_corpus(SHIPPED, [tree], local)
    sources = collect_sources([tree])
    (shard,) = local.glob("part-*.parquet")
    identity = {k: v for k, v in json.loads((local / "_run.json").read_text()).items() if k != "inputs"}
    memory.put_file(str(shard), "/out/part-00000.parquet")
    memory.pipe_file("/out/_manifest.json", b"{}")
    remote = RemoteOut(Location("memory://out", "--out"))
    done = remote.prepare(identity, IDENTITY_KEYS, False, sources)  # resume
    assert done == {rid: row["source"] for rid, row in records(local).items()}
    run = json.loads(memory.cat_file("/out/_run.json"))
    assert {k: run[k] for k in identity} == identity and not memory.exists("/out/_manifest.json")
    assert (
        run["inputs"][str(tree / "c0_1ahsA.pdb.gz")]["sha256"]
        == hashlib.sha256((tree / "c0_1ahsA.pdb.gz").read_bytes()).hexdigest()
    )

    shutil.copy(STRUCTURES / "3a4rA.pdb.gz", tree / "c0_1ahsA.pdb.gz")  # an input changed since
    with pytest.raises(FileExistsError, match=r"1 input\(s\) changed since they were embedded .*c0_1ahsA.pdb.gz"):
        remote.prepare(identity, IDENTITY_KEYS, False, sources)
    other = {**identity, "dtype": "float64"}
    with pytest.raises(FileExistsError, match="memory://out holds embeddings of another run .different dtype."):
        remote.prepare(other, IDENTITY_KEYS, False, sources)
    assert remote.prepare(other, IDENTITY_KEYS, True, sources) == {}
    assert sorted(memory.ls("/out", detail=False)) == ["/out/_run.json"]  # the old run's files removed

    memory.pipe_file("/out/part-00001.parquet", (local / "_run.json").read_bytes())  # not ours
    with pytest.raises(FileExistsError, match="files this package did not write .part-00001.parquet."):
        remote.prepare(identity, IDENTITY_KEYS, True, sources)
    assert memory.exists("/out/part-00001.parquet")
    memory.rm("/", recursive=True)


# --- on Ray: slow, each starts Ray processes (all on 127.0.0.1) ----------------------------------


def _children(pid: int) -> set[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.ray
@pytest.mark.slow  # ~60 s: a Ray instance in a process that is killed, then another to resume
def test_killed_ray_driver_resumes_to_the_local_engine_result(tmp_path, ray_loopback):
    tree = small_corpus(tmp_path / "corpus", copies=4)
    whole = tmp_path / "whole"
    embed_corpus(SHIPPED, [tree], whole, batch_size=2)
    command = [sys.executable, "-m", "ipa_export", "embed", str(SHIPPED), str(tree), "--quiet", "--engine", "ray",
               "--batch-size", "2", "--shard-size", "2"]  # fmt: skip
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], cwd=ROOT)
    deadline = time.monotonic() + 300
    while len(list(killed.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    ray_processes = {pid: _command(pid) for pid in _children(process.pid)}
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards = sorted(killed.glob("part-*.parquet"))
    assert 2 <= len(shards) < 9, "the run should be killed partway"
    for shard in shards:  # every visible shard is complete
        pq.ParquetFile(shard).metadata  # noqa: B018 - raises for a truncated file
    assert not (killed / "_manifest.json").exists()
    footers = {p.name: json.loads(pq.ParquetFile(p).metadata.metadata[b"ipa_export.partition"]) for p in shards}
    kept = {p.name: p.stat().st_mtime_ns for p in shards if footers[p.name]["failures"] == 0}
    # the local Ray instance shares the driver's fate: its raylet and workers exit (so no task of
    # the killed run publishes a shard later); two idle agent processes linger and are ended here
    agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(p) for p, c in ray_processes.items() if not c.startswith(agents)):
        time.sleep(0.5)
    left = {pid: ray_processes[pid] for pid in ray_processes if _alive(pid)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert all(command.startswith(agents) for command in left.values()), left

    resumed = subprocess.run([*command, "--out", str(killed)], cwd=ROOT)
    assert resumed.returncode == 3  # the broken file is an error record again
    assert kept and {name: (killed / name).stat().st_mtime_ns for name in kept} == kept  # skipped, not redone
    assert_same_rows(records(killed), records(whole))
    assert errors(killed) == errors(whole)
    manifest = json.loads((killed / "_manifest.json").read_text())
    assert manifest["counts"]["records"] == 20 and sum(manifest["shards"].values()) == 20


@pytest.mark.ray
@pytest.mark.slow  # ~90 s: a three-node Ray cluster on this machine
def test_a_worker_node_removed_mid_run_is_retried_elsewhere(tmp_path, ray_loopback):
    from ray.cluster_utils import Cluster

    ray = ray_loopback
    tree = small_corpus(tmp_path / "corpus", copies=4)
    whole = tmp_path / "whole"
    embed_corpus(SHIPPED, [tree], whole, batch_size=2)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        out = tmp_path / "out"  # written as the URL local://...: the object-store code path, on this disk
        result: dict = {}

        def embed() -> None:
            try:
                result["summary"] = embed_corpus(SHIPPED, [tree], f"local://{out}", batch_size=2, shard_size=2,
                                                 engine="ray")  # fmt: skip
            except Exception as error:  # shown by the assertions below
                result["error"] = error

        run = threading.Thread(target=embed)
        run.start()
        deadline = time.monotonic() + 300
        while not list(out.glob("part-*.parquet")) and run.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.is_alive(), f"the run should still be going when the node is removed: {result}"
        cluster.remove_node(workers[1])
        run.join(timeout=600)
        assert "summary" in result, f"the run did not complete after the node was removed: {result}"
    finally:
        ray.shutdown()
        cluster.shutdown()
    summary = result["summary"]
    assert (summary.records, summary.errors) == (20, 1)
    assert_same_rows(records(out), records(whole))
    assert errors(out) == errors(whole)
    assert summary.driver_bytes < 300 * len(summary.shards)  # O(shards), not O(embeddings)
    assert (
        summary.out == f"local://{out}" and json.loads((out / "_manifest.json").read_text())["counts"]["records"] == 20
    )
