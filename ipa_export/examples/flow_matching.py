"""A small frame flow-matching model conditioned on a frozen encoder export.

The model learns to carry noisy backbone frames (uniform random rotations, Gaussian C-alpha
positions) to real protein backbones. A trainable node embedder (the export's residue-type
table + time) feeds the frozen :class:`~ipa_export.IPAEncoder`, which reads the noisy frames
and residue numbers; a trainable head turns the encoder's invariant features into the clean
frames, as updates in each residue's own frame, so the model is SE(3) equivariant.
Translations follow straight lines ``x_t = (1 - t) x_0 + t x_1`` and rotations geodesics
``R_t = R_0 exp(t log(R_0^T R_1))``; the sampler integrates the flow with Euler steps. The
frame geometry runs in float32 even under ``torch.autocast`` (only the layers use its dtype).

    python -m ipa_export.examples.flow_matching --export checkpoints/bindrae-ipa-tiny \
        --structures tests/data/structures/*.pdb.gz --steps 300

``--export`` takes an export directory or a Hub repository id, ``--structures`` PDB/mmCIF files.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ipa_export import FrozenModuleWarning, IPAEncoder
from ipa_export.model.frames import axis_angle_to_matrix, from_backbone
from ipa_export.structures.reader import read_backbone

log = logging.getLogger(__name__)

NOISE_SCALE = 10.0  #: Angstrom, std of the prior's C-alpha positions


def fp32(x: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """A region without autocast on ``x``'s device: frame geometry stays in float32."""
    return torch.autocast(x.device.type, enabled=False)


def random_rotations(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random rotations [*shape, 3, 3] from normalised Gaussian quaternions."""
    w, x, y, z = nn.functional.normalize(torch.randn(*shape, 4, generator=generator), dim=-1).unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def rotation_log(rotations: torch.Tensor) -> torch.Tensor:
    """[..., 3, 3] rotations -> [..., 3] float32 axis-angle vectors (radians); inverse of
    Rodrigues. Finite for any input dtype (the identity gives zeros; bf16 inputs are computed
    in float32); the axis loses accuracy as the angle approaches pi."""
    with fp32(rotations):
        r = rotations.float()
        skew = torch.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
        sin = torch.linalg.vector_norm(skew, dim=-1) / 2
        cos = (r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
        angle = torch.atan2(sin, cos)
        small = (sin < 1e-4) & (cos > 0)  # angle / (2 sin(angle)) -> 1/2 + angle^2 / 12 near the identity
        scale = torch.where(small, 0.5 + angle.square() / 12, angle / (2 * sin.clamp(min=1e-4)))
        return skew * scale[..., None]


def load_crops(paths: list[Path], length: int) -> tuple[torch.Tensor, ...]:
    """Every non-overlapping crop of ``length`` residues of the first chain of each file:
    rotations [M, L, 3, 3], centred C-alpha positions [M, L, 3] (Angstrom), residue types
    [M, L] and residue numbers [M, L] (from the file, so gaps are kept)."""
    crops: list[list[torch.Tensor]] = [[], [], [], []]
    for path in paths:
        backbone = read_backbone(path)
        frames = from_backbone(backbone.n, backbone.ca, backbone.c)
        numbers = torch.tensor(
            [int(rid.split(":")[1].rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")) for rid in backbone.residue_ids]
        )
        for start in range(0, len(backbone.sequence) - length + 1, length):
            crop = slice(start, start + length)
            ca = frames.translations[crop]
            for store, value in zip(
                crops, (frames.rotations[crop], ca - ca.mean(0), backbone.aatype[crop], numbers[crop]), strict=True
            ):
                store.append(value)
    return tuple(torch.stack(store) for store in crops)


class FrameFlow(nn.Module):
    """Trainable node embedder -> frozen encoder -> trainable head predicting clean frames."""

    def __init__(self, encoder: IPAEncoder, time_dim: int = 32):
        super().__init__()
        c_s = encoder.config.c_s
        self.encoder = encoder  # frozen (from_pretrained): eval mode and no gradients, even under .train()
        self.time_dim = time_dim
        self.embed = nn.Sequential(nn.Linear(c_s + time_dim, c_s), nn.GELU(), nn.Linear(c_s, c_s))
        self.head = nn.Sequential(nn.LayerNorm(c_s), nn.Linear(c_s, c_s), nn.GELU(), nn.Linear(c_s, 7))

    def time_features(self, t: torch.Tensor, length: int) -> torch.Tensor:
        """t [B] in [0, 1] -> [B, L, time_dim] sinusoidal features."""
        freqs = torch.exp(torch.arange(self.time_dim // 2) * (-math.log(1000.0) / (self.time_dim // 2)))
        angles = 1000.0 * t[:, None] * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, None].expand(-1, length, -1)

    def forward(self, aatype, residue_index, rotations, translations, t):
        """Predicted clean frames at noisy frames (rotations [B, L, 3, 3], translations [B, L, 3])
        and time t [B]: rotations [B, L, 3, 3] and C-alpha positions [B, L, 3]."""
        node = self.encoder.embed_residues(aatype)
        node = node + self.embed(torch.cat([node, self.time_features(t, aatype.shape[1])], dim=-1))
        mask = torch.ones(aatype.shape, dtype=torch.bool)
        # noisy frames are this model's normal input: no C-alpha spacing check
        s = self.encoder(node, translations, mask, rotations, residue_index=residue_index, check_ca_spacing=False).s
        omega, offset, pull = self.head(s).float().split([3, 3, 1], dim=-1)  # local axis-angle, local offset, scalar
        with fp32(s):
            centre = translations.mean(1, keepdim=True)
            offset = NOISE_SCALE * torch.einsum("...ij,...j->...i", rotations, offset) + pull * (centre - translations)
            return rotations @ axis_angle_to_matrix(omega), translations + offset


def flow_matching_loss(model, batch, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the predicted clean frames at random times on one batch of crops, and the
    loss of the trivial baseline that predicts the noisy frames themselves (no motion)."""
    rotations_1, translations_1, aatype, residue_index = batch
    size, length = aatype.shape
    t = torch.rand(size, generator=generator)[:, None, None]
    rotations_0 = random_rotations((size, length), generator)
    translations_0 = NOISE_SCALE * torch.randn(size, length, 3, generator=generator)
    with fp32(translations_0):
        translations_t = (1 - t) * translations_0 + t * translations_1
        rotations_t = rotations_0 @ axis_angle_to_matrix(t * rotation_log(rotations_0.transpose(-1, -2) @ rotations_1))
    rotations, translations = model(aatype, residue_index, rotations_t, translations_t, t[:, 0, 0])

    def error(r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # chordal distance + positions in prior stds
        return (r - rotations_1).square().sum((-1, -2)).mean() + (x - translations_1).square().sum(
            -1
        ).mean() / NOISE_SCALE**2

    return error(rotations, translations), error(rotations_t, translations_t)


@torch.no_grad()
def sample(model, aatype, residue_index, steps: int = 50, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler integration from the prior (t = 0) to t = 1 for residue types [B, L]: rotations
    [B, L, 3, 3] and C-alpha positions [B, L, 3] (Angstrom)."""
    size, length = aatype.shape
    rotations = random_rotations((size, length), generator)
    translations = NOISE_SCALE * torch.randn(size, length, 3, generator=generator)
    for i in range(steps):
        clean_rotations, clean = model(aatype, residue_index, rotations, translations, torch.full((size,), i / steps))
        fraction = 1 / (steps - i)  # dt / (1 - t): the step towards the predicted clean frames
        with fp32(translations):
            rotations = rotations @ axis_angle_to_matrix(
                fraction * rotation_log(rotations.transpose(-1, -2) @ clean_rotations)
            )
            translations = translations + fraction * (clean - translations)
    return rotations, translations


def train(export, structures, steps: int, *, length: int = 32, batch: int = 4, lr: float = 3e-3, seed: int = 0):
    """Train for ``steps`` on crops of ``structures``. Returns the model, the training losses
    and the evaluation ratio (model loss / no-motion baseline, on every crop, fresh noise)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = load_crops(structures, length)
    model = FrameFlow(IPAEncoder.from_pretrained(export))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenModuleWarning)  # the encoder stays frozen on purpose
        model.train()
    losses = []
    for step in range(steps):
        index = torch.randint(len(data[0]), (batch,), generator=generator)
        loss, _ = flow_matching_loss(model, [x[index] for x in data], generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            log.info("step %d: loss %.3f", step, loss.item())
    model.eval()
    with torch.no_grad():
        loss, baseline = flow_matching_loss(model, data, generator)
    return model, losses, (loss / baseline).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and sample a small frame flow-matching model.")
    parser.add_argument("--export", required=True, help="an export directory or Hub repository id")
    parser.add_argument("--structures", nargs="+", type=Path, required=True, help="PDB or mmCIF files to train on")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, _, ratio = train(args.export, args.structures, args.steps, seed=args.seed)
    log.info("evaluation: loss / no-motion baseline = %.3f", ratio)
    _, _, aatype, residue_index = load_crops(args.structures[:1], 32)
    _, ca = sample(model, aatype[:1], residue_index[:1], generator=torch.Generator().manual_seed(args.seed))
    bonds = (ca[0, 1:] - ca[0, :-1]).norm(dim=-1)
    log.info("sample: %d residues, consecutive C-alpha distance %.2f +- %.2f A", len(ca[0]), bonds.mean(), bonds.std())


if __name__ == "__main__":
    main()
