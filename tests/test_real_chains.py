"""Fidelity on real protein chains, with every weight non-zero.

``tests/data/golden/real/real_mid.safetensors`` holds the FlashIPA + BINDRAE reference on six
real PDB chains in fp32 (``ref32``) and its fp64 re-run (``fp64``, the exact answer). Ours must
be no further from the exact answer than the reference's own fp32 error allows, at every
residue, and agree with the reference at the golden README's tolerance for chains of this size.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import STRUCTURES, real_golden

from ipa_export import IPAEncoder
from ipa_export.model.frames import from_backbone
from ipa_export.structures.reader import read_backbone

OUTPUTS = (("z_f1", "z_f1"), ("z_f2", "z_f2"), ("s", "s_geo"), ("rotations", "rot_mats"), ("translations", "trans"))
# Golden README: fp32 agreement for chains of hundreds of residues (coordinates ~40 A).
REFERENCE_TOL = 1e-3
CHAINS = [chain["name"] for chain in real_golden().chains]


@functools.cache
def golden_encoder(attention: str = "auto", dtype: torch.dtype = torch.float32) -> IPAEncoder:
    encoder = real_golden().encoder(dtype, attention=attention)
    assert all(p.ne(0).all() for p in encoder.parameters())  # a zero layer would hide errors
    return encoder


def chain_case(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inputs, the reference in fp32 and the fp64 answer of one chain, each [N, ...]."""
    golden = real_golden()
    return tuple({k: v[0] for k, v in golden.part(name, kind).items()} for kind in ("inputs", "ref32", "fp64"))


def run(encoder: IPAEncoder, inputs: dict[str, torch.Tensor]):
    """The encoder on one chain's inputs [N, ...], cast to the encoder's dtype."""
    dtype = encoder.dtype
    x = {k: v[None].bool() if k == "node_mask" else v[None].to(dtype) for k, v in inputs.items()}
    with torch.no_grad():
        return encoder(x["node_embed"], x["translations"], x["node_mask"], rotations=x["rotations"])


def per_residue(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N]: the largest absolute entry of each residue."""
    return x.abs().flatten(1).amax(1)


@pytest.mark.parametrize("attention", ["auto", "dense"])
@pytest.mark.parametrize("name", CHAINS)
def test_as_close_to_fp64_as_the_reference_at_every_residue(name, attention):
    inputs, ref32, fp64 = chain_case(name)
    out = run(golden_encoder(attention), inputs)
    # Bound: 1.5 x the reference's fp32 error on this chain and output (its largest) + 1e-4.
    for ours, key in OUTPUTS:
        ours_error = per_residue(getattr(out, ours)[0] - fp64[key])
        bound = 1.5 * per_residue(ref32[key] - fp64[key]).max() + 1e-4
        worst = int(ours_error.argmax())
        message = f"{name} {ours}: residue {worst} is {ours_error[worst]:.2e} from fp64 > {bound:.2e}"
        assert ours_error[worst] <= bound, message


@pytest.mark.parametrize("name", CHAINS)
def test_matches_the_reference_fp32(name):
    inputs, ref32, _ = chain_case(name)
    out = run(golden_encoder(), inputs)
    for ours, key in OUTPUTS:
        torch.testing.assert_close(getattr(out, ours)[0], ref32[key], atol=REFERENCE_TOL, rtol=REFERENCE_TOL)


@pytest.mark.parametrize("name", CHAINS)
def test_float64_encoder_reproduces_the_reference_fp64(name):
    # The reference's fp64 re-run kept flash_ipa's frames in fp32 (golden README): ~1e-5.
    inputs, _, fp64 = chain_case(name)
    out = run(golden_encoder(dtype=torch.float64), inputs)
    assert out.s.dtype == out.translations.dtype == torch.float64
    for ours, key in OUTPUTS:
        torch.testing.assert_close(getattr(out, ours)[0], fp64[key].double(), atol=2e-5, rtol=0)


def test_fp32_within_1e3_of_fp64_on_every_test_structure():
    # All 36 real chains of tests/data/structures, the golden's non-zero weights, N(0, 1) node
    # embeddings and N-CA-C frames: fp32 no further than 1e-3 from the same encoder in fp64.
    encoder32, encoder64 = golden_encoder(), golden_encoder(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    worst: dict[str, float] = {}
    for path in sorted(STRUCTURES.glob("*.pdb.gz")):
        chain = read_backbone(path)
        rotations, ca = from_backbone(chain.n.double(), chain.ca.double(), chain.c.double())
        inputs = {
            "node_embed": torch.randn(len(ca), encoder32.config.c_s, generator=g, dtype=torch.float64),
            "translations": ca,
            "rotations": rotations,
            "node_mask": torch.ones(len(ca), dtype=torch.bool),
        }
        out32, out64 = run(encoder32, inputs), run(encoder64, inputs)
        errors = [(getattr(out32, f).double() - getattr(out64, f)).abs().max().item() for f, _ in OUTPUTS]
        worst[Path(path).name] = max(errors)
    assert len(worst) == 36
    assert max(worst.values()) <= 1e-3, {k: f"{v:.1e}" for k, v in worst.items() if v > 1e-3}
