"""Rigid backbone frames as plain tensors.

A frame is a pair ``(rotations [..., 3, 3], translations [..., 3])`` acting on local
points as ``x_global = R @ x_local + t`` (column convention, Angstrom). Every function
here is a pure tensor function, so ``torch.compile`` traces it without graph breaks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Frames(NamedTuple):
    """Backbone frames: ``rotations`` [..., 3, 3] and ``translations`` [..., 3] (Angstrom)."""

    rotations: torch.Tensor
    translations: torch.Tensor


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype geometry is computed in for inputs or parameters of ``dtype``: float64 for
    float64, else float32 (coordinates, distances, frames and points are never rounded to 16 bits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., N, C], [..., N] bool -> [..., C]: the mean over the valid residues (0 if none), e.g. a
    protein's centroid or its pooled embedding."""
    weights = mask[..., None].to(x.dtype)
    return (x * weights).sum(-2) / weights.sum(-2).clamp(min=1)


def apply(rotations: torch.Tensor, translations: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Local to global: ``R x + t``. rotations [..., 3, 3], translations/points [..., 3]."""
    return torch.einsum("...ij,...j->...i", rotations, points) + translations


def invert_apply(rotations: torch.Tensor, translations: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Global to local: ``R^T (x - t)``. Shapes as in :func:`apply`."""
    return invert_rotate(rotations, points - translations)


def invert_rotate(rotations: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Global to local directions: ``R^T v``. rotations [..., 3, 3], vectors [..., 3]."""
    return torch.einsum("...ji,...j->...i", rotations, vectors)


def compose(frames: Frames, update: Frames) -> Frames:
    """``frames ∘ update``: ``R <- R dR`` and ``t <- R dt + t``."""
    rotations, translations = frames
    return Frames(rotations @ update.rotations, apply(rotations, translations, update.translations))


def axis_angle_to_matrix(axis_angle: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Rodrigues' formula: [..., 3] axis-angle vectors (radians) to [..., 3, 3] rotations.

    ``R = I + sin(θ) K + (1 - cos(θ)) K²`` with θ = |ω| and K the skew matrix of
    ω / max(θ, eps). A zero vector gives exactly the identity.
    """
    angle = torch.linalg.vector_norm(axis_angle, dim=-1, keepdim=True)  # [..., 1]
    x, y, z = (axis_angle / angle.clamp(min=eps)).unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).unflatten(-1, (3, 3))
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    angle = angle[..., None]  # [..., 1, 1]
    return eye + torch.sin(angle) * skew + (1 - torch.cos(angle)) * (skew @ skew)


def from_backbone(n: torch.Tensor, ca: torch.Tensor, c: torch.Tensor, eps: float = 1e-8) -> Frames:
    """Frames from backbone atoms by Gram-Schmidt (AlphaFold2 Suppl. Algorithm 21).

    n, ca, c: [..., 3] in Angstrom. The origin is CA, x points from CA to C and the
    N atom lies in the xy-plane with positive y.
    """
    e1 = c - ca
    e1 = e1 / torch.linalg.vector_norm(e1, dim=-1, keepdim=True).clamp(min=eps)
    u2 = n - ca
    e2 = u2 - (e1 * u2).sum(-1, keepdim=True) * e1
    e2 = e2 / torch.linalg.vector_norm(e2, dim=-1, keepdim=True).clamp(min=eps)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return Frames(torch.stack([e1, e2, e3], dim=-1), ca)


def identity_rotations(shape: torch.Size | tuple[int, ...], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity rotations of shape [*shape, 3, 3]."""
    return torch.eye(3, device=device, dtype=dtype).expand(*shape, 3, 3)
