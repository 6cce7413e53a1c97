"""Embeddings on disk: Parquet shards, one row per chain, written atomically; and their reader.

A directory holds ``part-00000.parquet``, ``part-00001.parquet``, ... (each renamed into place
only when complete, flushed to disk and re-read as valid: :func:`shard_file`), ``_run.json``
(what the run embeds with and the inputs' fingerprints, written first), ``_lock`` (held by
the run writing the directory), ``_errors.jsonl``
(one line per failed chain or file) and ``_manifest.json`` (written last). Names starting with
``_`` are skipped by pandas, ``pyarrow.dataset`` and Ray Data, so ``pandas.read_parquet(DIR)``
reads the rows as they are. Tensors are nested lists of float32: ``s`` ``[L][c_s]``,
``rotations`` ``[L][3][3]``, ``translations`` ``[L][3]`` (Angstrom), ``s_mean`` ``[c_s]``,
``z_f1``/``z_f2`` ``[L][rank][c_p]``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingDependencyError
from ..export.files import atomic_file, remove_files

__all__ = [
    "ERRORS_FILE",
    "MANIFEST_FILE",
    "RUN_FILE",
    "TENSOR_COLUMNS",
    "ShardFile",
    "ShardWriter",
    "arrow_schema",
    "load_embeddings",
    "records_table",
    "shard_file",
    "write_shard",
]

RUN_FILE, ERRORS_FILE, MANIFEST_FILE = "_run.json", "_errors.jsonl", "_manifest.json"
SHARD_PATTERN = re.compile(r"part-(\d{5,})\.parquet")
SCHEMA_KEY = b"ipa_export"  # Parquet schema metadata: the run identity, as JSON
#: tensor columns and their shape after the residue dimension, given (c_s, rank, c_p)
TENSOR_COLUMNS = ("s", "rotations", "translations", "s_mean", "z_f1", "z_f2")


def _pa() -> Any:
    try:
        import pyarrow
    except ImportError as err:
        raise MissingDependencyError(
            "writing and reading embeddings needs pyarrow: pip install 'ipa-export[parquet]'"
        ) from err
    return pyarrow


def tensor_shapes(c_s: int, rank: int, c_p: int) -> dict[str, tuple[int, ...]]:
    """Per-residue shape of each tensor column (``s_mean`` is per chain)."""
    return {
        "s": (c_s,),
        "rotations": (3, 3),
        "translations": (3,),
        "s_mean": (c_s,),
        "z_f1": (rank, c_p),
        "z_f2": (rank, c_p),
    }


def arrow_schema(shapes: Mapping[str, tuple[int, ...]], outputs: Sequence[str], identity: Mapping[str, Any]) -> Any:
    """The shard schema: metadata columns, then the tensor columns in ``outputs``."""
    pa = _pa()
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("chain", pa.string(), nullable=False),
        pa.field("sequence", pa.string(), nullable=False),
        pa.field("residue_ids", pa.list_(pa.string()), nullable=False),
        pa.field("length", pa.int32(), nullable=False),
    ]
    for name in outputs:
        kind = pa.float32()
        for size in reversed(shapes[name]):
            kind = pa.list_(kind, size)
        fields.append(pa.field(name, kind if name == "s_mean" else pa.list_(kind), nullable=False))
    return pa.schema(fields, metadata={SCHEMA_KEY: json.dumps(dict(identity), sort_keys=True)})


def records_table(records: Sequence[Mapping[str, Any]], schema: Any) -> Any:
    """Rows (``id``, ``source``, ``chain``, ``sequence``, ``residue_ids``, tensors [L, ...]) ->
    a pyarrow Table of ``schema``, built from flat buffers (no per-value Python objects)."""
    pa = _pa()
    columns = {
        "id": pa.array([r["id"] for r in records], pa.string()),
        "source": pa.array([r["source"] for r in records], pa.string()),
        "chain": pa.array([r["chain"] for r in records], pa.string()),
        "sequence": pa.array([r["sequence"] for r in records], pa.string()),
        "residue_ids": pa.array([list(r["residue_ids"]) for r in records], pa.list_(pa.string())),
        "length": pa.array([len(r["sequence"]) for r in records], pa.int32()),
    }
    lengths = torch.tensor([0] + [len(r["sequence"]) for r in records], dtype=torch.int32)
    offsets = pa.array(lengths.cumsum(0, dtype=torch.int32).numpy())
    for field in schema:
        if field.name in columns:
            continue
        flat = torch.cat([r[field.name].detach().float().cpu().reshape(-1) for r in records])
        values = pa.array(flat.numpy(), pa.float32())
        kind = field.type if field.name == "s_mean" else field.type.value_type
        sizes = []
        while pa.types.is_fixed_size_list(kind):
            sizes.append(kind.list_size)
            kind = kind.value_type
        for size in reversed(sizes):
            values = pa.FixedSizeListArray.from_arrays(values, size)
        columns[field.name] = values if field.name == "s_mean" else pa.ListArray.from_arrays(offsets, values)
    return pa.table([columns[f.name] for f in schema], schema=schema)


class ShardFile:
    """The Parquet writer of one shard being written (see :func:`shard_file`)."""

    def __init__(self, writer: Any):
        self._writer, self.rows = writer, 0

    def write(self, table: Any) -> None:
        """Append ``table`` as one row group."""
        self._writer.write_table(table)
        self.rows += table.num_rows


@contextmanager
def shard_file(target: Path, schema: Any) -> Iterator[ShardFile]:
    """Write one shard to ``target``: a temporary sibling is written (one row group per
    :meth:`ShardFile.write`), closed, flushed to disk (fsync), re-opened and checked (Parquet
    footer, ``schema``, row count) and only then renamed to ``target``. On any error (a full
    disk, a file size limit, an exception in the ``with`` body) the temporary file is removed,
    nothing is published, and an I/O error is re-raised as one OSError naming ``target``.

    This is the only place a shard is published; any process (a worker, the driver) may call
    it for its own ``target``, e.g. ``with shard_file(path, schema) as shard: shard.write(table)``."""
    import pyarrow.parquet as pq

    try:
        with atomic_file(target) as tmp:
            writer = pq.ParquetWriter(tmp, schema)
            shard = ShardFile(writer)
            try:
                yield shard
            except BaseException:
                with suppress(Exception):  # the file is removed unpublished whatever close says
                    writer.close()
                raise
            writer.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            _check_shard(tmp, schema, shard.rows)
    except OSError as error:
        message = f"cannot write {target}: {error.strerror or str(error).splitlines()[0]}; nothing of it was published"
        raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
    _fsync_directory(target.parent)


def _check_shard(path: Path, schema: Any, rows: int) -> None:
    """Re-open a written shard: a readable Parquet footer, ``schema``, ``rows`` rows."""
    import pyarrow.parquet as pq

    try:
        written = pq.ParquetFile(path)
    except Exception as error:  # ArrowInvalid: no magic bytes, a truncated footer
        raise OSError(f"the written file is not valid Parquet ({error})") from error
    stored = written.schema_arrow
    if written.metadata.num_rows != rows or not stored.equals(schema) or stored.metadata != schema.metadata:
        raise OSError(f"the written file holds {written.metadata.num_rows} rows of another schema, expected {rows}")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(target: Path, schema: Any, tables: Iterable[Any]) -> int:
    """Publish ``tables`` (one row group each) as the shard ``target`` (:func:`shard_file`);
    returns its rows."""
    with shard_file(target, schema) as shard:
        for table in tables:
            shard.write(table)
    return shard.rows


class ShardWriter:
    """Appends tables to ``part-NNNNN.parquet`` shards of about ``shard_size`` rows (one row
    group per table), each published by :func:`shard_file` when complete. After a failed
    write the current shard is dropped, never published."""

    def __init__(self, directory: Path, schema: Any, shard_size: int, first_index: int = 0):
        self.directory, self.schema, self.shard_size = directory, schema, shard_size
        self.index = first_index
        self.written: dict[str, int] = {}  # shard name -> rows, for the complete shards
        self._stack: ExitStack | None = None
        self._shard: ShardFile | None = None

    @property
    def rows(self) -> int:
        """Rows in the current, unpublished shard."""
        return self._shard.rows if self._shard is not None else 0

    def write(self, table: Any) -> None:
        if self._shard is None:
            self._stack = ExitStack()
            self._shard = self._stack.enter_context(shard_file(self.directory / self.name, self.schema))
        try:
            self._shard.write(table)
        except BaseException as error:  # the shard is dropped; its OSError names the shard
            stack, self._shard, self._stack = self._stack, None, None
            assert stack is not None
            stack.__exit__(type(error), error, error.__traceback__)
            raise
        if self.rows >= self.shard_size:
            self.finish()

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"

    def finish(self) -> None:
        """Complete the current shard (publish it)."""
        if self._shard is None:
            return
        stack, rows, name = self._stack, self.rows, self.name
        assert stack is not None
        self._shard, self._stack = None, None
        stack.close()
        self.written[name] = rows
        self.index += 1

    def abort(self) -> None:
        """Drop the current, incomplete shard (its temporary file is removed)."""
        if self._stack is not None:
            stack, self._shard, self._stack = self._stack, None, None
            stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


def shard_paths(directory: Path) -> list[Path]:
    """Complete shards in ``directory``, in order."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if SHARD_PATTERN.fullmatch(p.name))


def shard_identity(path: Path) -> dict[str, Any] | None:
    """The run identity a shard was written with (None: not written by this package)."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[SCHEMA_KEY]) if SCHEMA_KEY in metadata else None
    except Exception:  # not a Parquet file, or unreadable metadata
        return None


def shard_sources(paths: Iterable[Path]) -> dict[str, str]:
    """Record id -> ``source`` (the input as given) of every row of the shards ``paths``."""
    import pyarrow.parquet as pq

    found: dict[str, str] = {}
    for path in paths:
        table = pq.read_table(path, columns=["id", "source"])
        found.update(zip(table.column("id").to_pylist(), table.column("source").to_pylist(), strict=True))
    return found


def drop_rows(paths: Iterable[Path], ids: Collection[str]) -> None:
    """Rewrite each shard of ``paths`` that holds rows with an id in ``ids`` without them
    (published by :func:`shard_file`); a shard left without rows is removed."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pa = _pa()
    for path in paths:
        table = pq.read_table(path)
        keep = pc.invert(pc.is_in(table.column("id"), value_set=pa.array(list(ids), pa.string())))
        if pc.all(keep).as_py():
            continue
        kept = table.filter(keep)
        if kept.num_rows:
            write_shard(path, table.schema, [kept])
        else:
            remove_files([path])


def load_embeddings(
    directory: str | os.PathLike, columns: Sequence[str] | None = None, batch_rows: int = 64
) -> Iterator[dict[str, Any]]:
    """Iterate the records of an embeddings directory, shard by shard, as dicts: strings for
    ``id``, ``source``, ``chain``, ``sequence``, a list for ``residue_ids``, an int ``length``
    and float32 torch tensors ``s`` [L, c_s], ``rotations`` [L, 3, 3], ``translations`` [L, 3],
    ``s_mean`` [c_s] (and ``z_f1``/``z_f2`` [L, rank, c_p] when written). ``columns`` reads a
    subset. Memory holds ``batch_rows`` rows at a time."""
    import pyarrow.parquet as pq

    _pa()
    directory = Path(directory)
    paths = shard_paths(directory)
    if not paths:
        raise FileNotFoundError(f"{directory}: no part-*.parquet shards; expected a directory written by embed")
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns):
            yield from _batch_records(batch)


def _batch_records(batch: Any) -> Iterator[dict[str, Any]]:
    pa = _pa()
    decoded: dict[str, list[Any]] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        kind = column.type
        if name in TENSOR_COLUMNS:
            ragged = not pa.types.is_fixed_size_list(kind)
            inner = kind.value_type if ragged else kind
            shape = []
            while pa.types.is_fixed_size_list(inner):
                shape.append(inner.list_size)
                inner = inner.value_type
            flat = column.flatten() if ragged else column
            for _ in shape:
                flat = flat.flatten()
            values = torch.from_numpy(flat.to_numpy(zero_copy_only=False).copy()).reshape(-1, *shape)
            if ragged:
                bounds = column.offsets.to_numpy() - column.offsets[0].as_py()
                decoded[name] = [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            else:
                decoded[name] = list(values)
        else:
            decoded[name] = column.to_pylist()
    for i in range(batch.num_rows):
        yield {name: values[i] for name, values in decoded.items()}
