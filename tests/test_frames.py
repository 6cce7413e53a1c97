"""Frame geometry and the frame-update clip."""

from __future__ import annotations

import math

import torch
from conftest import random_rotation
from hypothesis import given, settings
from hypothesis import strategies as st

from ipa_export.model import frames
from ipa_export.model.stack import scale_update

vectors = st.lists(st.floats(-3.0, 3.0), min_size=3, max_size=3)


@settings(max_examples=50, deadline=None)
@given(vectors)
def test_axis_angle_gives_the_rotation_about_the_axis(v):
    omega = torch.tensor(v, dtype=torch.float64)
    rotation = frames.axis_angle_to_matrix(omega)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.det(rotation), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(rotation @ omega, omega)  # the axis is fixed
    angle = torch.linalg.vector_norm(omega)
    # trace(R) = 1 + 2 cos(angle)
    torch.testing.assert_close(torch.trace(rotation), 1 + 2 * torch.cos(angle))


def test_zero_axis_angle_is_exactly_identity():
    assert torch.equal(frames.axis_angle_to_matrix(torch.zeros(4, 3)), torch.eye(3).expand(4, 3, 3))


def test_apply_invert_apply_and_compose():
    g = torch.Generator().manual_seed(0)
    r1, r2 = random_rotation(g, (5,)), random_rotation(g, (5,))
    t1, t2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    x = torch.randn(5, 3, generator=g)
    torch.testing.assert_close(frames.invert_apply(r1, t1, frames.apply(r1, t1, x)), x)
    composed = frames.compose(frames.Frames(r1, t1), frames.Frames(r2, t2))
    torch.testing.assert_close(frames.apply(*composed, x), frames.apply(r1, t1, frames.apply(r2, t2, x)))


def test_from_backbone_frame_convention():
    g = torch.Generator().manual_seed(1)
    n, ca, c = torch.randn(3, 7, 3, generator=g).unbind(0)
    rotation, origin = frames.from_backbone(n, ca, c)
    torch.testing.assert_close(rotation.transpose(-1, -2) @ rotation, torch.eye(3).expand(7, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(7))
    assert torch.equal(origin, ca)
    local_c, local_n = frames.invert_apply(rotation, origin, c), frames.invert_apply(rotation, origin, n)
    torch.testing.assert_close(local_c[:, 1:], torch.zeros(7, 2), atol=1e-5, rtol=0)  # C on +x
    assert (local_c[:, 0] > 0).all() and (local_n[:, 1] > 0).all()  # N in the xy-plane, y > 0
    torch.testing.assert_close(local_n[:, 2], torch.zeros(7), atol=1e-5, rtol=0)


def test_reference_clip_shrinks_small_updates_and_keeps_large_ones():
    limit = math.radians(15)
    small, large = torch.tensor([0.5 * limit, 0.0, 0.0]), torch.tensor([0.0, 3 * limit, 0.0])
    torch.testing.assert_close(scale_update(small, limit, "reference"), small * 0.5)  # |x| / limit = 0.5
    torch.testing.assert_close(scale_update(large, limit, "reference"), large)  # unbounded


def test_real_clip_bounds_the_norm_and_keeps_small_updates():
    limit = 1.5
    small, large = torch.tensor([0.3, 0.4, 0.0]), torch.tensor([3.0, 4.0, 0.0])
    torch.testing.assert_close(scale_update(small, limit, "clip"), small)
    torch.testing.assert_close(scale_update(large, limit, "clip"), large * 1.5 / 5.0)
    assert torch.equal(scale_update(torch.zeros(3), limit, "clip"), torch.zeros(3))
