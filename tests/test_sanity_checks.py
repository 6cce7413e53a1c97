"""Unit sanity checks: C-alpha spacing (Angstrom, sequence order) warns, rotations that are
not proper rotations raise; both only at valid residues, both skipped under torch.func."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_encoder, random_chain, random_rotation

from ipa_export import CoordinatePrecisionWarning, CoordinateScaleWarning, create_flashipa_module
from ipa_export.model.validation import check_rotations, warn_unusual_ca_spacing

B, N = 2, 30


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ca = torch.stack([random_chain(N, g) for _ in range(B)])
    return torch.randn(B, N, 32, generator=g), ca, torch.ones(B, N, dtype=torch.bool)


def spacing_warnings(*args, encoder=None, **kwargs) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            (encoder or make_encoder())(*args, **kwargs)
    return [w for w in caught if issubclass(w.category, CoordinateScaleWarning)]


def test_a_chain_in_angstrom_gives_no_warning():
    assert spacing_warnings(*inputs()) == []


def test_nanometre_coordinates_warn_with_the_cause_and_the_fix():
    node_embed, ca, mask = inputs()
    (warning,) = spacing_warnings(node_embed, ca / 10, mask)
    message = str(warning.message)
    assert message.startswith(
        "translations: the median distance between consecutive valid C-alpha atoms is below 2.8 Angstrom: "
        "coordinates in nanometres? Multiply them by 10"
    )
    assert "pass check_ca_spacing=False" in message
    assert sorted(warning.message.medians) == [0, 1]
    assert all(0.3 < m < 0.4 for m in warning.message.medians.values())


def test_residues_out_of_sequence_order_warn():
    node_embed, ca, mask = inputs()
    shuffled = ca.clone()
    shuffled[1] = ca[1, torch.randperm(N, generator=torch.Generator().manual_seed(1))]
    (warning,) = spacing_warnings(node_embed, shuffled, mask)
    assert "above 4.8 Angstrom" in str(warning.message) and "Pass each chain's residues in sequence order" in str(
        warning.message
    )
    assert list(warning.message.medians) == [1]


def test_spacing_is_measured_over_valid_residues_only():
    node_embed, ca, mask = inputs()
    mask[0, 10:14] = False  # a gap: residues 9 and 14 become consecutive (one long step)
    ca[0, 10:14] = 1e4  # garbage at masked positions
    mask[1, 25:] = False
    ca[1, 25:] = float("nan")
    assert spacing_warnings(node_embed, ca, mask) == []
    ca[1, :25] /= 10  # only protein 1's valid residues are in nanometres
    (warning,) = spacing_warnings(node_embed, ca, mask)
    assert list(warning.message.medians) == [1]


def test_the_spacing_warning_comes_once_per_encoder_with_one_message_at_the_callers_line():
    node_embed, ca, mask = inputs()
    encoder = make_encoder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for scale in (0.1, 0.2, 0.05):  # three noisy calls, three different medians
                encoder(node_embed, ca * scale, mask)
            make_encoder()(node_embed, ca * 0.3, mask)  # another encoder warns once too
    first, second = [w for w in caught if issubclass(w.category, CoordinateScaleWarning)]
    assert str(first.message) == str(second.message)  # stable: Python's filters can de-duplicate it
    assert first.message.medians != second.message.medians
    assert (first.filename, second.filename) == (__file__, __file__)  # the line calling the encoder


def test_the_spacing_warning_points_at_the_line_calling_a_parent_module():
    class Parent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = make_encoder()

        def forward(self, *args):
            return self.encoder(*args)

    node_embed, ca, mask = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            Parent()(node_embed, ca / 10, mask)
    (warning,) = [w for w in caught if issubclass(w.category, CoordinateScaleWarning)]
    assert (
        warning.filename == __file__ and "self.encoder(*args)" in open(__file__).read().splitlines()[warning.lineno - 1]
    )


def test_check_ca_spacing_false_switches_the_check_off():
    node_embed, ca, mask = inputs()
    noisy = 10 * torch.randn(ca.shape, generator=torch.Generator().manual_seed(5))  # a diffusion model's input
    assert spacing_warnings(node_embed, noisy, mask, check_ca_spacing=False) == []
    assert len(spacing_warnings(node_embed, noisy, mask)) == 1


def test_proper_rotations_are_accepted_also_under_autocast():
    node_embed, ca, mask = inputs()
    rotations = random_rotation(torch.Generator().manual_seed(2), (B, N))
    with torch.no_grad():
        make_encoder()(node_embed, ca, mask, rotations=rotations)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the check runs in fp32 all the same
            make_encoder()(node_embed, ca, mask, rotations=rotations)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda r: 2 * r, "R^T R differs from I by 3 (not orthonormal)"),
        (lambda r: r + 0.01, "(not orthonormal)"),
        (lambda r: -r, "determinant -1 (a reflection)"),
    ],
    ids=["scaled", "perturbed", "reflection"],
)
def test_rotations_that_are_not_proper_rotations_raise(damage, problem):
    node_embed, ca, mask = inputs()
    rotations = random_rotation(torch.Generator().manual_seed(2), (B, N))
    rotations[1, 7] = damage(rotations[1, 7])
    with pytest.raises(ValueError) as error:
        make_encoder()(node_embed, ca, mask, rotations=rotations)
    message = str(error.value)
    assert message.startswith(
        "rotations: expected proper rotation matrices at valid residues (R^T R = I within 0.001, det R = +1); "
        "at (batch, residue) (1, 7): "
    )
    assert problem in message and "Gram-Schmidt from the N, CA, C atoms" in message


def test_the_adapter_module_checks_its_frames_too():
    module = create_flashipa_module(c_s=32, c_z=16, depth=1, c_hidden=8, no_heads=2)
    node_embed, ca, mask = inputs()
    z = torch.zeros(B, N, 2, 16)
    with pytest.raises(ValueError, match=r"^frames.rotations: expected proper rotation matrices"):
        module(node_embed, (3 * torch.eye(3).expand(B, N, 3, 3), ca), z, z, mask)


def test_rotation_check_ignores_padding():
    node_embed, ca, mask = inputs()
    rotations = random_rotation(torch.Generator().manual_seed(2), (B, N))
    mask[1, 20:] = False
    rotations[1, 20:] = 5.0
    with torch.no_grad():
        make_encoder()(node_embed, ca, mask, rotations=rotations)


def test_value_checks_are_skipped_under_torch_func():
    rotations = 3 * torch.eye(3).expand(4, B, N, 3, 3)
    ca = torch.zeros(4, B, N, 3)  # every step 0 Angstrom
    mask = torch.ones(B, N, dtype=torch.bool)
    with pytest.raises(ValueError):
        check_rotations(mask, rotations[0])
    with pytest.warns(CoordinateScaleWarning):
        warn_unusual_ca_spacing(mask, ca[0])

    def checked(r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_rotations(mask, r)
        warn_unusual_ca_spacing(mask, t)
        return r.sum() + t.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error", CoordinateScaleWarning)
        assert torch.func.vmap(checked)(rotations, ca).shape == (4,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_coordinates_warn_that_they_were_rounded(dtype):
    # fp16 coordinates move outputs by ~1 (neighbours and distances of rounded positions).
    node_embed, ca, mask = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            make_encoder()(node_embed, (ca + 40.0).to(dtype), mask)
            make_encoder()(node_embed, ca + 40.0, mask)  # float32: no warning
    found = [str(w.message) for w in caught if issubclass(w.category, CoordinatePrecisionWarning)]
    name = str(dtype).removeprefix("torch.")
    assert found == [
        f"translations: {name} coordinates were rounded before the encoder saw them (it computes geometry in "
        "float32); pass float32 coordinates, e.g. x.float() before the cast to 16 bits"
    ]
