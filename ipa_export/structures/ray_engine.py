"""The corpus job on Ray Data, for corpora past one machine (``pip install 'ipa-export[ray]'``).

The input list becomes a Ray dataset; parsing runs as Ray tasks (:func:`_parse_block`), and
``map_batches`` with an actor pool embeds (:class:`_Embedder`: each actor loads the export
once, compiled if asked, and batches its rows by length under the residue budget). The
driver streams the results into the same shards, ``_errors.jsonl`` and manifest as the local
engine, so ids, schema and resume are the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingDependencyError
from .batching import LengthBucketer
from .inputs import Source
from .pipeline import Batching, Failed, Parsed, RunOutput, embed_batch, node_embeddings, parse_sources
from .reader import Backbone
from .shards import TENSOR_COLUMNS, records_table

__all__ = ["run_ray"]

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 64  #: structures per parse task and chains per actor call


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError("--engine ray needs Ray Data: pip install 'ipa-export[ray]'") from err
    return ray


def _parse_block(batch: dict[str, Any], done: Mapping[str, str], batching: Batching) -> Any:
    """Structure paths -> one row per chain (``error`` null) or per failure (``error`` set)."""
    import pyarrow as pa

    sources = [
        Source(Path(p), g, c or None) for p, g, c in zip(batch["path"], batch["given"], batch["chain"], strict=True)
    ]
    rows: dict[str, list[Any]] = {
        k: []
        for k in ("id", "source", "chain", "sequence", "residue_ids", "residue_numbers", "backbone", "aatype", "error")
    }
    for item in parse_sources(sources, done, batching):
        if isinstance(item, Failed):
            values = [item.id, item.source, item.chain, None, None, None, None, None, item.reason]
        elif isinstance(item, Parsed):
            bb = item.backbone
            xyz = torch.stack([bb.n, bb.ca, bb.c], dim=1).reshape(-1)
            values = [item.id, item.source.given, bb.chain, bb.sequence, list(bb.residue_ids),
                      bb.residue_numbers.tolist(), xyz.tolist(), bb.aatype.tolist(), None]  # fmt: skip
        else:
            continue
        for key, value in zip(rows, values, strict=True):
            rows[key].append(value)
    return pa.table({
        "id": pa.array(rows["id"], pa.string()), "source": pa.array(rows["source"], pa.string()),
        "chain": pa.array(rows["chain"], pa.string()), "sequence": pa.array(rows["sequence"], pa.string()),
        "residue_ids": pa.array(rows["residue_ids"], pa.list_(pa.string())),
        "residue_numbers": pa.array(rows["residue_numbers"], pa.list_(pa.int64())),
        "backbone": pa.array(rows["backbone"], pa.list_(pa.float32())),
        "aatype": pa.array(rows["aatype"], pa.list_(pa.int8())), "error": pa.array(rows["error"], pa.string()),
    })  # fmt: skip


class _Embedder:
    """A Ray actor: loads the export once; embeds the chains of each block in length batches."""

    def __init__(self, export: str, load: Mapping[str, Any], node_embed: str | None, schema: Any,
                 max_tokens: int, batch_size: int):  # fmt: skip
        from ..model.encoder import IPAEncoder
        from .node_embed import open_node_embed

        self.encoder = IPAEncoder.from_pretrained(export, **load)
        self.node_source = open_node_embed(node_embed) if node_embed is not None else None
        self.schema, self.max_tokens, self.batch_size = schema, max_tokens, batch_size
        self.outputs = [f.name for f in schema if f.name in TENSOR_COLUMNS]

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa

        rows, failed = [], []
        bucketer: LengthBucketer[tuple[Parsed, torch.Tensor]] = LengthBucketer(self.max_tokens, self.batch_size)
        batches = []
        for record in table.to_pylist():
            if record["error"] is not None:
                failed.append(record)
                continue
            item = _parsed(record)
            try:
                embed = node_embeddings(self.encoder, item, self.node_source)
            except ValueError as err:
                failed.append({**record, "error": str(err)})
                continue
            batches += bucketer.add((item, embed), len(item.backbone.sequence))
        batches += bucketer.flush()
        for batch in batches:
            rows += embed_batch(self.encoder, [b for b, _ in batch], [e for _, e in batch], self.outputs)
        embedded = records_table(rows, self.schema) if rows else self.schema.empty_table()
        errors = pa.array([None] * len(rows) + [r["error"] for r in failed], pa.string())
        failures = pa.table({f.name: pa.nulls(len(failed), f.type) for f in self.schema}).cast(
            pa.schema([f.with_nullable(True) for f in self.schema])
        )
        for column in ("id", "source", "chain"):
            failures = failures.set_column(
                failures.schema.get_field_index(column), column, pa.array([r[column] for r in failed], pa.string())
            )
        combined = pa.concat_tables([embedded.cast(failures.schema), failures])
        return combined.append_column("error", errors).replace_schema_metadata(None)


def _parsed(record: Mapping[str, Any]) -> Parsed:
    xyz = torch.tensor(record["backbone"], dtype=torch.float32).reshape(-1, 3, 3)
    aatype = torch.tensor(record["aatype"], dtype=torch.int64)
    backbone = Backbone(
        name=record["id"], chain=record["chain"], sequence=record["sequence"], residue_ids=tuple(record["residue_ids"]),
        residue_numbers=torch.tensor(record["residue_numbers"], dtype=torch.int64),
        chain_ids=(record["chain"],) * len(aatype),
        aatype=aatype, n=xyz[:, 0].contiguous(), ca=xyz[:, 1].contiguous(), c=xyz[:, 2].contiguous(),
    )  # fmt: skip
    return Parsed(record["id"], Source(Path(record["source"]), record["source"]), backbone)


def run_ray(
    export: str | os.PathLike,
    load: Mapping[str, Any],
    sources: Sequence[Source],
    done: Mapping[str, str],
    output: RunOutput,
    node_embed: str | os.PathLike | None,
    batching: Batching,
    ray_address: str | None,
    actors: int | None = None,
) -> None:
    """Run the job on Ray Data (``ray_address``: an existing cluster; None: this machine, or the
    instance already initialised in this process); the driver writes the results to ``output``."""
    import pyarrow.compute as pc

    ray = _ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    try:
        device = str(load.get("device") or "cpu")
        if actors is None:
            resources = ray.cluster_resources()
            actors = max(1, int(resources.get("GPU", 0) if device.startswith("cuda") else resources.get("CPU", 1) // 2))
        items = [{"path": str(s.path), "given": s.given, "chain": s.chain or ""} for s in sources]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items) // ROWS_PER_BLOCK))
        parsed = dataset.map_batches(
            _parse_block, fn_kwargs={"done": dict(done), "batching": batching},
            batch_size=ROWS_PER_BLOCK, batch_format="numpy",
        )  # fmt: skip
        embedded = parsed.map_batches(
            _Embedder, fn_constructor_args=(str(export), dict(load), None if node_embed is None else str(node_embed),
                                            output.schema, batching.max_tokens, batching.batch_size),
            batch_size=ROWS_PER_BLOCK, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            num_gpus=1 if device.startswith("cuda") else 0,
        )  # fmt: skip
        for table in embedded.iter_batches(batch_format="pyarrow", batch_size=None):
            failed = table.filter(pc.is_valid(table["error"]))
            for record in failed.select(["id", "source", "chain", "error"]).to_pylist():
                output.fail(Failed(record["source"], record["chain"], record["error"], record["id"]))
            ok = table.filter(pc.is_null(table["error"])).select(output.schema.names)
            if ok.num_rows:
                output.write(ok.cast(output.schema))
    finally:
        if started:
            ray.shutdown()
