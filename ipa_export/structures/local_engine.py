"""The local engine of corpus embedding: parse in a background thread, bucket, embed, write.

One background thread parses structures while the encoder runs; parsed chains wait in length
buckets (:mod:`.batching`) and go through the encoder in batches under a residue budget; each
batch becomes one row group of the current shard (:class:`.pipeline.RunOutput`). Memory is
bounded by the parse queue, one partial batch per bucket and one batch of outputs, whatever the
corpus size. The Ray engine runs the same loop on each partition (:mod:`.ray_engine`).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .batching import LengthBucketer
from .inputs import Source
from .node_embed import NodeEmbedSource
from .pipeline import FILE_DONE, Batching, Failed, Parsed, RunOutput, embed_batch, node_embeddings, parse_sources
from .shards import records_table

__all__ = ["run_local"]

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  #: progress log interval when no progress bar is shown

_END = object()


@contextmanager
def _background(items: Iterator[Any], size: int) -> Iterator[Iterator[Any]]:
    """Run the iterator ``items`` in a thread, ``size`` items ahead of the consumer. On exit (an
    error, Ctrl-C) the thread is stopped and joined: it finishes the item in hand, so no parser
    runs on while the interpreter shuts down."""
    buffer: queue.Queue[Any] = queue.Queue(maxsize=size)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as err:  # surfaced in the consumer
            offer(err)
            return
        offer(_END)

    def consume() -> Iterator[Any]:
        while (item := buffer.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    thread = threading.Thread(target=produce, name="ipa-export-parse", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def run_local(
    encoder: Any,
    sources: Sequence[Source],
    done: Mapping[str, str],
    output: RunOutput,
    node_source: NodeEmbedSource | None,
    batching: Batching,
    progress: bool | None,
) -> None:
    """Parse in a background thread, bucket, embed and write, in this process."""
    bucketer: LengthBucketer[tuple[Parsed, torch.Tensor]] = LengthBucketer(batching.max_tokens, batching.batch_size)
    meter = _Progress(len(sources), progress)

    def fail(failed: Failed) -> None:
        meter.errors += 1
        output.fail(failed)

    def run(batch: list[tuple[Parsed, torch.Tensor]]) -> None:
        rows = embed_batch(encoder, [b for b, _ in batch], [e for _, e in batch], output.outputs)
        output.write(records_table(rows, output.schema))
        meter.update(chains=len(rows), residues=sum(len(r["sequence"]) for r in rows))

    try:
        with _background(parse_sources(sources, done, batching), 4 * batching.batch_size) as parsed:
            for item in parsed:
                if item is FILE_DONE:
                    meter.update(files=1)
                elif isinstance(item, Failed):
                    fail(item)
                else:
                    try:
                        embed = node_embeddings(encoder, item, node_source)
                    except ValueError as err:
                        fail(Failed(item.source.given, item.backbone.chain, str(err), item.id))
                        continue
                    for batch in bucketer.add((item, embed), len(item.backbone.sequence)):
                        run(batch)
        for batch in bucketer.flush():
            run(batch)
    finally:
        meter.close()


class _Progress:
    """A tqdm bar over structure files (chains, residues/s and errors as postfix) on a terminal,
    or a log line every ``LOG_EVERY_S`` seconds."""

    def __init__(self, total: int, bar: bool | None):
        self.total, self.files, self.chains, self.residues, self.errors = total, 0, 0, 0, 0
        self.start = self._last_log = time.perf_counter()
        if bar is None:
            bar = sys.stderr.isatty()
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="file", desc="embed", dynamic_ncols=True)

    def update(self, files: int = 0, chains: int = 0, residues: int = 0) -> None:
        self.files, self.chains, self.residues = self.files + files, self.chains + chains, self.residues + residues
        rate = self.residues / max(time.perf_counter() - self.start, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix(chains=self.chains, res_per_s=f"{rate:,.0f}", errors=self.errors, refresh=False)
            self._bar.update(files)
        elif time.perf_counter() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.perf_counter()
            eta = (self.total - self.files) * (self._last_log - self.start) / max(self.files, 1)
            log.info("%d/%d files, %d chains, %.0f residues/s, %d errors, ETA %.0f s",
                     self.files, self.total, self.chains, rate, self.errors, eta)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
