"""Per-record node embeddings given by the user (e.g. ESM-2 + adapter outputs), keyed by record id.

``--node-embed PATH`` is a directory of ``<record id>.safetensors`` (one tensor, or one named
``node_embed``) or ``<record id>.pt`` files (read with ``weights_only=True``), one
``.safetensors`` file whose tensor names are record ids, or one ``.parquet`` file with columns
``id`` and ``node_embed`` (``[L][c_s]`` floats). Nothing is unpickled. ``PATH`` may be a
file-system URL (:mod:`.storage`); a remote ``.safetensors`` file is read whole into memory.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from ..errors import InputError
from .storage import Location

__all__ = ["NodeEmbedSource", "open_node_embed"]


class NodeEmbedSource:
    """``get(record_id, length, c_s)`` -> [length, c_s] float32, or ValueError naming the record."""

    def __init__(self, path: Location):
        self.path = path

    def get(self, record_id: str, length: int, c_s: int) -> torch.Tensor:
        tensor = self._lookup(record_id)
        if tensor is None:
            raise InputError(f"node_embed: {self.path} has no node embeddings for record {record_id!r}")
        if tuple(tensor.shape) != (length, c_s) or not tensor.is_floating_point():
            raise InputError(
                f"node_embed: record {record_id!r}: expected a float tensor of shape [L={length}, c_s={c_s}] "
                f"(L = residues read from the structure), got {tensor.dtype} {list(tensor.shape)}"
            )
        return tensor.float()

    def _lookup(self, record_id: str) -> torch.Tensor | None:
        raise NotImplementedError


class _Directory(NodeEmbedSource):
    def _lookup(self, record_id: str) -> torch.Tensor | None:
        from safetensors.torch import load

        path = self.path / f"{record_id}.safetensors"
        if path.is_file():
            tensors = load(path.read_bytes())
            tensor = tensors.get("node_embed", next(iter(tensors.values())) if len(tensors) == 1 else None)
            if tensor is None:
                raise InputError(
                    f"node_embed: {path} holds {sorted(tensors)}; expected one tensor or one named 'node_embed'"
                )
            return tensor
        path = self.path / f"{record_id}.pt"
        if path.is_file():
            try:
                tensor = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
            except Exception as err:  # not a torch file, or it needs arbitrary unpickling
                raise InputError(f"node_embed: {path}: not a tensor file readable with weights_only=True") from err
            if not isinstance(tensor, torch.Tensor):
                raise InputError(f"node_embed: {path} holds a {type(tensor).__name__}, expected a tensor [L, c_s]")
            return tensor
        return None


class _Safetensors(NodeEmbedSource):
    def __init__(self, path: Location):
        from safetensors import safe_open
        from safetensors.torch import load

        super().__init__(path)
        try:
            if path.local is not None:
                self._file: Any = safe_open(str(path.local), framework="pt")
                self._keys = set(self._file.keys())
            else:
                self._file = load(path.read_bytes())
                self._keys = set(self._file)
        except Exception as err:
            raise InputError(f"node_embed: {path}: not a readable safetensors file ({err})") from err

    def _lookup(self, record_id: str) -> torch.Tensor | None:
        if record_id not in self._keys:
            return None
        return self._file[record_id] if isinstance(self._file, dict) else self._file.get_tensor(record_id)


class _Parquet(NodeEmbedSource):
    """Looks records up by row group, keeping one row group in memory."""

    def __init__(self, path: Location):
        import pyarrow.parquet as pq

        super().__init__(path)
        try:
            self._file = pq.ParquetFile(path.local if path.local is not None else path.open("rb"))
        except Exception as err:
            raise InputError(f"node_embed: {path}: not a readable Parquet file ({err})") from err
        names = set(self._file.schema_arrow.names)
        if not {"id", "node_embed"} <= names:
            raise InputError(f"node_embed: {path} has columns {sorted(names)}; expected 'id' and 'node_embed'")
        self._where: dict[str, tuple[int, int]] = {}
        for group in range(self._file.num_row_groups):
            ids = self._file.read_row_group(group, columns=["id"]).column("id").to_pylist()
            self._where.update({rid: (group, row) for row, rid in enumerate(ids)})
        self._cached: tuple[int, Any] | None = None

    def _lookup(self, record_id: str) -> torch.Tensor | None:
        if record_id not in self._where:
            return None
        group, row = self._where[record_id]
        if self._cached is None or self._cached[0] != group:
            self._cached = (group, self._file.read_row_group(group, columns=["node_embed"]).column("node_embed"))
        values = self._cached[1][row].as_py()
        return torch.tensor(values, dtype=torch.float32) if values else torch.zeros(0)


def open_node_embed(path: str | os.PathLike) -> NodeEmbedSource:
    """Open ``--node-embed PATH`` (see the module docstring); ValueError for anything else."""
    where = Location(path, "node_embed")
    if where.is_dir():
        return _Directory(where)
    if not where.is_file():
        raise FileNotFoundError(f"node_embed: {where}: no such file or directory")
    suffix = "." + where.name.rsplit(".", 1)[-1] if "." in where.name else ""
    if suffix == ".safetensors":
        return _Safetensors(where)
    if suffix == ".parquet":
        return _Parquet(where)
    raise InputError(
        f"node_embed: {where}: unsupported format {suffix or '(no suffix)'!r}; expected a directory of "
        "<record id>.safetensors / .pt files, or one .safetensors or .parquet file keyed by record id "
        "(convert NumPy arrays with safetensors.numpy.save_file({'<record id>': array}, 'embeds.safetensors'))"
    )
