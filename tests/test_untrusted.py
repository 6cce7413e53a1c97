"""Untrusted exports: nothing in an export or a Hub snapshot is executed, hostile files are
rejected cheaply with the field named, links out of an export are refused, non-finite
values never pass silently."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_encoder
from torch.utils._appending_byte_serializer import AppendingByteSerializer, BytesWriter

from ipa_export import IPAEncoder
from ipa_export.model.compiling import compile_cache_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def saved(tmp_path) -> Path:
    return make_encoder(seed=5).save_pretrained(tmp_path / "export")


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IPA_EXPORT_CACHE", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


# --- compile caches ---------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: stands for any code a crafted cache could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_cache(path: Path, marker: Path) -> Path:
    """A file in torch's compile-cache format whose loading unpickles :class:`Payload`."""

    def write(writer: BytesWriter, item: tuple[str, str, bytes]) -> None:
        kind, key, content = item
        writer.write_str(kind)
        writer.write_uint64(1)
        writer.write_str(key)
        writer.write_bytes(content)

    serializer = AppendingByteSerializer(serialize_fn=write)
    serializer.append(("inductor", "fxplanted", pickle.dumps(Payload(marker))))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(serializer.to_bytes())
    return path


def legacy_cache_file(export: Path) -> Path:
    """Where ipa_export <= 0.2 looked for a compile cache: inside the export."""
    return export / "compile_cache" / f"{re.sub(r'[^A-Za-z0-9.+_-]', '_', torch.__version__)}-cpu.bin"


def test_the_planted_cache_runs_code_when_torch_loads_it(tmp_path):
    """The reproducer works: loading it through torch does run the payload."""
    cache = plant_cache(tmp_path / "planted.bin", tmp_path / "PWNED")
    with pytest.raises(Exception):  # noqa: B017 - the payload is not a graph; it has run by then
        torch.compiler.load_cache_artifacts(cache.read_bytes())
    assert (tmp_path / "PWNED").exists()


def test_a_compile_cache_planted_in_an_export_never_runs(saved, tmp_path):
    marker = tmp_path / "PWNED"
    plant_cache(legacy_cache_file(saved), marker)
    IPAEncoder.from_pretrained(saved, compile=True)
    assert not marker.exists()


def test_a_compile_cache_planted_in_a_hub_snapshot_never_runs(saved, tmp_path):
    repo = tmp_path / "hub" / "models--org--bindrae-ipa"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in ("config.json", "model.safetensors", "README.md"):
        data = (saved / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    marker = tmp_path / "PWNED"
    plant_cache(legacy_cache_file(snapshot), marker)
    IPAEncoder.from_pretrained("org/bindrae-ipa", cache_dir=tmp_path / "hub", local_files_only=True, compile=True)
    assert not marker.exists()


def test_an_explicit_cache_path_needs_the_trusted_code_flag(saved, tmp_path):
    marker = tmp_path / "PWNED"
    cache = plant_cache(tmp_path / "downloaded.bin", marker)
    with pytest.raises(PermissionError, match=r"downloaded.bin: refusing to load a compile cache from outside"):
        IPAEncoder.from_pretrained(saved, compile=True, compile_cache=cache)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - trusted: it is loaded (and the payload runs)
        IPAEncoder.from_pretrained(saved, compile=True, compile_cache=cache, trust_compile_cache=True)
    assert marker.exists()


def test_a_cache_others_can_write_is_refused(saved, tmp_path):
    marker = tmp_path / "PWNED"
    cache = plant_cache(compile_cache_file(saved, "cpu"), marker)
    cache.chmod(0o666)
    with pytest.raises(PermissionError, match=r"another user owns or can write \(owner uid \d+, mode 666\)"):
        IPAEncoder.from_pretrained(saved, compile=True)
    assert not marker.exists()


def test_caches_are_keyed_by_the_exports_content(saved, tmp_path, user_cache):
    cache = compile_cache_file(saved, "cpu")
    assert cache.parent == user_cache / "compile" and f"torch{torch.__version__}-cpu" in cache.name
    copy = Path(shutil.copytree(saved, tmp_path / "copy"))
    other = make_encoder(seed=6).save_pretrained(tmp_path / "other")
    assert compile_cache_file(copy, "cpu") == cache != compile_cache_file(other, "cpu")
    assert compile_cache_file(saved, "cuda") != cache
