"""Input checks with errors that name the argument, the expected and the received value.

Shape and dtype checks are static, so they also run under ``torch.compile`` and the
``torch.func`` transforms; value checks (NaN, inf, empty proteins, index ranges) need the data
and run only in plain eager mode (:func:`checking_values`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import CoordinatePrecisionWarning, CoordinateScaleWarning, InputError, InputTypeError, warn_at_caller
from ..execution import inspecting_values


class Shapes:
    """Binds named dimensions (B, N, ...) across arguments so that they must agree."""

    def __init__(self, **known: int):
        self.sizes: dict[str, int] = dict(known)

    def check(self, name: str, x: object, dims: tuple[str | int, ...], *, dtype: str = "float") -> torch.Tensor:
        """Check that ``x`` is a tensor of shape ``dims`` (names or literal sizes) and of dtype
        ``dtype`` (the kind ``"float"``, ``"int"`` or ``"bool"``); bind new names."""
        if not isinstance(x, torch.Tensor):
            raise InputTypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if dtype == "float" and not x.is_floating_point():
            raise InputTypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if dtype == "int" and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
            raise InputTypeError(f"{name}: expected an integer tensor, got {x.dtype}")
        if dtype == "bool" and x.dtype != torch.bool:
            raise InputTypeError(f"{name}: expected a torch.bool tensor, got {x.dtype} (use mask.bool())")
        mismatch = x.dim() != len(dims) or any(
            size != (dim if isinstance(dim, int) else self.sizes.get(dim, size))
            for dim, size in zip(dims, x.shape, strict=True)
        )
        if mismatch:  # formatting sizes only here: under torch.compile it would specialise them
            expected = [d if isinstance(d, int) else f"{d}={self.sizes[d]}" if d in self.sizes else d for d in dims]
            raise InputError(f"{name}: expected shape [{', '.join(map(str, expected))}], got {list(x.shape)}")
        for dim, size in zip(dims, x.shape, strict=True):
            if isinstance(dim, str):
                self.sizes.setdefault(dim, size)
        return x


#: The argument names of :func:`check_stack_inputs`'s tensors in the encoder's signature
ENCODER_NAMES = {"s": "node_embed", "rotations": "rotations", "translations": "translations", "mask": "node_mask"}


def check_stack_inputs(
    shapes: Shapes,
    s: object,
    rotations: object,
    translations: object,
    mask: object,
    *,
    names: Mapping[str, str] = ENCODER_NAMES,
    trans_sc: object = None,
    device: torch.device | None = None,
) -> None:
    """The checks of an IPA stack's inputs, shared by :class:`~ipa_export.IPAEncoder`, the BINDRAE
    adapters and flash_ipa's modules: s [B, N, c_s], translations [B, N, 3] (Angstrom), mask
    [B, N] bool, rotations [B, N, 3, 3] and trans_sc [B, N, 3] (each optional: None), all on
    ``device`` when given; a non-empty batch; finite values at valid residues; proper rotations.
    ``shapes`` binds the sizes known beforehand (c_s, ...); errors use the caller's argument
    ``names`` (for the keys s, rotations, translations, mask)."""
    shapes.check(names["s"], s, ("B", "N", "c_s"))
    shapes.check(names["translations"], translations, ("B", "N", 3))
    valid = shapes.check(names["mask"], mask, ("B", "N"), dtype="bool")
    if rotations is not None:
        shapes.check(names["rotations"], rotations, ("B", "N", 3, 3))
    if trans_sc is not None:
        shapes.check("trans_sc", trans_sc, ("B", "N", 3))
    tensors = {names["translations"]: translations, names["rotations"]: rotations, "trans_sc": trans_sc}
    if device is not None:
        check_devices(device, **{names["s"]: s, names["mask"]: mask}, **tensors)  # type: ignore[arg-type]
    check_not_empty(valid)
    check_values(valid, **tensors, **{names["s"]: s})  # type: ignore[arg-type]
    check_rotations(valid, rotations, names["rotations"])  # type: ignore[arg-type]
    warn_16_bit_coordinates(**{k: v for k, v in tensors.items() if k != names["rotations"]})


def warn_16_bit_coordinates(**coordinates: torch.Tensor | None) -> None:
    """Coordinates given in float16/bfloat16 were rounded before the encoder saw them (to ~0.03 /
    0.25 A at 50 A from the origin: neighbours and distances move): a CoordinatePrecisionWarning.
    Eager mode only, as the other checks."""
    if not inspecting_values():
        return
    for name, x in coordinates.items():
        if x is not None and x.dtype in (torch.float16, torch.bfloat16):
            warn_at_caller(
                CoordinatePrecisionWarning(
                    f"{name}: {str(x.dtype).removeprefix('torch.')} coordinates were rounded before the encoder "
                    "saw them (it computes geometry in float32); pass float32 coordinates, e.g. x.float() before "
                    "the cast to 16 bits"
                )
            )


def check_structure_inputs(
    c_s: int,
    node_embed: object,
    translations: object,
    node_mask: object,
    rotations: object = None,
    trans_sc: object = None,
    *,
    device: torch.device | None = None,
) -> None:
    """:func:`check_stack_inputs` with the encoder's argument names: node_embed [B, N, c_s],
    translations [B, N, 3], node_mask [B, N] bool, optional rotations and trans_sc."""
    shapes = Shapes(c_s=c_s)
    check_stack_inputs(shapes, node_embed, rotations, translations, node_mask, trans_sc=trans_sc, device=device)


def check_devices(device: torch.device, **tensors: torch.Tensor | None) -> None:
    """Every given tensor is on ``device``, the parameters' device."""
    for name, x in tensors.items():
        if x is not None and x.device != device:
            raise InputError(
                f"{name}: on device {x.device}, but the encoder's parameters are on {device}; "
                "move the inputs with .to(encoder.device) (or the encoder with encoder.to(device))"
            )


def check_indices(node_mask: torch.Tensor, residue_index: object, chain_index: object) -> None:
    """Optional residue numbers and chain ids: [B, N] integer tensors; chain ids in [0, N)
    at valid residues (checked in plain eager mode only)."""
    shapes = Shapes(B=node_mask.shape[0], N=node_mask.shape[1])
    if residue_index is not None:
        shapes.check("residue_index", residue_index, ("B", "N"), dtype="int")
    if chain_index is None:
        return
    chain = shapes.check("chain_index", chain_index, ("B", "N"), dtype="int")
    if inspecting_values():
        bad = ((chain < 0) | (chain >= chain.shape[1])) & node_mask
        if bad.any():
            where = tuple(bad.nonzero()[0].tolist())
            raise InputError(
                f"chain_index: expected chain ids in [0, {chain.shape[1]}) at valid residues "
                f"(number chains 0, 1, 2, ...), got {chain[where].item()} at (batch, residue) {where}"
            )


def check_neighbours(name: str, neighbours: object, node_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Precomputed neighbour indices: a [B, N, k] int64 tensor on the mask's device; at valid
    residues each entry is -1 (no neighbour) or another valid residue of the same protein
    (values checked in plain eager mode only). Returns it with padded rows set to -1."""
    indices = Shapes(B=node_mask.shape[0], N=node_mask.shape[1]).check(name, neighbours, ("B", "N", k), dtype="int")
    if indices.dtype != torch.long:
        raise InputTypeError(f"{name}: expected int64 indices, got {indices.dtype} (use .long())")
    check_devices(node_mask.device, **{name: indices})
    length = node_mask.shape[1]
    if inspecting_values():
        rows = torch.arange(length, device=indices.device)[:, None]  # [N, 1]
        target_valid = node_mask.gather(1, indices.clamp(0, length - 1).flatten(1)).view_as(indices)
        problems = (
            ((indices < -1) | (indices >= length), f"outside [-1, {length})"),
            (indices == rows, "the residue itself"),
            ((indices >= 0) & ~target_valid, "a padded residue (node_mask False)"),
        )
        for bad, what in problems:
            bad = bad & node_mask[..., None]
            if bad.any():
                where = tuple(bad.nonzero()[0].tolist())
                raise InputError(
                    f"{name}: expected at valid residues the indices of other valid residues, or -1 for no "
                    f"neighbour; got {indices[where].item()} ({what}) at (batch, residue, slot) {where}. "
                    "Compute them with encoder.neighbours(coordinates, node_mask)"
                )
    return torch.where(node_mask[..., None], indices, -1)


def check_not_empty(node_mask: torch.Tensor) -> None:
    """Every batch element must have at least one residue."""
    batch, length = node_mask.shape
    if batch == 0 or length == 0:
        raise InputError(f"node_mask: empty batch, got shape {list(node_mask.shape)}")


#: Largest |value| accepted at a valid residue, by argument: coordinates (Angstrom) beyond
#: 1e5 leave fp32 distances without precision; node embeddings beyond 1e6 overflow LayerNorm.
VALUE_BOUNDS = {"translations": 1e5, "trans_sc": 1e5, "frames.translations": 1e5, "node_embed": 1e6}


def check_values(node_mask: torch.Tensor, **coordinates: torch.Tensor | None) -> None:
    """Eager-only checks: each protein has a valid residue; values are finite (and within
    :data:`VALUE_BOUNDS`) at valid residues."""
    if not inspecting_values():
        return
    empty = (~node_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"node_mask: protein(s) {empty} have no valid residue")
    for name, x in coordinates.items():
        if x is None:
            continue
        bad = ~torch.isfinite(x).flatten(2).all(-1) & node_mask  # [B, N]
        if bad.any():
            where = bad.nonzero()[0].tolist()
            raise InputError(
                f"{name}: expected finite values at valid residues, found NaN or inf at (batch, residue) {tuple(where)}"
            )
        bound = VALUE_BOUNDS.get(name)
        if bound is not None and (large := (x.flatten(2).abs().amax(-1) > bound) & node_mask).any():
            where = tuple(large.nonzero()[0].tolist())
            raise InputError(
                f"{name}: expected |values| <= {bound:.0e} at valid residues"
                + (" (coordinates are in Angstrom)" if name != "node_embed" else "")
                + f", got {x[where].abs().max().item():.3g} at (batch, residue) {where}"
            )


#: Median distance between consecutive valid C-alpha atoms that passes without a warning
#: (Angstrom): 3.8 for trans peptides, 2.9 for cis; chain breaks are rare enough not to move it.
CA_SPACING_RANGE = (2.8, 4.8)
#: Largest |R^T R - I| entry accepted for a rotation in float32 or float64 (scaled up for 16-bit inputs).
ORTHONORMAL_ATOL = 1e-3


def check_rotations(node_mask: torch.Tensor, rotations: torch.Tensor | None, name: str = "rotations") -> None:
    """Eager-only: rotations [B, N, 3, 3] are proper rotations (orthonormal within
    :data:`ORTHONORMAL_ATOL`, determinant +1) at valid residues."""
    if rotations is None or not inspecting_values():
        return
    r = rotations if rotations.dtype == torch.float64 else rotations.float()
    atol = max(ORTHONORMAL_ATOL, 16 * torch.finfo(rotations.dtype).eps)
    with torch.autocast(r.device.type, enabled=False):  # in the input's precision, not autocast's
        error = (r.transpose(-1, -2) @ r - torch.eye(3, dtype=r.dtype, device=r.device)).abs().amax((-2, -1))
        determinant = torch.linalg.det(r)
    not_orthonormal = (error > atol) & node_mask  # [B, N]
    reflection = (determinant < 0) & node_mask & ~not_orthonormal
    for bad, problem in ((not_orthonormal, "R^T R differs from I by {:.3g} (not orthonormal)"), (reflection, None)):
        if bad.any():
            where = tuple(bad.nonzero()[0].tolist())
            count = int(bad.sum())
            what = problem.format(error[where].item()) if problem else "determinant -1 (a reflection)"
            raise InputError(
                f"{name}: expected proper rotation matrices at valid residues (R^T R = I within {atol:g}, det R = +1); "
                f"at (batch, residue) {where}{f' and {count - 1} more' if count > 1 else ''}: {what}. "
                "Build frames by Gram-Schmidt from the N, CA, C atoms (ipa_export.model.frames.from_backbone), "
                "or pass rotations=None for identity frames"
            )


def warn_unusual_ca_spacing(node_mask: torch.Tensor, translations: torch.Tensor) -> bool:
    """Eager-only: warn (:class:`~ipa_export.errors.CoordinateScaleWarning`, at the caller's line)
    when the median distance between consecutive valid C-alpha atoms [B, N, 3] of a protein is
    outside :data:`CA_SPACING_RANGE`: coordinates in nanometres, or residues not in sequence
    order. The message does not depend on the values (they are in the warning's ``medians``).
    Returns whether it warned."""
    if not inspecting_values() or node_mask.shape[1] < 2:
        return False
    # Valid residues first, in sequence order; padding (and whatever it holds) after them.
    order = torch.argsort((~node_mask).to(torch.uint8), dim=1, stable=True)
    ca = torch.gather(translations.float(), 1, order[..., None].expand(-1, -1, 3))
    steps = (ca[:, 1:] - ca[:, :-1]).norm(dim=-1)  # [B, N - 1]
    real = torch.arange(steps.shape[1], device=steps.device) < (node_mask.sum(1, keepdim=True) - 1)
    median = torch.where(real, steps, torch.nan).nanmedian(dim=1).values  # NaN: fewer than 2 residues
    low, high = CA_SPACING_RANGE
    odd = (median < low) | (median > high)
    if not odd.any():
        return False
    short = bool((median < low).any())
    cause = (
        f"below {low} Angstrom: coordinates in nanometres? Multiply them by 10, the encoder expects Angstrom"
        if short
        else f"above {high} Angstrom: residues not in sequence order, or not C-alpha positions? Pass each chain's "
        "residues in sequence order (mask out missing ones), in Angstrom"
    )
    warn_at_caller(
        CoordinateScaleWarning(
            f"translations: the median distance between consecutive valid C-alpha atoms is {cause} (expected about "
            "3.8). Warned once per encoder; the measured medians are in the warning's .medians. For noisy "
            "coordinates (diffusion, flow matching) pass check_ca_spacing=False to the encoder's forward.",
            {i: median[i].item() for i in odd.nonzero().flatten().tolist()},
        )
    )
    return True
