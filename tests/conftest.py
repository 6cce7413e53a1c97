"""Shared fixtures: golden reference cases and small encoder configs."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from safetensors import safe_open
from safetensors.torch import load_file

from ipa_export import EncoderConfig

# CI explores a fixed set of examples (reproducible runs); local runs explore new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
GOLDEN_CASES = ("tiny_r2_unpadded", "tiny_r2_padded", "tiny_r1_unpadded")
REAL_GOLDEN = GOLDEN / "real" / "real_mid.safetensors"
CHECKPOINT = GOLDEN / "stage1_tiny_checkpoint.pt"
STRUCTURES = DATA / "structures"
# The golden README's suggested fp32 tolerance at valid positions.
ATOL = RTOL = 1e-4


@dataclass
class GoldenCase:
    name: str
    edge_config: dict
    module_config: dict
    weights: dict[str, torch.Tensor]  # BINDRAE Stage-1 keys
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    @property
    def mask(self) -> torch.Tensor:
        return self.inputs["node_mask"].bool()


def load_golden(name: str) -> GoldenCase:
    path = GOLDEN / f"{name}.safetensors"
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    return GoldenCase(
        name,
        json.loads(metadata["edge_config"]),
        json.loads(metadata["module_config"]),
        group("weights."),
        group("inputs."),
        group("outputs."),
    )


@dataclass(frozen=True)
class RealGolden:
    """``tests/data/golden/real``: the reference on six real PDB chains, every weight non-zero."""

    tensors: dict[str, torch.Tensor]
    chains: list[dict]  # name, length, ref32_vs_fp64 (the reference's own fp32 error)
    config: EncoderConfig
    weights: dict[str, torch.Tensor]  # IPAEncoder keys

    def encoder(self, dtype: torch.dtype = torch.float32, **changes):
        """A fresh encoder with the golden's weights (``changes``: config fields), in eval mode."""
        from ipa_export import IPAEncoder

        encoder = IPAEncoder(self.config.replace(**changes))
        encoder.load_state_dict(self.weights, strict=True)
        return encoder.to(dtype).eval()

    def part(self, chain: str, kind: str) -> dict[str, torch.Tensor]:
        """``kind`` "inputs", "ref32" or "fp64" of one chain: name -> tensor [1, N, ...]."""
        prefix = f"{chain}.{kind}."
        return {k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)}


@functools.cache
def real_golden() -> RealGolden:
    from ipa_export.bindrae.keys import checkpoint_to_encoder

    tensors = load_file(REAL_GOLDEN)
    with safe_open(REAL_GOLDEN, framework="pt") as f:
        metadata = f.metadata()
    edge, module = json.loads(metadata["edge_kwargs"]), json.loads(metadata["module_kwargs"])
    config = EncoderConfig(
        c_s=edge["c_s"],
        c_p=edge["c_p"],
        z_factor_rank=edge["z_rank"],
        **{k: module[k] for k in ("c_hidden", "no_heads", "no_qk_points", "no_v_points", "depth")},
    )
    weights = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
    return RealGolden(tensors, json.loads(metadata["chains"]), config, checkpoint_to_encoder(weights))


@pytest.fixture(params=GOLDEN_CASES)
def golden(request) -> GoldenCase:
    return load_golden(request.param)


def assert_close_at(
    actual: torch.Tensor,
    expected: torch.Tensor,
    mask: torch.Tensor,
    atol: float = ATOL,
    rtol: float = RTOL,
    name: str = "",
):
    torch.testing.assert_close(actual[mask], expected[mask], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def tiny_config(**changes) -> EncoderConfig:
    """A small config that keeps every code path: 2 blocks, rank 2, k = 10."""
    base = EncoderConfig(
        c_s=32, c_p=16, z_factor_rank=2, feat_dim=16, c_hidden=8, no_heads=2, no_qk_points=3, no_v_points=4, depth=2
    )
    return base.replace(**changes)


def random_chain(length: int, generator: torch.Generator, step: float = 3.8) -> torch.Tensor:
    """[length, 3] C-alpha-like random walk (steps of step ± 10% Angstrom), centred at the origin."""
    steps = torch.randn(length, 3, generator=generator)
    lengths = step * (0.9 + 0.2 * torch.rand(length, 1, generator=generator))
    steps = lengths * steps / steps.norm(dim=-1, keepdim=True)
    chain = steps.cumsum(0)
    return chain - chain.mean(0)


def random_rotation(generator: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """Uniform random proper rotations [*batch, 3, 3] (QR of a Gaussian matrix)."""
    q, r = torch.linalg.qr(torch.randn(*batch, 3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
    q = torch.where(torch.linalg.det(q)[..., None, None] < 0, -q, q)
    return q.float()


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Re-draw every parameter as the golden README describes (fresh modules zero some
    final layers, which would make outputs trivially constant)."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) / sub.in_features**0.5)
                if sub.bias is not None:  # the factoriser's compressors have none
                    sub.bias.copy_(0.02 * torch.randn(sub.bias.shape, generator=generator))
            elif isinstance(sub, torch.nn.Embedding):
                sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator))
            elif isinstance(sub, torch.nn.LayerNorm):
                sub.weight.copy_(1 + 0.1 * torch.randn(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
            elif hasattr(sub, "head_weights"):
                sub.head_weights.copy_(0.5 + 0.1 * torch.randn(sub.head_weights.shape, generator=generator))
    return module


def make_encoder(config: EncoderConfig | None = None, seed: int = 0):
    """A randomised IPAEncoder in eval mode."""
    from ipa_export import IPAEncoder

    return randomize_(IPAEncoder(config or tiny_config()), torch.Generator().manual_seed(seed)).eval()
