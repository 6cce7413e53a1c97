"""Corpus embedding throughput, pipeline efficiency and memory (``ipa-export embed``).

The corpus: the real structures of ``tests/data/structures`` (single-chain ``*.pdb.gz``), each
copy cropped to a random contiguous segment (40 to all residues) and moved by a random rigid
motion, written as ``.pdb.gz`` files. Each measurement runs in its own process, so that its
peak RSS (``ru_maxrss``) covers that run only.

- ``throughput``: ``embed_corpus`` (local engine) with the usage document's config (c_s 384,
  c_p 128, rank 2, depth 3, random weights plus a residue table), fp32, on ``--chains`` chains:
  chains/s, residues/s, peak RSS. Then, in the same process, the same batches (the bucketer
  replayed on the same chains in the same order) through bare ``encoder(...)`` calls, inputs
  prepared in advance: efficiency = pipeline residues/s / bare residues/s (1.0 = parsing,
  batching and writing fully hidden), and the largest |difference| between the Parquet rows and
  the encoder run on each chain alone.
- ``memory``: peak RSS of ``embed_corpus`` with the shipped tiny export on 20, 200 and 2,000
  files of the same length distribution (the first 20 / 200 files of the 2,000). 20 chains do
  not fill one batch of the default budget; 200 and 2,000 run full batches.
- ``ray``: the throughput corpus with ``--engine ray`` on a Ray cluster on this machine
  (``ray.cluster_utils.Cluster``: a head node without CPUs for the driver, two worker nodes of
  one CPU each, all on 127.0.0.1), started before the timed run: residues/s (and per CPU, beside
  the local engine's on this machine's CPUs), the driver's peak RSS, the bytes of task results
  the driver received, and the bytes of the shards the workers wrote.

    python bench/corpus.py                      # everything; --chains 1000 by default
    python bench/corpus.py --only throughput
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402, F401
import torch  # noqa: E402
from _common import USAGE_CONFIG, machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STRUCTURES = ROOT / "tests" / "data" / "structures"
TINY = ROOT / "checkpoints" / "bindrae-ipa-tiny"


def make_corpus(directory: Path, count: int, seed: int = 0) -> Path:
    """``count`` cropped, randomly moved copies of the real test structures, as .pdb.gz."""
    import gemmi

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sources = sorted(STRUCTURES.glob("*.pdb.gz"))
    for i in range(count):
        st = gemmi.read_structure(str(sources[i % len(sources)]))
        st.setup_entities()
        st.remove_ligands_and_waters()
        st.remove_hydrogens()
        chain = st[0][0]
        n = len(chain)
        length = int(torch.randint(min(40, n), n + 1, (1,), generator=g))
        start = int(torch.randint(0, n - length + 1, (1,), generator=g))
        for index in reversed(range(n)):
            if not start <= index < start + length:
                del chain[index]
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
        q = q * torch.linalg.det(q)
        shift = 50 * torch.randn(3, generator=g, dtype=torch.float64)
        rotation = gemmi.Mat33(q.tolist())
        st[0].transform_pos_and_adp(gemmi.Transform(rotation, gemmi.Vec3(*shift.tolist())))
        st.write_pdb(str(directory / f"s{i:05d}.pdb"))
    subprocess.run(["gzip", "-f", *map(str, sorted(directory.glob("*.pdb")))], check=True)
    return directory


def usage_export(directory: Path) -> Path:
    from ipa_export import EncoderConfig, IPAEncoder

    torch.manual_seed(0)
    encoder = IPAEncoder(EncoderConfig(**USAGE_CONFIG, num_residue_types=21))
    encoder.save_pretrained(directory)
    return directory


def child(args: argparse.Namespace) -> dict:
    """One measured run, in this process."""
    from ipa_export import IPAEncoder, embed_corpus, load_embeddings

    kwargs = json.loads(args.kwargs)
    cluster = start_cluster(args.nodes) if args.nodes else None
    started = time.perf_counter()
    try:
        summary = embed_corpus(args.export, [args.corpus], args.out, progress=False, **kwargs)
        seconds = time.perf_counter() - started
    finally:
        if cluster is not None:
            import ray

            threads = ray.get(ray.remote(num_cpus=1)(_torch_threads).remote())
            ray.shutdown()
            cluster.shutdown()
    result: dict = {
        "chains": summary.records,
        "residues": summary.residues,
        "errors": summary.errors,
        "seconds": seconds,
        "chains_per_s": summary.records / seconds,
        "residues_per_s": summary.residues / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpus": torch.get_num_threads(),
    }
    if args.nodes:
        result |= {
            "cpus": args.nodes,  # one per worker node
            "worker_torch_threads": threads,
            "driver_bytes_received": summary.driver_bytes,
            "shards": len(summary.shards),
            "shard_bytes": sum(p.stat().st_size for p in Path(args.out).glob("part-*.parquet")),
        }
    if args.bare:
        result |= bare_encoder(args.export, Path(args.corpus), kwargs, summary.residues, seconds)
        encoder = IPAEncoder.from_pretrained(args.export)
        result["max_abs_diff_vs_alone"] = max_difference(encoder, load_embeddings(args.out), Path(args.corpus))
    return result


def _torch_threads() -> int:
    return torch.get_num_threads()


def start_cluster(nodes: int):
    """A Ray cluster on this machine, on 127.0.0.1 only: a head without CPUs (the driver's node)
    and ``nodes`` worker nodes of one CPU each; this process is its driver."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def bare_encoder(export: str, corpus: Path, kwargs: dict, residues: int, pipeline_s: float) -> dict:
    """The pipeline's batches (same bucketer, same chain order) through bare encoder calls."""
    from ipa_export import IPAEncoder
    from ipa_export.model import frames
    from ipa_export.structures.batching import LengthBucketer
    from ipa_export.structures.corpus import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS
    from ipa_export.structures.reader import read_chains

    encoder = IPAEncoder.from_pretrained(export)
    bucketer: LengthBucketer = LengthBucketer(
        kwargs.get("max_tokens", DEFAULT_MAX_TOKENS), kwargs.get("batch_size", DEFAULT_BATCH_SIZE)
    )
    chains = [b for path in sorted(corpus.glob("*.pdb.gz")) for b in read_chains(path).backbones]
    batches = [b for chain in chains for b in bucketer.add(chain, len(chain.sequence))] + list(bucketer.flush())
    prepared = []
    for batch in batches:
        lengths = [len(b.sequence) for b in batch]
        size, n = len(batch), max(lengths)
        node_embed, ca = torch.zeros(size, n, encoder.config.c_s), torch.zeros(size, n, 3)
        rotations, mask = torch.eye(3).repeat(size, n, 1, 1), torch.zeros(size, n, dtype=torch.bool)
        residue_index = torch.zeros(size, n, dtype=torch.int64)
        for i, b in enumerate(batch):
            residue_index[i, : lengths[i]] = b.residue_numbers
            with torch.no_grad():
                node_embed[i, : lengths[i]] = encoder.embed_residues(b.aatype)
            rotations[i, : lengths[i]], ca[i, : lengths[i]] = frames.from_backbone(b.n, b.ca, b.c)
            mask[i, : lengths[i]] = True
        prepared.append((node_embed, ca, mask, rotations, residue_index))
    started = time.perf_counter()
    with torch.inference_mode():
        for node_embed, ca, mask, rotations, residue_index in prepared:
            encoder(node_embed, ca, mask, rotations=rotations, residue_index=residue_index)
    bare_s = time.perf_counter() - started
    bare_residues = sum(len(c.sequence) for c in chains)
    assert bare_residues == residues, (bare_residues, residues)
    return {
        "batches": len(batches),
        "bare_seconds": bare_s,
        "bare_residues_per_s": residues / bare_s,
        "efficiency": (residues / pipeline_s) / (residues / bare_s),
        "padding_fraction": 1 - residues / sum(len(b) * max(len(c.sequence) for c in b) for b in batches),
    }


def max_difference(encoder, records, corpus: Path) -> float:
    """Largest |Parquet value - encoder on the chain alone| over s, rotations, translations."""
    from ipa_export.model import frames
    from ipa_export.structures.reader import read_chains

    worst = 0.0
    for record in records:
        (b,) = read_chains(corpus / f"{record['id'].rsplit('_', 1)[0]}.pdb.gz", record["chain"]).backbones
        rotations, ca = frames.from_backbone(b.n, b.ca, b.c)
        with torch.inference_mode():
            out = encoder(encoder.embed_residues(b.aatype)[None], ca[None], torch.ones(1, len(ca), dtype=torch.bool),
                          rotations=rotations[None], residue_index=b.residue_numbers[None])  # fmt: skip
        for key in ("s", "rotations", "translations"):
            worst = max(worst, (getattr(out, key)[0] - record[key]).abs().max().item())
    return worst


def measure(export: Path, corpus: Path, out: Path, bare: bool = False, nodes: int = 0, **kwargs) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", "--export", str(export), "--corpus", str(corpus),
               "--out", str(out), "--kwargs", json.dumps(kwargs), "--nodes", str(nodes)]  # fmt: skip
    command += ["--bare"] if bare else []
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, default=1000)
    parser.add_argument("--only", choices=("throughput", "memory", "ray"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    print(json.dumps(machine_info()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export = usage_export(tmp / "usage-export")
        corpus = make_corpus(tmp / "corpus", args.chains)
        if args.only in (None, "throughput"):
            result = measure(export, corpus, tmp / "out", bare=True)
            print(f"local engine, usage config, {args.chains} chains:", json.dumps(result))
        if args.only == "ray":  # the local engine beside it, on the machine as loaded now
            result = measure(export, corpus, tmp / "out")
            print(f"local engine, usage config, {args.chains} chains:", json.dumps(result))
        if args.only in (None, "ray"):
            result = measure(export, corpus, tmp / "out-ray", nodes=2, engine="ray")
            print(f"ray engine, 2 worker nodes x 1 CPU, usage config, {args.chains} chains:", json.dumps(result))
        if args.only in (None, "memory"):
            big = make_corpus(tmp / "corpus-2000", 2000)
            subsets = []
            for count in (20, 200):
                subset = tmp / f"corpus-{count}"
                subset.mkdir()
                for path in sorted(big.glob("*.pdb.gz"))[:count]:
                    shutil.copy(path, subset)
                subsets.append((str(count), subset))
            for name, directory in (*subsets, ("2000", big)):
                result = measure(TINY, directory, tmp / f"out-{name}")
                print(f"memory, tiny export, {name} files:", json.dumps(result))


if __name__ == "__main__":
    main()
