"""How far a corpus row moves with the batch it runs in: max |batched - alone| / (1 + |alone|).

Chains: the real structures in tests/data/structures and random crops of them (40 residues to
whole, randomly moved), each run alone (batch of one, no padding) and in padded batches of
2, 4, 8 and 16 mixed lengths, through the shipped tiny export and a wider random export (the
usage document's c_s 384, c_p 128). Usage: python bench/batching_bound.py [--crops N]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ipa_export import EncoderConfig, IPAEncoder
from ipa_export.structures.inputs import Source
from ipa_export.structures.pipeline import Parsed, embed_batch, node_embeddings
from ipa_export.structures.reader import read_chains

ROOT = Path(__file__).parents[1]
STRUCTURES = ROOT / "tests" / "data" / "structures"
FIELDS = ("s", "rotations", "translations", "z_f1", "z_f2")


def chains(crops: int, seed: int) -> list[Parsed]:
    rng = random.Random(seed)
    whole = []
    for path in sorted(STRUCTURES.glob("*.*")):
        if path.suffix != ".md":
            whole += [Parsed(f"{path.name}:{b.chain}", Source(path, str(path)), b) for b in read_chains(path).backbones]
    items = list(whole)
    for k in range(crops):
        item = rng.choice(whole)
        bb, length = item.backbone, len(item.backbone.sequence)
        n = rng.randint(min(40, length), length)
        start = rng.randint(0, length - n)
        q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed + k)))
        shift = torch.tensor([rng.uniform(-50, 50) for _ in range(3)])
        cut = slice(start, start + n)
        moved = {a: getattr(bb, a)[cut] @ q.T + shift for a in ("n", "ca", "c")}
        crop = replace(bb, sequence=bb.sequence[cut], residue_ids=bb.residue_ids[cut],
                       residue_numbers=bb.residue_numbers[cut], chain_ids=bb.chain_ids[cut],
                       aatype=bb.aatype[cut], **moved)  # fmt: skip
        items.append(Parsed(f"{item.id}#{k}", item.source, crop))
    return items


def bound(encoder: IPAEncoder, items: list[Parsed], seed: int) -> float:
    embeds = [node_embeddings(encoder, item, None) for item in items]
    alone = [embed_batch(encoder, [item], [e], FIELDS)[0] for item, e in zip(items, embeds, strict=True)]
    rng, worst = random.Random(seed), 0.0
    order = list(range(len(items)))
    for size in (2, 4, 8, 16):
        rng.shuffle(order)
        for start in range(0, len(order), size):
            group = order[start : start + size]
            rows = embed_batch(encoder, [items[i] for i in group], [embeds[i] for i in group], FIELDS)
            for i, row in zip(group, rows, strict=True):
                for field in FIELDS:
                    want = alone[i][field]
                    worst = max(worst, ((row[field] - want).abs() / (1 + want.abs())).max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--crops", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    items = chains(args.crops, args.seed)
    tiny = IPAEncoder.from_pretrained(ROOT / "checkpoints" / "bindrae-ipa-tiny")
    wide = IPAEncoder(EncoderConfig(c_s=384, c_p=128, z_factor_rank=2, depth=3, num_residue_types=21)).eval()
    with torch.no_grad():
        for p in wide.parameters():
            p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)
        with tempfile.TemporaryDirectory() as tmp:
            wide.save_pretrained(Path(tmp) / "wide")
            wide = IPAEncoder.from_pretrained(Path(tmp) / "wide")
    print(f"{len(items)} chains ({sum(len(i.backbone.sequence) for i in items):,} residues), batches of 2, 4, 8, 16")
    for name, encoder in (("tiny export", tiny), ("c_s 384, c_p 128 random", wide)):
        print(f"{name}: max |batched - alone| / (1 + |alone|) = {bound(encoder, items, args.seed):.2e}")


if __name__ == "__main__":
    main()
