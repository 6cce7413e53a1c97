"""Exact k-nearest-neighbour search in O(N) memory.

:func:`knn` returns neighbour indices and their distances. The indices come from the custom op
``ipa_export::knn`` (opaque to ``torch.compile``: no graph break, no recompilation for new
lengths); the distances are computed outside it with ordinary differentiable tensor ops, so
``torch.func.grad``/``jacrev``/``jvp``/``vmap`` and ``backward`` pass through (the indices are
piecewise constant and carry no gradient).

**Order.** Neighbours are ordered by :func:`pair_distances`, ``|x_i - x_j|`` of the given
coordinates in the geometry dtype (float32, float64 for float64 input), the values the
reference's ``torch.norm(x_i - x_j)`` computes; exactly equal values go by residue index. So a
real chain gets the neighbours, order and k-th slot of the reference, and of the exact answer
wherever rounding cannot decide. With ``tie_tolerance`` > 0 (Angstrom; the config's
``knn_tie_tolerance``) distances closer than that are tied too (chained: each gap below it
joins the next candidate to the group) and ordered by index, so idealised geometry whose
distances are equal in exact arithmetic (a line, a grid, an ideal helix) gives the same
neighbours whatever the rotation or placement of the input, as long as rounding moves its
distances by less than the tolerance.

The search, per chunk of ``chunk_size`` query rows (largest temporary [B, chunk_size, N]):

1. squared distances of the chunk to all residues by one GEMM (coordinates centred on the
   protein's centroid), the ``k + 8`` smallest taken as candidates (see :func:`smallest`);
2. the candidates' exact distances (:func:`pair_distances`), sorted into tie groups as above;
3. the result is certified: the tie group at the k-th slot must end before the last
   candidate, and no residue outside the candidates can be as close as that group's end plus
   the tolerance (the GEMM's rounding error bounded); rows that fail retry with twice the
   candidates, up to all.
"""

from __future__ import annotations

import torch

from .frames import geometry_dtype, masked_mean

DEFAULT_CHUNK_SIZE = 256
EXTRA_CANDIDATES = 8
BLOCK_COLUMNS = 64  #: columns per block of the candidate pre-selection (see smallest)
_GEMM_RTOL = 1e-5  # bound on the GEMM squared-distance error, relative to the squared radius


def pair_distances(x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """``|x_i - x_j|``: x [..., 3], neighbours [..., k, 3] (Angstrom) -> [..., k], the way the
    reference computes its kNN distances (difference, then the 2-norm)."""
    return torch.linalg.vector_norm(x[..., None, :] - neighbours, dim=-1)


@torch.library.custom_op("ipa_export::knn", mutates_args=())
def knn_indices(
    coords: torch.Tensor, mask: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE, tie_tolerance: float = 0.0
) -> torch.Tensor:
    """Indices [B, N, k] int64 of the k nearest other valid residues, nearest first (ties, see
    the module docstring, by index); -1 where there is no neighbour (fewer than k other valid
    residues, or a padded query). coords [B, N, 3] float (Angstrom); mask [B, N] bool;
    tie_tolerance >= 0 Angstrom."""
    batch, length, _ = coords.shape
    indices = torch.full((batch, length, k), -1, dtype=torch.long, device=coords.device)
    k_found = min(k, max(length - 1, 0))
    if k_found == 0:
        return indices
    valid = mask[..., None]
    x = torch.where(valid, coords.to(geometry_dtype(coords.dtype)), 0.0)  # whatever padded positions hold (even NaN)
    centred = torch.where(valid, x - masked_mean(x, mask)[:, None], 0.0)  # [B, N, 3], for the GEMM
    squares = centred.square().sum(-1)  # [B, N]
    gemm_error = _GEMM_RTOL * 4 * squares.amax(-1)[:, None, None]  # [B, 1, 1], bounds |GEMM d2 - exact d2|
    ones = torch.ones_like(squares)[..., None]
    # d2[i, j] = |x_i|^2 + |x_j|^2 - 2 x_i.x_j as one product; padded columns get +inf.
    lhs = torch.cat([centred, squares[..., None], ones], dim=-1)  # [B, N, 5]
    rhs = torch.cat([-2 * centred, ones, squares.masked_fill(~mask, float("inf"))[..., None]], dim=-1).transpose(1, 2)
    columns = torch.arange(length, device=coords.device)
    buffer = x.new_empty(batch * min(chunk_size, length) * length)  # one [B, n, N] block, reused
    for start in range(0, length, chunk_size):
        rows = columns[start : start + chunk_size]
        d2 = torch.bmm(lhs[:, rows], rhs, out=buffer[: batch * len(rows) * length].view(batch, len(rows), length))
        d2[:, torch.arange(len(rows), device=coords.device), rows] = float("inf")  # not itself
        indices[:, rows, :k_found] = _select(d2, x, rows, mask[:, rows], k_found, tie_tolerance, gemm_error)
    return indices


def _select(
    d2: torch.Tensor,
    x: torch.Tensor,
    rows: torch.Tensor,
    row_mask: torch.Tensor,
    k: int,
    tol: float,
    gemm_error: torch.Tensor,
) -> torch.Tensor:
    """Certified top-k of one chunk in (tie group, index) order: d2 [B, n, N] GEMM squared
    distances (inf for excluded columns), x [B, N, 3] coordinates -> indices [B, n, k] (-1: none)."""
    length = d2.shape[-1]
    count = min(k + EXTRA_CANDIDATES, length)
    while True:
        approx, candidates = smallest(d2, count)  # [B, n, c]
        neighbours = x.gather(1, candidates.flatten(1)[..., None].expand(-1, -1, 3)).unflatten(1, candidates.shape[1:])
        exact = torch.where(torch.isinf(approx), float("inf"), pair_distances(x[:, rows], neighbours))
        exact, order = torch.sort(exact, dim=-1, stable=True)
        candidates = candidates.gather(-1, order)
        starts = ~(exact.diff(dim=-1) <= tol)  # a gap above tol (or inf/nan) starts a group
        group = torch.cat([torch.zeros_like(starts[..., :1]), starts], dim=-1).long().cumsum(-1)
        order = torch.sort(group * length + candidates, dim=-1).indices[..., :k]
        chosen, chosen_distance = candidates.gather(-1, order), exact.gather(-1, order)
        if count >= length:
            break
        last_group = group.gather(-1, order[..., -1:])
        group_end = torch.where(group == last_group, exact, -float("inf")).amax(-1, keepdim=True)
        outside = approx.amax(-1, keepdim=True)  # every residue outside the candidates is at least this far (GEMM)
        closest_outside = (outside - gemm_error).clamp(min=0).sqrt()
        certified = (group[..., -1:] > last_group) & (closest_outside > group_end + tol)
        if bool((certified | torch.isinf(outside) | ~row_mask[..., None]).all()):
            break
        count = min(2 * count, length)
    return torch.where(torch.isfinite(chosen_distance) & row_mask[..., None], chosen, -1)


def smallest(d2: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` smallest values of each row and their columns, unsorted, as
    ``torch.topk(d2, count, largest=False)`` (among equal values at the count-th place, which
    ones are returned may differ). d2 [..., N] -> values, indices [..., count].

    Long rows are searched in blocks of ``BLOCK_COLUMNS`` columns: the count smallest values lie in the
    count blocks with the smallest minima (a value outside them is preceded by those blocks'
    count minima) or in the last, partial block; only those columns go through ``topk``."""
    length = d2.shape[-1]
    blocks = length // BLOCK_COLUMNS
    if count * BLOCK_COLUMNS * 4 > length:
        return torch.topk(d2, count, dim=-1, largest=False, sorted=False)
    minima = d2[..., : blocks * BLOCK_COLUMNS].unflatten(-1, (blocks, BLOCK_COLUMNS)).amin(-1)  # [..., blocks]
    chosen = torch.topk(minima, count, dim=-1, largest=False, sorted=False).indices
    offsets = torch.arange(BLOCK_COLUMNS, device=d2.device)
    columns = (chosen[..., None] * BLOCK_COLUMNS + offsets).flatten(-2)  # [..., count * BLOCK_COLUMNS]
    rest = torch.arange(blocks * BLOCK_COLUMNS, length, device=d2.device).expand(*columns.shape[:-1], -1)
    columns = torch.cat([columns, rest], dim=-1)
    values, picked = torch.topk(d2.gather(-1, columns), count, dim=-1, largest=False, sorted=False)
    return values, columns.gather(-1, picked)


@knn_indices.register_fake
def _(
    coords: torch.Tensor, mask: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE, tie_tolerance: float = 0.0
) -> torch.Tensor:
    batch, length, _ = coords.shape
    return coords.new_empty((batch, length, k), dtype=torch.long)


def _knn_vmap(info, in_dims, coords, mask, k, chunk_size=DEFAULT_CHUNK_SIZE, tie_tolerance=0.0):
    """vmap rule: fold the vmapped dimension into the batch dimension."""
    size = info.batch_size
    coords_dim, mask_dim = in_dims[:2]
    coords = coords.movedim(coords_dim, 0) if coords_dim is not None else coords.expand(size, *coords.shape)
    mask = mask.movedim(mask_dim, 0) if mask_dim is not None else mask.expand(size, *mask.shape)
    found = knn_indices(coords.flatten(0, 1), mask.flatten(0, 1), k, chunk_size, tie_tolerance)
    return found.unflatten(0, (size, -1)), 0


torch.library.register_vmap("ipa_export::knn", _knn_vmap)


def knn(
    coords: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    tie_tolerance: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest other valid residues of each residue.

    coords [B, N, 3] float (Angstrom); mask [B, N] bool; tie_tolerance (Angstrom, see the module
    docstring). Returns ``(distances [B, N, k], indices [B, N, k] int64)``, nearest first; an
    empty slot has distance ``inf`` and index -1. Distances are :func:`pair_distances` in the
    geometry dtype (float32, float64 for float64 coords), differentiable in ``coords``.
    """
    indices = knn_indices(coords.detach(), mask, k, chunk_size, tie_tolerance)
    return neighbour_distances(coords, indices), indices


def neighbour_distances(coords: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """:func:`pair_distances` [B, N, k] (Angstrom, in the geometry dtype) from coords [B, N, 3] to
    the neighbours ``indices`` [B, N, k] int64 (-1: no neighbour, distance ``inf``);
    differentiable in ``coords``."""
    coords = coords.to(geometry_dtype(coords.dtype))
    neighbours = coords.gather(1, indices.clamp(min=0).flatten(1)[..., None].expand(-1, -1, 3))
    distances = pair_distances(coords, neighbours.unflatten(1, indices.shape[1:]))
    return torch.where(indices >= 0, distances, float("inf"))
