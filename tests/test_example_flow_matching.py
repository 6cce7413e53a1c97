"""The worked example: a frame flow-matching model around a frozen export learns (its loss
beats the no-motion baseline), keeps the export frozen, and samples."""

from __future__ import annotations

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
