"""Precision of the encoder against an fp64 reference: fp32, and bf16 / fp16 attention.

The IPA folds -w/2 |q^ - k^|^2 into one dot product, q^.k^ - |k^|^2/2 (ipa_export/model/ipa.py). Its
terms grow with |x|^2 while their difference does not, so it loses digits when the points are far
from the origin; the encoder therefore takes points relative to each protein's centroid
(``ipa_export.model.frames.masked_mean`` in ipa.py). In bf16 / fp16 attention the point terms,
value points and outputs lose more (ipa_export/model/low_precision.py). This script measures the
encoder output ``s`` for chains centred at increasing offsets from the origin against an fp64
reference run of the same weights: in fp32 with the centring (as shipped) and without it
(``masked_mean`` monkeypatched to return zeros), and with bf16 / fp16 attention (``attn_dtype``) in three variants:

- ``anchored`` (as shipped): blocks of ``low_precision.QUERY_BLOCK`` queries, compensated point terms and
  value anchors every ``low_precision.ANCHOR_SPAN`` residues;
- ``compensated``: one block and one anchor (the centroid), compensated point terms (as 0.2.0);
- ``plain``: one block and one anchor, the point terms rounded once.

A last table gives the forward time of each variant (best of ``--repeats``) at the walk's N.

The fp64 reference: ``model.double()``, which computes everything in fp64 (attention, frames,
neighbours). It is computed with centring; the fp64 run without centring is printed as a check (it
should agree to ~1e-10: the offset is harmless in fp64). ``--real`` adds the real-chain golden (the
reference's weights, every parameter non-zero; its fp64 outputs as the answer), ``--structures``
fp32 against fp64 on every chain of a directory.

    python bench/precision.py                         # N=512, offsets 0, 40, 200, 1000 Angstrom
    python bench/precision.py --structure tests/data/structures/4ake_adk_open.pdb.gz \
        --real tests/data/golden/real/real_mid.safetensors --structures tests/data/structures \
        --out bench/results/precision.txt
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402, F401
import torch  # noqa: E402
from _common import USAGE_CONFIG, make_inputs  # noqa: E402
from safetensors import safe_open  # noqa: E402

import ipa_export.model.ipa as ipa_module  # noqa: E402
import ipa_export.model.low_precision as low_precision  # noqa: E402
from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402


@contextlib.contextmanager
def no_centring():
    """Points in absolute coordinates: the centroid ipa.py subtracts (``frames.masked_mean``) is zero."""
    original = ipa_module.frames.masked_mean
    ipa_module.frames.masked_mean = lambda translations, mask: torch.zeros_like(translations[:, 0])
    try:
        yield
    finally:
        ipa_module.frames.masked_mean = original


@contextlib.contextmanager
def one_block(compensated: bool):
    """The low-precision path of ipa_export 0.2.0: one block of queries and one value anchor (the
    protein's centroid), with the point terms compensated or (``compensated=False``) rounded once."""
    saved = low_precision.QUERY_BLOCK, low_precision.ANCHOR_SPAN, low_precision.point_terms
    low_precision.QUERY_BLOCK = low_precision.ANCHOR_SPAN = 1 << 30
    if not compensated:
        low_precision.point_terms = lambda q, k, norms, dtype: tuple(
            [x.to(dtype) for x in terms] for terms in saved[2](q, k, norms, torch.float32)
        )
    try:
        yield
    finally:
        low_precision.QUERY_BLOCK, low_precision.ANCHOR_SPAN, low_precision.point_terms = saved


@contextlib.contextmanager
def reference_rounding():
    """The reference's fp16 / bf16 attention, emulated: q, k and v rounded once (absolute points, no
    centring, no blocks, no compensation), attended with fp32 accumulation as flash-attn does."""
    saved = ipa_module.compensated_product
    ipa_module.compensated_product = lambda b1, b2, dtype: ([b1], [b2])
    try:
        with no_centring(), one_block(compensated=False):
            yield
    finally:
        ipa_module.compensated_product = saved


LOW_PRECISION_VARIANTS = {
    "plain": lambda: one_block(compensated=False),
    "compensated": lambda: one_block(compensated=True),
    "anchored": contextlib.nullcontext,
}


def variants(dtype: str) -> dict[str, contextlib.AbstractContextManager]:
    """Column name -> context manager for one attention dtype."""
    if dtype == "fp32":
        return {"centred": contextlib.nullcontext, "uncentred": no_centring}
    return LOW_PRECISION_VARIANTS


def reference_model(model: IPAEncoder) -> IPAEncoder:
    """The same weights in float64: a float64 encoder runs everything in fp64 (attention, frames,
    neighbours and distances included)."""
    return copy.deepcopy(model).double()


def structure_inputs(path: Path, seed: int) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(title, node_embed, ca, mask, rotations) of the first chain of a structure file."""
    from ipa_export.model.frames import from_backbone
    from ipa_export.structures.reader import read_backbone

    backbone = read_backbone(path)
    n = backbone.ca.shape[0]
    node_embed = torch.randn(1, n, USAGE_CONFIG["c_s"], generator=torch.Generator().manual_seed(seed))
    rotations = from_backbone(backbone.n, backbone.ca, backbone.c).rotations[None]
    mask = torch.ones(1, n, dtype=torch.bool)
    return f"{Path(path).name} N={n} (real chain, backbone frames)", node_embed, backbone.ca[None], mask, rotations


def load_real_golden(path: Path) -> tuple[EncoderConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(config, IPAEncoder weights, every tensor)`` of a real golden
    (``tests/data/golden/real/real_mid.safetensors``: the reference's weights, every parameter
    non-zero, and its float64 outputs); attention ``sdpa``."""
    from safetensors.torch import load_file

    from ipa_export.bindrae.keys import checkpoint_to_encoder

    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    module, edge = json.loads(meta["module_kwargs"]), json.loads(meta["edge_kwargs"])
    config = EncoderConfig(
        c_s=edge["c_s"], c_p=edge["c_p"], z_factor_rank=edge["z_rank"], c_hidden=module["c_hidden"],
        no_heads=module["no_heads"], no_qk_points=module["no_qk_points"], no_v_points=module["no_v_points"],
        depth=module["depth"], attention="sdpa",
    )  # fmt: skip
    weights = checkpoint_to_encoder({k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")})
    return config, weights, tensors


def real_chains(path: Path) -> list[str]:
    """Max |x - x_fp64| over valid residues for s and translations on the chains of a real golden."""
    config, weights, tensors = load_real_golden(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    columns = {"fp32": ("fp32", contextlib.nullcontext), "bf16": ("bf16", contextlib.nullcontext)}
    columns |= {"fp16": ("fp16", contextlib.nullcontext), "reference fp16": ("fp16", reference_rounding)}
    columns["reference bf16"] = ("bf16", reference_rounding)
    lines = [
        "",
        f"Real chains ({path.name}): max |x - x_fp64| over valid residues, s / translations (A); the",
        "reference's weights (every parameter non-zero, large frame updates), config "
        f"c_s={config.c_s} depth={config.depth}, neighbours in exact distance order.",
        f"{'chain':>20} {'N':>4} {'ref32 (file)':>12} " + " ".join(f"{name:>19}" for name in columns),
    ]
    print("\n".join(lines), flush=True)
    for chain in json.loads(meta["chains"]):
        name = chain["name"]
        x = {key: tensors[f"{name}.inputs.{key}"] for key in ("node_embed", "translations", "rotations", "node_mask")}
        mask = x["node_mask"].bool()
        cells = []
        for dtype, context in columns.values():
            encoder = IPAEncoder(config.replace(attn_dtype=dtype)).eval().requires_grad_(False)
            encoder.load_state_dict(weights)
            with torch.no_grad(), context():
                out = encoder(x["node_embed"], x["translations"], mask, rotations=x["rotations"])
            s_err = (out.s - tensors[f"{name}.fp64.s_geo"])[mask].abs().max().item()
            t_err = (out.translations - tensors[f"{name}.fp64.trans"])[mask].abs().max().item()
            cells.append(f"{s_err:9.2e}/{t_err:9.2e}")
        lines.append(
            f"{name:>20} {mask.sum().item():4d} {chain['ref32_vs_fp64']:12.1e} " + " ".join(f"{c:>19}" for c in cells)
        )
        print(lines[-1], flush=True)
    return lines


def structures_fp32_vs_fp64(golden: Path, directory: Path) -> list[str]:
    """fp32 against the same encoder in fp64 on every ``*.pdb.gz`` chain of ``directory``: the real
    golden's weights, N(0, 1) node embeddings, N-CA-C frames; the largest difference over s, z_f1,
    z_f2, rotations and translations."""
    from ipa_export.model.frames import from_backbone
    from ipa_export.structures.reader import read_backbone

    config, weights, _ = load_real_golden(golden)
    encoder32 = IPAEncoder(config).eval().requires_grad_(False)
    encoder32.load_state_dict(weights)
    encoder64 = reference_model(encoder32)
    g = torch.Generator().manual_seed(0)
    worst = []
    for path in sorted(directory.glob("*.pdb.gz")):
        chain = read_backbone(path)
        rotations, ca = from_backbone(chain.n.double(), chain.ca.double(), chain.c.double())
        node_embed = torch.randn(1, len(ca), config.c_s, generator=g, dtype=torch.float64)
        mask = torch.ones(1, len(ca), dtype=torch.bool)
        with torch.no_grad():
            out32 = encoder32(node_embed.float(), ca[None].float(), mask, rotations[None].float())
            out64 = encoder64(node_embed, ca[None], mask, rotations[None])
        error = max((a.double() - b).abs().max().item() for a, b in zip(out32, out64, strict=True))
        worst.append((error, path.name, len(ca)))
    worst.sort(reverse=True)
    errors = [e for e, *_ in worst]
    lines = [
        "",
        f"fp32 vs the same encoder in fp64 on {len(worst)} real chains ({directory}), the real golden's weights,",
        "N-CA-C frames: max over s, z_f1, z_f2, rotations, translations",
        f"  largest {errors[0]:.1e} ({worst[0][1]}, N={worst[0][2]}), median {errors[len(errors) // 2]:.1e}, "
        f"smallest {errors[-1]:.1e}",
    ]
    print("\n".join(lines), flush=True)
    return lines


def timings(models: dict[str, IPAEncoder], chain: tuple, repeats: int) -> list[str]:
    """Forward seconds (best of ``repeats``) of every dtype and variant on one chain."""
    title, node_embed, ca, mask, rotations = chain
    lines = ["", f"Forward time, {title}, best of {repeats} (other processes share this CPU: ratios only):"]
    base = None
    for name, model in models.items():
        for variant, context in variants(name).items():
            if variant == "uncentred":
                continue
            with torch.no_grad(), context():
                model(node_embed, ca, mask, rotations)
                best = math.inf
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(node_embed, ca, mask, rotations)
                    best = min(best, time.perf_counter() - start)
            base = base or best
            lines.append(f"{name + ' ' + variant:>18}: {best:7.3f} s ({best / base:4.2f}x fp32)")
            print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--offsets", default="0,40,200,1000", help="Angstrom, added to x, y and z")
    p.add_argument("--backend", default="sdpa", choices=["sdpa", "dense"])
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="attention dtypes to test (attn_dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--structure",
        type=Path,
        action="append",
        default=[],
        help="also a real chain (PDB/mmCIF; needs gemmi): its CA positions and backbone frames, "
        "re-centred, then offset (repeatable)",
    )
    p.add_argument("--real", type=Path, help="also a real golden: its chains, weights and float64 outputs")
    p.add_argument(
        "--structures", type=Path, help="with --real: also fp32 vs fp64 on every *.pdb.gz chain of this directory"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (best is reported)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    base = IPAEncoder(EncoderConfig(**USAGE_CONFIG, attention=args.backend)).eval().requires_grad_(False)
    dtypes = args.dtypes.split(",")
    models = {}
    for dtype in dtypes:
        models[dtype] = IPAEncoder(base.config.replace(attn_dtype=dtype)).eval().requires_grad_(False)
        models[dtype].load_state_dict(base.state_dict())
    reference = reference_model(base)

    lines = [
        "Encoder output s: max |s - s_fp64| over all residues and channels (mean in brackets); the chain is",
        "centred on its centroid, then translated by (o, o, o) Angstrom. Usage config c_s=384 c_p=128 rank=2",
        f"depth=3, attention={args.backend}, CPU, random weights (seed {args.seed}), node embeddings ~ N(0, 1).",
        "Reference: the same weights in float64 throughout (attention and frames too), centred.",
    ]
    print("\n".join(lines), flush=True)
    chains = [(f"random walk N={args.n} (3.8 A steps)", *make_inputs(args.n, seed=args.seed), None)]
    for path in args.structure:
        chains.append(structure_inputs(path, seed=args.seed))
    for title, node_embed, ca0, mask, rotations in chains:
        ca0 = ca0 - ca0.mean(1, keepdim=True)
        table = [
            "",
            f"{title}: radius (max |x - centroid|) {ca0.norm(dim=-1).max().item():.1f} A",
            f"{'offset A':>8} {'max|x| A':>9} {'max|s|':>7} {'fp64 uncentred':>15} "
            + " ".join(f"{f'{d} {c}':>20}" for d in dtypes for c in variants(d)),
        ]
        print("\n".join(table), flush=True)
        for offset in [float(x) for x in args.offsets.split(",")]:
            ca = ca0 + offset  # fp32 inputs; the fp64 reference gets exactly the same numbers
            rot64 = (rotations if rotations is not None else torch.eye(3).expand(*mask.shape, 3, 3)).double()
            inputs64 = (node_embed.double(), ca.double(), mask, rot64)
            with torch.no_grad():
                ref = reference(*inputs64).s
                with no_centring():
                    ref_uncentred = reference(*inputs64).s
                cells = []
                for name in dtypes:
                    for context in variants(name).values():
                        with context():
                            s = models[name](node_embed, ca, mask, rotations).s.double()
                        err = (s - ref).abs()
                        cells.append(f"{err.max().item():9.2e} ({err.mean().item():8.1e})")
            line = (
                f"{offset:8.0f} {ca.abs().max().item():9.1f} {ref.abs().max().item():7.2f} "
                f"{(ref_uncentred - ref).abs().max().item():15.1e} " + " ".join(f"{c:>20}" for c in cells)
            )
            table.append(line)
            print(line, flush=True)
        lines += table
    if args.real:
        lines += real_chains(args.real)
        if args.structures:
            lines += structures_fp32_vs_fp64(args.real, args.structures)
    lines += timings(models, chains[0], args.repeats)
    lines += [
        "",
        "Columns: 'fp32' / 'bf16' / 'fp16' = attn_dtype (q, k, v of the attention in that dtype, the rest",
        "fp32); 'centred' = as shipped (points relative to the protein's centroid); 'uncentred' =",
        "ipa_export.model.frames.masked_mean monkeypatched to zeros; 'anchored' = as shipped (blocks of",
        f"{low_precision.QUERY_BLOCK} queries, compensated point terms, value anchors every "
        f"{low_precision.ANCHOR_SPAN} residues);",
        "'compensated' = one block, one anchor, compensated point terms (0.2.0); 'plain' = one block, one",
        "anchor, point terms rounded once. 'fp64 uncentred' = the reference without centring minus the",
        "reference (a check: the offset is harmless in exact arithmetic).",
    ]
    print("\n".join(lines[-7:]))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
