"""DistributedDataParallel on 2 gloo ranks around an export, frozen and fine-tuned, with the
settings the README gives: the parameters equal one process training on the whole batch."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_chain
from torch.nn.parallel import DistributedDataParallel

from ipa_export import FrozenModuleWarning, IPAEncoder

EXPORT = Path(__file__).parents[1] / "checkpoints" / "bindrae-ipa-tiny"
B, N, STEPS = 4, 24, 3


class Model(torch.nn.Module):
    """Node embeddings from a trainable layer (the export's residue table is never used) ->
    encoder -> a head on ``s`` only (the last block's frame update gets no gradient)."""

    def __init__(self, trainable: bool):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(8, 64)
        self.encoder = IPAEncoder.from_pretrained(EXPORT, trainable=trainable)  # eval mode: no dropout
        self.head = torch.nn.Linear(64, 1)

    def forward(self, features, ca, mask):
        return self.head(self.encoder(self.embed(features), ca, mask).s).square().mean()


def batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    ca = torch.stack([random_chain(N, g) for _ in range(B)])
    return torch.randn(B, N, 8, generator=g), ca, torch.ones(B, N, dtype=torch.bool)


def train(model: torch.nn.Module, rows: slice) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    data = [x[rows] for x in batch()]
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(*data).backward()
        optimizer.step()
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    rows = slice(rank * B // 2, (rank + 1) * B // 2)
    results: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenModuleWarning)
        results["frozen"] = train(DistributedDataParallel(Model(trainable=False)), rows)
    results["static_graph"] = train(DistributedDataParallel(Model(trainable=True), static_graph=True), rows)
    excluded = Model(trainable=True)
    excluded.encoder.residue_embedding.requires_grad_(False)
    excluded.encoder.ipa_stack.ipa_blocks[-1].backbone_update.requires_grad_(False)
    results["excluded"] = train(DistributedDataParallel(excluded), rows)
    try:  # the default settings, with parameters the loss never reaches
        train(DistributedDataParallel(Model(trainable=True)), rows)
        results["default"] = "no error"
    except RuntimeError as error:
        results["default"] = str(error)
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes, four models each: ~30 CPU-seconds
def test_ddp_on_two_ranks_equals_one_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FrozenModuleWarning)
        frozen = train(Model(trainable=False), slice(None))
    fine_tuned = train(Model(trainable=True), slice(None))
    start = Model(trainable=True).state_dict()
    for name, single in (("frozen", frozen), ("static_graph", fine_tuned), ("excluded", fine_tuned)):
        for key, value in single.items():
            for rank in ranks:
                torch.testing.assert_close(rank[name][key], value, atol=1e-5, rtol=1e-4, msg=f"{name} {key}")
    reference = IPAEncoder.from_pretrained(EXPORT).state_dict()
    assert all(torch.equal(v, reference[k[len("encoder.") :]]) for k, v in frozen.items() if k.startswith("encoder."))
    moved = [k for k, v in fine_tuned.items() if not torch.equal(v, start[k])]
    assert "encoder.ipa_stack.ipa_blocks.0.ipa.linear_q.weight" in moved
    assert "encoder.residue_embedding.weight" not in moved  # never used: no gradient
    for rank in ranks:
        assert "parameters that were not used in producing loss" in rank["default"]
