"""Corpus embedding (`ipa-export embed`): inputs, Parquet shards, error records, resume, engines."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT, STRUCTURES

pa = pytest.importorskip("pyarrow")
gemmi = pytest.importorskip("gemmi")
import pandas as pd  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ipa_export import IPAEncoder, load_embeddings  # noqa: E402
from ipa_export.cli import main  # noqa: E402
from ipa_export.model import frames  # noqa: E402
from ipa_export.structures.batching import LengthBucketer  # noqa: E402
from ipa_export.structures.corpus import EmbedFailure, embed_corpus  # noqa: E402
from ipa_export.structures.reader import read_chains  # noqa: E402

SHIPPED = Path(__file__).parents[1] / "checkpoints" / "bindrae-ipa-tiny"
ROOT = Path(__file__).parents[1]
BATCHING_BOUND = 5e-5  #: README: a row equals its chain run alone within 5e-5 x (1 + |value|)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ca_only(source: Path, target: Path) -> Path:
    """A real chain with every atom but C-alpha removed: no residue has N, CA and C."""
    st = gemmi.read_structure(str(source))
    for res in st[0][0]:
        for name in ("N", "C", "O", "CB"):
            while res.find_atom(name, "*"):
                res.remove_atom(name, "*")
    st.write_pdb(str(target))
    return target


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    """A directory (PDB, .gz, a two-chain file, three broken files) and a manifest (mmCIF,
    a chain column) of real structures."""
    tree = tmp_path / "corpus"
    (tree / "nested").mkdir(parents=True)
    shutil.copy(STRUCTURES / "1ahsA.pdb.gz", tree)
    shutil.copy(STRUCTURES / "two_chains.pdb", tree / "nested")
    (tree / "empty.pdb").write_bytes(b"")
    (tree / "random.pdb.gz").write_bytes(gzip.compress(os.urandom(4000)))
    ca_only(STRUCTURES / "3a4rA.pdb.gz", tree / "nested" / "ca_only.pdb")
    (tree / "notes.txt").write_text("not a structure: ignored by the directory search\n")
    listed = tmp_path / "listed"
    listed.mkdir()
    shutil.copy(STRUCTURES / "2xcjA.cif", listed)
    shutil.copy(STRUCTURES / "two_chains.pdb", listed / "pair.pdb")
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("# comment\nlisted/2xcjA.cif\n\nlisted/pair.pdb\tB\n")
    return {"tree": tree, "manifest": manifest}


def direct(encoder: IPAEncoder, path: Path, chain: str, node_embed: torch.Tensor | None = None) -> dict:
    """The encoder on one chain alone (batch of 1, no padding, residue_index from the file's numbers)."""
    (backbone,) = read_chains(path, chain).backbones
    rotations, translations = frames.from_backbone(backbone.n, backbone.ca, backbone.c)
    embed = encoder.embed_residues(backbone.aatype) if node_embed is None else node_embed
    mask = torch.ones(1, len(backbone.sequence), dtype=torch.bool)
    with torch.no_grad():
        out = encoder(
            embed[None],
            translations[None],
            mask,
            rotations=rotations[None],
            residue_index=backbone.residue_index[None],
        )
    return {k: v[0] for k, v in out._asdict().items()} | {"sequence": backbone.sequence}


def test_directory_manifest_mixed_formats_and_error_records(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "embed", SHIPPED, corpus["tree"], "--manifest", corpus["manifest"], "--out", out)
    assert code == 3
    assert "5 chain(s) embedded" in stdout and "3 error(s)" in stdout

    frame = pd.read_parquet(out)  # the directory as it is: _manifest.json and _errors.jsonl are skipped
    assert sorted(frame["id"]) == ["1ahsA_A", "2xcjA_A", "pair_B", "two_chains_A", "two_chains_B"]
    assert list(frame.columns) == [
        "id", "source", "chain", "sequence", "residue_ids", "length", "s", "rotations", "translations", "s_mean"
    ]  # fmt: skip
    row = frame.set_index("id").loc["two_chains_B"]
    (chain_b,) = read_chains(STRUCTURES / "two_chains.pdb", "B").backbones
    assert row["chain"] == "B" and row["sequence"] == chain_b.sequence and row["length"] == 85
    assert list(row["residue_ids"]) == list(chain_b.residue_ids)
    assert row["source"] == str(corpus["tree"] / "nested" / "two_chains.pdb")
    assert frame.set_index("id").loc["pair_B", "source"] == "listed/pair.pdb"  # as written in the manifest
    assert pads.dataset(out, format="parquet").count_rows() == 5

    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    reasons = {Path(e["source"]).name: e["reason"] for e in errors}
    assert "empty file" in reasons["empty.pdb"]
    assert "not a PDB/mmCIF file" in reasons["random.pdb.gz"]
    assert "no residue with all of N, CA and C atoms" in reasons["ca_only.pdb"]
    assert next(e for e in errors if e["source"].endswith("ca_only.pdb"))["chain"] == "A"

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["records"] == 5 and manifest["counts"]["errors"] == 3
    assert manifest["shards"] == {"part-00000.parquet": 5}
    assert manifest["export"] == str(SHIPPED) and len(manifest["config_sha256"]) == 64


def test_values_equal_the_encoder_on_each_chain_alone(corpus, tmp_path):
    # A small residue budget: several batches of mixed lengths, and a chain (214) longer than it.
    out = tmp_path / "out"
    inputs = [STRUCTURES / "two_chains.pdb", STRUCTURES / "1ahsA.pdb.gz", STRUCTURES / "3a4rA.pdb.gz",
              STRUCTURES / "4ake_adk_open.pdb.gz", STRUCTURES / "2xcjA.cif"]  # fmt: skip
    summary = embed_corpus(SHIPPED, inputs, out, max_tokens=200, batch_size=2, shard_size=3,
                           outputs=["s", "rotations", "translations", "s_mean", "z_f1", "z_f2"])  # fmt: skip
    assert summary.records == 6 and summary.errors == 0 and len(summary.shards) == 2
    records = {r["id"]: r for r in load_embeddings(out)}
    encoder = IPAEncoder.from_pretrained(SHIPPED)
    expected_ids = {"two_chains_A": ("two_chains.pdb", "A"), "two_chains_B": ("two_chains.pdb", "B"),
                    "1ahsA_A": ("1ahsA.pdb.gz", "A"), "3a4rA_A": ("3a4rA.pdb.gz", "A"),
                    "4ake_adk_open": ("4ake_adk_open.pdb.gz", ""), "2xcjA_A": ("2xcjA.cif", "A")}  # fmt: skip
    assert set(records) == set(expected_ids)
    for rid, (name, chain) in expected_ids.items():
        want, got = direct(encoder, STRUCTURES / name, chain or None), records[rid]
        assert got["sequence"] == want["sequence"] and got["length"] == len(want["sequence"])
        for key in ("s", "rotations", "translations", "z_f1", "z_f2"):
            assert got[key].dtype == torch.float32
            # the README's stated bound: |batched - alone| <= 5e-5 x (1 + |alone|)
            assert ((got[key] - want[key]).abs() / (1 + want[key].abs())).max() <= BATCHING_BOUND, f"{rid} {key}"
        assert ((got["s_mean"] - want["s"].mean(0)).abs() / (1 + want["s"].mean(0).abs())).max() <= BATCHING_BOUND


def test_readers_see_the_same_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "out"
    embed_corpus(SHIPPED, [STRUCTURES / "two_chains.pdb", STRUCTURES / "3a4rA.pdb.gz"], out)
    records = {r["id"]: r for r in load_embeddings(out)}
    hf = datasets.load_dataset(
        "parquet", data_files=str(out / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    ).with_format("torch")
    assert sorted(hf["id"]) == sorted(records) == ["3a4rA_A", "two_chains_A", "two_chains_B"]
    for row in hf:
        assert torch.equal(row["s"], records[row["id"]]["s"])
        assert torch.equal(row["rotations"], records[row["id"]]["rotations"])


def test_fail_fast_stops_at_the_first_error(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "embed", SHIPPED, corpus["tree"], "--out", out, "--fail-fast")
    assert code == 1 and "empty.pdb" in err and "empty file" in err
    assert not (out / "_manifest.json").exists()  # the run did not complete
    with pytest.raises(EmbedFailure, match="empty file"):
        embed_corpus(SHIPPED, [corpus["tree"]], tmp_path / "api", fail_fast=True)


def test_record_id_clashes_are_listed_before_any_work(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(STRUCTURES / "1ahsA.pdb.gz", tmp_path / "a")
    shutil.copy(STRUCTURES / "2xcjA.cif", tmp_path / "b" / "1ahsA.cif")
    code, _, err = run(capsys, "embed", SHIPPED, tmp_path / "a", tmp_path / "b", "--out", tmp_path / "out")
    assert code == 2 and "would not be unique" in err
    assert str(tmp_path / "a" / "1ahsA.pdb.gz") in err and str(tmp_path / "b" / "1ahsA.cif") in err
    assert not (tmp_path / "out").exists()


def test_bad_arguments_exit_2(tmp_path, capsys):
    code, _, err = run(capsys, "embed", SHIPPED, tmp_path / "missing.pdb", "--out", tmp_path / "out")
    assert code == 2 and f"{tmp_path / 'missing.pdb'}: no such file or directory" in err
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY")
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURES / "1ahsA.pdb.gz", "--out", tmp_path / "o",
                       "--node-embed", tmp_path / "x.npy")  # fmt: skip
    assert code == 2 and "--node-embed" in err and "unsupported format '.npy'" in err and "Traceback" not in err
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURES / "1ahsA.pdb.gz", "--out", tmp_path / "o",
                       "--outputs", "s,bogus")  # fmt: skip
    assert code == 2 and "--outputs: unknown ['bogus']" in err
    assert not (tmp_path / "o").exists()


def test_resume_skips_done_records_and_refuses_another_export(tmp_path, capsys):
    out = tmp_path / "out"
    inputs = [STRUCTURES / "two_chains.pdb", STRUCTURES / "3a4rA.pdb.gz"]
    first = embed_corpus(SHIPPED, inputs[:1], out)
    before = {r["id"]: r["s"] for r in load_embeddings(out)}
    second = embed_corpus(SHIPPED, inputs, out)  # the same run, one more input
    assert (first.records, second.records, second.skipped) == (2, 1, 2)
    after = {r["id"]: r for r in load_embeddings(out)}
    assert sorted(after) == ["3a4rA_A", "two_chains_A", "two_chains_B"]
    assert all(torch.equal(after[k]["s"], v) for k, v in before.items())

    other = tmp_path / "other-export"
    assert main(["convert", str(CHECKPOINT), "--out", str(other), "--residue-embedding-seed", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    code, _, err = run(capsys, "embed", other, *inputs, "--out", out)
    assert code == 2 and "another run (different weights_sha256)" in err and "--overwrite" in err
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    code, _, _ = run(capsys, "embed", other, *inputs, "--out", out, "--overwrite")
    assert code == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes only what embed wrote
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet"]
    assert json.loads((out / "_manifest.json").read_text())["export"] == str(other)


def test_foreign_files_named_like_shards_are_never_touched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "part-00000.parquet")
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURES / "3a4rA.pdb.gz", "--out", out, "--overwrite")
    assert code == 2 and "files this package did not write (part-00000.parquet)" in err
    assert pq.read_table(out / "part-00000.parquet").column("x").to_pylist() == [1]


@pytest.mark.slow  # ~50 s: kills a real embedding process and resumes it
def test_killed_run_resumes_to_the_same_ids_and_values(tmp_path):
    tree = tmp_path / "many"
    tree.mkdir()
    names = ["1ahsA.pdb.gz", "3a4rA.pdb.gz", "4ake_adk_open.pdb.gz", "6kwc_openfold_pred.pdb.gz"]
    for copy in range(4):
        for name in names:
            shutil.copy(STRUCTURES / name, tree / f"c{copy}_{name}")
    command = [sys.executable, "-m", "ipa_export", "embed", str(SHIPPED), str(tree), "--quiet",
               "--batch-size", "1", "--shard-size", "2"]  # fmt: skip
    whole = tmp_path / "whole"
    embed_corpus(SHIPPED, [tree], whole, batch_size=1, shard_size=2)  # the same command, uninterrupted

    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while len(list(killed.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards = sorted(killed.glob("part-*.parquet"))
    assert 2 <= len(shards) < 8, "the run should be killed partway"
    for shard in shards:  # every visible shard is complete
        assert pq.ParquetFile(shard).metadata.num_rows == 2
    assert not (killed / "_manifest.json").exists()

    subprocess.run([*command, "--out", str(killed)], check=True, cwd=ROOT)
    assert not list(killed.glob(".part-*"))  # temporary files of the killed run are gone
    want = {r["id"]: r for r in load_embeddings(whole)}
    got = [r for r in load_embeddings(killed)]
    assert len(got) == len(want) == 16 and {r["id"] for r in got} == set(want)
    for record in got:
        for key in ("s", "rotations", "translations", "s_mean"):
            assert torch.equal(record[key], want[record["id"]][key])
    assert json.loads((killed / "_manifest.json").read_text())["counts"]["records"] == 16


def test_node_embeddings_from_a_directory_safetensors_or_parquet(tmp_path):
    converted = tmp_path / "export"  # no residue table: node embeddings are required
    assert main(["convert", str(CHECKPOINT), "--out", str(converted)]) == 0
    encoder = IPAEncoder.from_pretrained(converted)
    inputs = [STRUCTURES / "two_chains.pdb", STRUCTURES / "3a4rA.pdb.gz"]
    g = torch.Generator().manual_seed(0)
    embeds = {"two_chains_A": torch.randn(79, 64, generator=g), "two_chains_B": torch.randn(85, 64, generator=g),
              "3a4rA_A": torch.randn(79, 64, generator=g)}  # fmt: skip
    per_chain = tmp_path / "per_chain"
    per_chain.mkdir()
    for rid, tensor in embeds.items():
        save_file({"node_embed": tensor}, per_chain / f"{rid}.safetensors")
    save_file(embeds, tmp_path / "keyed.safetensors")
    pq.write_table(
        pa.table({"id": list(embeds), "node_embed": [t.tolist() for t in embeds.values()]}), tmp_path / "keyed.parquet"
    )
    for source in (per_chain, tmp_path / "keyed.safetensors", tmp_path / "keyed.parquet"):
        out = tmp_path / f"out-{source.name}"
        summary = embed_corpus(converted, inputs, out, node_embed=source)
        assert summary.records == 3 and summary.errors == 0
        for record in load_embeddings(out):
            path = STRUCTURES / ("two_chains.pdb" if record["id"].startswith("two") else "3a4rA.pdb.gz")
            want = direct(encoder, path, record["chain"], embeds[record["id"]])
            torch.testing.assert_close(record["s"], want["s"], atol=1e-5, rtol=1e-5)

    save_file(
        {"two_chains_A": embeds["two_chains_A"], "two_chains_B": torch.randn(84, 64)}, tmp_path / "bad.safetensors"
    )
    summary = embed_corpus(converted, inputs, tmp_path / "bad", node_embed=tmp_path / "bad.safetensors")
    assert (summary.records, summary.errors) == (1, 2)
    reasons = {
        e["id"]: e["reason"] for e in map(json.loads, (tmp_path / "bad" / "_errors.jsonl").read_text().splitlines())
    }
    assert "record 'two_chains_B': expected a float tensor of shape [L=85, c_s=64]" in reasons["two_chains_B"]
    assert "has no node embeddings for record '3a4rA_A'" in reasons["3a4rA_A"]


def test_length_buckets_respect_the_budget_and_keep_every_chain():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 700, (500,), generator=g).tolist()
    bucketer: LengthBucketer[int] = LengthBucketer(max_tokens=2048, batch_size=16)
    batches = [b for i, n in enumerate(lengths) for b in bucketer.add(i, n)] + list(bucketer.flush())
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 16 and (len(batch) == 1 or len(batch) * longest <= 2048)
        assert longest <= 1.25 * min(lengths[i] for i in batch) or longest <= 32
    assert bucketer.pending == 0


@pytest.mark.ray
@pytest.mark.slow  # ~30 s: starts a local Ray cluster
def test_ray_engine_matches_the_local_engine(corpus, tmp_path):
    ray = pytest.importorskip("ray")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    a = embed_corpus(SHIPPED, [corpus["tree"]], local, manifest=corpus["manifest"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        b = embed_corpus(SHIPPED, [corpus["tree"]], on_ray, manifest=corpus["manifest"], engine="ray")
        assert embed_corpus(SHIPPED, [corpus["tree"]], on_ray, manifest=corpus["manifest"], engine="ray").skipped == 5
    finally:
        ray.shutdown()
    assert (a.records, a.errors) == (b.records, b.errors) == (5, 3)
    want = {r["id"]: r for r in load_embeddings(local)}
    got = {r["id"]: r for r in load_embeddings(on_ray)}
    assert set(got) == set(want)
    for rid, record in got.items():
        assert record["residue_ids"] == want[rid]["residue_ids"] and record["source"] == want[rid]["source"]
        for key in ("s", "rotations", "translations", "s_mean"):  # other batches: the stated batching bound
            assert ((record[key] - want[rid][key]).abs() / (1 + want[rid][key].abs())).max() <= BATCHING_BOUND
    assert pq.read_schema(next(on_ray.glob("part-*.parquet"))) == pq.read_schema(next(local.glob("part-*.parquet")))
    local_errors = sorted(map(json.loads, (local / "_errors.jsonl").read_text().splitlines()), key=str)
    assert sorted(map(json.loads, (on_ray / "_errors.jsonl").read_text().splitlines()), key=str) == local_errors


def test_reader_gives_every_chain_with_its_own_residue_numbers_and_chain_ids():
    chains = read_chains(STRUCTURES / "two_chains.pdb")
    assert [b.chain for b in chains.backbones] == ["A", "B"] and chains.failures == []
    st = gemmi.read_structure(str(STRUCTURES / "two_chains.pdb"))
    for backbone, chain in zip(chains.backbones, st[0], strict=True):
        numbers = [res.seqid.num for res in chain if res.find_atom("CA", "*")]
        assert backbone.residue_numbers.tolist() == numbers and backbone.residue_numbers.dtype == torch.int64
        assert backbone.chain_ids == (chain.name,) * len(numbers)
    assert chains.backbones[0].residue_numbers[0].item() == -4  # 3a4rA starts at -4: real numbering


def test_reader_names_what_is_wrong_with_a_file(tmp_path):
    random = tmp_path / "random.pdb.gz"
    random.write_bytes(gzip.compress(os.urandom(4000)))
    with pytest.raises(ValueError, match=r"random\.pdb\.gz: not a PDB/mmCIF file"):
        read_chains(random)
    with pytest.raises(IsADirectoryError, match="is a directory, expected a structure file"):
        read_chains(tmp_path)
    (tmp_path / "empty.cif").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.cif: empty file"):
        read_chains(tmp_path / "empty.cif")


def test_progress_bar_shows_chains_rate_and_errors_and_quiet_prints_nothing(corpus, tmp_path, capsys):
    embed_corpus(SHIPPED, [corpus["tree"]], tmp_path / "bar", progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert bar.startswith("embed: 100%") and "5/5 [" in bar  # files done / total
    assert "chains=3" in bar and "res_per_s=" in bar and "errors=3" in bar
    code, out, err = run(capsys, "embed", SHIPPED, corpus["tree"], "--out", tmp_path / "quiet", "--quiet")
    assert code == 3 and out == "" and err == ""


def test_dtype_is_part_of_the_run_and_outputs_stay_float32(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(capsys, "embed", SHIPPED, STRUCTURES / "3a4rA.pdb.gz", "--out", out, "--dtype", "bfloat16")
    assert code == 0 and json.loads((out / "_manifest.json").read_text())["dtype"] == "bfloat16"
    (record,) = load_embeddings(out)
    want = direct(IPAEncoder.from_pretrained(SHIPPED), STRUCTURES / "3a4rA.pdb.gz", "A")
    assert record["s"].dtype == torch.float32 and not torch.equal(record["s"], want["s"])
    assert (record["s"] - want["s"]).abs().mean() < 0.05  # bf16 layers, fp32 geometry
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURES / "3a4rA.pdb.gz", "--out", out)
    assert code == 2 and "(different dtype 'bfloat16' there, 'float32' now)" in err
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURES / "3a4rA.pdb.gz", "--out", out, "--dtype", "int8")
    assert code == 2 and "--dtype: expected a floating torch.dtype or its name" in err


@pytest.mark.slow
def test_compiled_encoder_gives_the_eager_rows(tmp_path):
    inputs = [STRUCTURES / "two_chains.pdb", STRUCTURES / "1ahsA.pdb.gz"]
    embed_corpus(SHIPPED, inputs, tmp_path / "eager")
    embed_corpus(SHIPPED, inputs, tmp_path / "compiled", compile=True)
    eager = {r["id"]: r for r in load_embeddings(tmp_path / "eager")}
    for record in load_embeddings(tmp_path / "compiled"):
        for key in ("s", "rotations", "translations", "s_mean"):
            torch.testing.assert_close(record[key], eager[record["id"]][key], atol=1e-4, rtol=1e-4)
    assert len(eager) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs attention='flash_attn' to fail, as it does without CUDA")
def test_a_run_that_failed_before_any_shard_does_not_block_the_corrected_rerun(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURES / "1ahsA.pdb.gz", "--out", out, "--attention", "flash_attn")
    assert code == 2 and "--attention flash_attn needs flash-attn installed" in err
    assert not out.exists()  # no _run.json, no lock: the run created the directory and removed it again
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's directory: the failed run leaves it as it was
    assert run(capsys, "embed", SHIPPED, STRUCTURES / "1ahsA.pdb.gz", "--out", out, "--attention", "flash_attn")[0] == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURES / "1ahsA.pdb.gz", "--out", out)
    assert code == 0, err
    assert [r["id"] for r in load_embeddings(out)] == ["1ahsA_A"]


def test_a_refused_resume_names_what_differs(tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "embed", SHIPPED, STRUCTURES / "1ahsA.pdb.gz", "--out", out)[0] == 0
    code, _, err = run(
        capsys, "embed", SHIPPED, STRUCTURES / "1ahsA.pdb.gz", "--out", out, "--attention", "dense", "--outputs", "s"
    )
    assert (
        code == 2
        and (
            "holds embeddings of another run (different attention 'auto' there, 'dense' now; "
            "outputs ['s', 'rotations', 'translations', 's_mean'] there, ['s'] now); pass --overwrite"
        )
        in err
    )


def test_dtype_names_and_attention_dtype_are_embed_options(tmp_path, capsys):
    # The dtype names of from_pretrained (bf16, ...), and the attention dtype, recorded in the run.
    out = tmp_path / "out"
    code, _, err = run(capsys, "embed", SHIPPED, STRUCTURES / "1ahsA.pdb.gz", "--out", out, "--dtype", "bf16",
                       "--attn-dtype", "bf16")  # fmt: skip
    assert code == 0, err
    recorded = json.loads((out / "_run.json").read_text())
    assert recorded["dtype"] == "bfloat16" and recorded["config"]["attn_dtype"] == "bf16"
    (record,) = load_embeddings(out)
    assert record["s"].dtype == torch.float32 and torch.isfinite(record["s"]).all()


def test_an_id_clash_says_the_fix_that_works(tmp_path, capsys):
    # Two files with one stem need a rename (ids are <stem>_<chain>, a manifest cannot change them);
    # one file given twice is listed once.
    shutil.copy(STRUCTURES / "2xcjA.cif", tmp_path)
    shutil.copy(STRUCTURES / "2xcjA.pdb.gz", tmp_path)
    code, _, err = run(capsys, "embed", SHIPPED, tmp_path, "--out", tmp_path / "o")
    assert code == 2 and err.rstrip().endswith(
        f"2xcjA: {tmp_path / '2xcjA.cif'}, {tmp_path / '2xcjA.pdb.gz'} (rename one)."
    )
    cif = tmp_path / "2xcjA.cif"
    code, _, err = run(capsys, "embed", SHIPPED, cif, cif, "--out", tmp_path / "o")
    assert code == 2 and err.rstrip().endswith(
        f"2xcjA: {cif}, {cif} (list the file once, or once per chain with a manifest chain column)."
    )
