"""Fidelity on real protein chains: the encoder and the reference against the exact (fp64) answer.

Two tables:

1. The six chains of ``tests/data/golden/real/real_mid.safetensors`` (the FlashIPA + BINDRAE
   reference with every weight non-zero): max |x - fp64| over valid residues of ``s`` and of the
   final ``translations`` (Angstrom), for the reference in fp32 (``ref32``) and for this package in
   fp32 and with bf16 / fp16 attention (``attn_dtype``), the same weights and inputs.
2. All real chains of ``tests/data/structures``: this package in fp32 against itself in fp64
   (``encoder.double()``), the golden's weights, N(0, 1) node embeddings, N-CA-C frames; the
   largest difference over ``s``, ``z_f1``, ``z_f2``, rotations and translations.

    python bench/fidelity.py --out bench/results/fidelity.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402
from ipa_export.bindrae.keys import checkpoint_to_encoder  # noqa: E402
from ipa_export.model.frames import from_backbone  # noqa: E402
from ipa_export.structures.reader import read_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "golden" / "real" / "real_mid.safetensors"
STRUCTURES = ROOT / "tests" / "data" / "structures"
OUTPUTS = (("z_f1", "z_f1"), ("z_f2", "z_f2"), ("s", "s_geo"), ("rotations", "rot_mats"), ("translations", "trans"))


def golden_encoder(tensors: dict[str, torch.Tensor], meta: dict[str, str], **changes) -> IPAEncoder:
    edge, module = json.loads(meta["edge_kwargs"]), json.loads(meta["module_kwargs"])
    config = EncoderConfig(
        c_s=edge["c_s"],
        c_p=edge["c_p"],
        z_factor_rank=edge["z_rank"],
        **{k: module[k] for k in ("c_hidden", "no_heads", "no_qk_points", "no_v_points", "depth")},
    ).replace(**changes)
    encoder = IPAEncoder(config)
    weights = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
    encoder.load_state_dict(checkpoint_to_encoder(weights), strict=True)
    return encoder.eval()


def forward(encoder: IPAEncoder, x: dict[str, torch.Tensor]):
    dtype = encoder.dtype
    with torch.no_grad():
        return encoder(
            x["node_embed"].to(dtype),
            x["translations"].to(dtype),
            x["node_mask"].bool(),
            rotations=x["rotations"].to(dtype),
        )


def error_cell(s: torch.Tensor, translations: torch.Tensor, exact: dict[str, torch.Tensor]) -> str:
    s_error = (s.float() - exact["s_geo"]).abs().max().item()
    t_error = (translations.float() - exact["trans"]).abs().max().item()
    return f"{s_error:8.1e} | {t_error:8.1e}"


def golden_table(lines: list[str]) -> None:
    tensors = load_file(REAL)
    with safe_open(REAL, framework="pt") as f:
        meta = f.metadata()
    encoders = {name: golden_encoder(tensors, meta, attn_dtype=name) for name in ("fp32", "bf16", "fp16")}
    lines += [
        "max |x - fp64| over valid residues: s | translations (Angstrom)",
        f"{'chain':>20} {'N':>4} {'ref32':>19} {'ours fp32':>19} {'ours bf16':>19} {'ours fp16':>19}",
    ]
    for chain in json.loads(meta["chains"]):
        name = chain["name"]
        x = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{name}.inputs.")}
        exact = {key: tensors[f"{name}.fp64.{key}"] for key in ("s_geo", "trans")}

        cells = [error_cell(tensors[f"{name}.ref32.s_geo"], tensors[f"{name}.ref32.trans"], exact)]
        for encoder in encoders.values():
            out = forward(encoder, x)
            cells.append(error_cell(out.s, out.translations, exact))
        lines.append(f"{name:>20} {chain['length']:>4} " + " ".join(f"{c:>19}" for c in cells))


def structures_table(lines: list[str]) -> None:
    tensors = load_file(REAL)
    with safe_open(REAL, framework="pt") as f:
        meta = f.metadata()
    encoder32 = golden_encoder(tensors, meta)
    encoder64 = golden_encoder(tensors, meta).double()
    g = torch.Generator().manual_seed(0)
    worst = []
    for path in sorted(STRUCTURES.glob("*.pdb.gz")):
        chain = read_backbone(path)
        rotations, ca = from_backbone(chain.n.double(), chain.ca.double(), chain.c.double())
        x = {
            "node_embed": torch.randn(1, len(ca), encoder32.config.c_s, generator=g, dtype=torch.float64),
            "translations": ca[None],
            "rotations": rotations[None],
            "node_mask": torch.ones(1, len(ca), dtype=torch.bool),
        }
        out32, out64 = forward(encoder32, x), forward(encoder64, x)
        error = max((getattr(out32, f).double() - getattr(out64, f)).abs().max().item() for f, _ in OUTPUTS)
        worst.append((error, path.name, len(ca)))
    worst.sort(reverse=True)
    errors = [e for e, *_ in worst]
    lines += [
        "",
        f"fp32 vs the same encoder in fp64, {len(worst)} real chains of tests/data/structures "
        "(max over s, z_f1, z_f2, rotations, translations):",
        f"  largest {errors[0]:.1e} ({worst[0][1]}, N={worst[0][2]}), median {errors[len(errors) // 2]:.1e}, "
        f"smallest {errors[-1]:.1e}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    args = parser.parse_args()
    lines = [f"# {json.dumps(_common.machine_info())}", ""]
    golden_table(lines)
    structures_table(lines)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
