"""The worked example: a frame flow-matching model around a frozen export learns (its loss
beats the no-motion baseline), keeps the export frozen, and samples, also under bf16
autocast; it runs from an installed package, without the repository around it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STRUCTURES

from ipa_export import IPAEncoder
from ipa_export.examples import flow_matching

EXPORT = STRUCTURES.parents[2] / "checkpoints" / "bindrae-ipa-tiny"


@pytest.mark.slow  # 40 training steps: ~25 CPU-seconds
def test_short_training_beats_the_trivial_baseline_and_keeps_the_export_frozen():
    structures = sorted(STRUCTURES.glob("*.pdb.gz"))
    model, losses, ratio = flow_matching.train(EXPORT, structures, steps=40, length=24, seed=0)
    assert ratio < 0.95, f"loss / no-motion baseline = {ratio:.3f} after 40 steps"
    assert not model.encoder.training  # model.train() left the frozen export in eval mode
    reference = IPAEncoder.from_pretrained(EXPORT).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.encoder.state_dict().items())
    _, _, aatype, residue_index = flow_matching.load_crops(structures[:1], 24)
    rotations, ca = flow_matching.sample(model, aatype[:2], residue_index[:2], steps=5)
    assert ca.shape == (2, 24, 3) and torch.isfinite(ca).all()
    identity = torch.eye(3).expand(2, 24, 3, 3)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), identity, atol=1e-4, rtol=0)


def test_rotation_log_inverts_rodrigues():
    g = torch.Generator().manual_seed(0)
    axis_angle = (
        torch.nn.functional.normalize(torch.randn(100, 3, generator=g), dim=-1) * torch.rand(100, 1, generator=g) * 3.0
    )
    rotations = flow_matching.axis_angle_to_matrix(axis_angle)
    torch.testing.assert_close(flow_matching.rotation_log(rotations), axis_angle, atol=1e-4, rtol=1e-4)
    uniform = flow_matching.random_rotations((500,), g)
    torch.testing.assert_close(torch.linalg.det(uniform), torch.ones(500), atol=1e-5, rtol=0)
    assert uniform.mean(0).abs().max() < 0.1  # uniform rotations average to ~0


def test_rotation_log_is_finite_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    axis_angle = torch.nn.functional.normalize(torch.randn(200, 3, generator=g), dim=-1)
    axis_angle = (
        axis_angle
        * torch.cat([torch.zeros(10), 1e-5 * torch.rand(90, generator=g), 3 * torch.rand(100, generator=g)])[:, None]
    )
    rotations = flow_matching.axis_angle_to_matrix(axis_angle)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        relative = rotations.transpose(-1, -2) @ rotations  # the identity, rounded to bf16
        logged = flow_matching.rotation_log(rotations.bfloat16())
        identity = flow_matching.rotation_log(relative)
    assert logged.dtype == torch.float32 and torch.isfinite(identity).all() and identity.abs().max() < 1e-2
    torch.testing.assert_close(logged, axis_angle, atol=2e-2, rtol=0)  # bf16 inputs: ~3 digits


def test_sampling_and_the_loss_are_finite_under_bf16_autocast():
    structures = sorted(STRUCTURES.glob("*.pdb.gz"))[:1]
    torch.manual_seed(0)
    model = flow_matching.FrameFlow(IPAEncoder.from_pretrained(EXPORT))
    data = flow_matching.load_crops(structures, 24)
    _, _, aatype, residue_index = data
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rotations, ca = flow_matching.sample(
            model, aatype[:2], residue_index[:2], steps=5, generator=torch.Generator().manual_seed(0)
        )
        loss, baseline = flow_matching.flow_matching_loss(
            model, [x[:2] for x in data], torch.Generator().manual_seed(0)
        )
    assert torch.isfinite(ca).all() and torch.isfinite(loss) and torch.isfinite(baseline)
    identity = torch.eye(3).expand(2, 24, 3, 3)
    torch.testing.assert_close(rotations @ rotations.transpose(-1, -2), identity, atol=1e-4, rtol=0)


@pytest.mark.slow  # copies the package and trains 2 steps in a fresh interpreter: ~15 CPU-seconds
def test_the_example_runs_from_an_installed_package_elsewhere(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(Path(flow_matching.__file__).parents[1], site / "ipa_export")  # what a wheel installs
    structures = [str(p) for p in sorted(STRUCTURES.glob("*.pdb.gz"))[:2]]
    code = (
        "import sys, ipa_export.examples.flow_matching as m; "
        f"assert m.__file__.startswith({str(site)!r}), m.__file__; "
        "m.main(sys.argv[1:])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, "--export", str(EXPORT), "--structures", *structures, "--steps", "2"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "evaluation: loss / no-motion baseline" in run.stderr and "sample: 32 residues" in run.stderr
    # no data of its own to look for next to the package: without arguments it asks for them
    bare = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert bare.returncode == 2 and "the following arguments are required: --export, --structures" in bare.stderr
