"""The frozen export: a Hugging Face model repository with ``config.json``,
``model.safetensors`` and a ``README.md`` model card.

``config.json``::

    {"architecture": "IPAEncoder", "format_version": 1, "ipa_export_version": "0.1.0",
     "dtype": "float32", "config": {<every EncoderConfig field>}}

Loading checks the config and the safetensors header against each other before any
weight is read, and reports every problem at once in a :class:`ConfigCompatibilityError`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .card import render_model_card
from .config import ConfigCompatibilityError, EncoderConfig

ARCHITECTURE = "IPAEncoder"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

T = TypeVar("T", bound="ExportMixin")


@dataclass(frozen=True)
class ExportHeader:
    """What ``config.json`` and the safetensors header say, read without loading weights."""

    directory: Path
    config: EncoderConfig
    dtype: str
    format_version: int
    writer_version: str
    tensors: dict[str, tuple[list[int], str]]  # name -> (shape, safetensors dtype)
    metadata: dict[str, str]


class ExportMixin:
    """``save_pretrained``, ``from_pretrained`` and ``push_to_hub`` for :class:`IPAEncoder`."""

    config: EncoderConfig

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
        license: str = "apache-2.0",
    ) -> Path:
        """Write the export to ``directory`` atomically: into a temporary sibling first, then
        renamed into place. An existing directory is replaced only with ``overwrite=True``.
        ``provenance`` (source, sha256, date, ...) goes into the model card."""
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            write_export(self, tmp, provenance=provenance, license=license)
        return Path(directory)

    @classmethod
    def from_pretrained(
        cls: type[T],
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        expected: Mapping[str, Any] | None = None,
        attention: str | None = None,
        compile: bool = False,
        compile_cache: bool | str | os.PathLike = True,
    ) -> T:
        """Load a frozen encoder (``eval()``, no gradients) from a local export directory or a
        Hub repository id (resolved with huggingface_hub, offline from its cache when
        ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``).

        ``expected`` lists config values the caller was built for, e.g. ``{"c_s": 384}``;
        ``attention`` overrides the stored backend; ``compile=True`` returns
        :func:`ipa_export.compiling.compile_encoder` (fullgraph, dynamic, one graph for all
        batch sizes), after loading the compile cache ``compile_cache`` names (``True``: the
        export's ``compile_cache/<torch version>-<device>.bin`` when present; a path: that
        file; ``False``: none). A compile cache holds generated code: load only trusted ones.
        """
        directory = resolve_export(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        header = read_header(directory, expected=expected)
        config = header.config if attention is None else header.config.replace(attention=attention)
        with torch.device("meta"):
            model = cls(config)  # type: ignore[call-arg]
        try:
            state = load_file(directory / WEIGHTS_NAME, device=str(device or "cpu"))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{directory / WEIGHTS_NAME}: cannot read weights ({error})") from error
        model.load_state_dict(state, strict=True, assign=True)  # type: ignore[attr-defined]
        if dtype is not None:
            model.to(dtype)  # type: ignore[attr-defined]
        model.eval().requires_grad_(False)  # type: ignore[attr-defined]
        if not compile:
            return model
        from .compiling import compile_pretrained

        return compile_pretrained(model, directory, device, compile_cache)  # type: ignore[arg-type, return-value]

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save to a temporary directory and upload it; see :func:`push_export` for options."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "export")
            return push_export(Path(tmp) / "export", repo_id, **kwargs)


def write_export(
    model: Any, directory: Path, *, provenance: Mapping[str, Any] | None = None, license: str = "apache-2.0"
) -> dict[str, Any]:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` into an existing
    directory (no atomicity: see :func:`atomic_directory`). Returns the config.json dict."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise ValueError(f"weights: expected one dtype among {list(DTYPES)}, got {sorted(dtypes)}")
    config_json = {
        "architecture": ARCHITECTURE,
        "format_version": FORMAT_VERSION,
        "ipa_export_version": __version__,
        "dtype": dtypes.pop(),
        "config": model.config.to_dict(),
    }
    metadata = {"format": "pt", "architecture": ARCHITECTURE, "format_version": str(FORMAT_VERSION)}
    save_file(state, directory / WEIGHTS_NAME, metadata=metadata)
    (directory / CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")
    write_model_card(directory, provenance=provenance, license=license)
    return config_json


def write_model_card(
    directory: Path, *, provenance: Mapping[str, Any] | None = None, license: str = "apache-2.0"
) -> None:
    """(Re)write ``README.md`` from the export's ``config.json`` and safetensors header."""
    config_json = json.loads((directory / CONFIG_NAME).read_text())
    tensors, _ = _read_safetensors_header(directory / WEIGHTS_NAME)
    parameters = sum(math.prod(shape) for shape, _ in tensors.values())
    card = render_model_card(config_json, num_parameters=parameters, provenance=provenance, license=license)
    (directory / CARD_NAME).write_text(card)


def resolve_export(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local directory as it is, else a Hub repo id through ``huggingface_hub.snapshot_download``."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_repo_id).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path_or_repo_id}: not an export directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                str(path_or_repo_id),
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
                allow_patterns=list(EXPORT_FILES),
            )
        )
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError) as error:
        raise FileNotFoundError(
            f"{path_or_repo_id}: neither a local export directory nor a Hub repository that could be resolved ({error})"
        ) from error


def read_header(directory: str | os.PathLike, *, expected: Mapping[str, Any] | None = None) -> ExportHeader:
    """Read and validate ``config.json`` and the safetensors header, without loading weights.

    Raises FileNotFoundError for a missing file, and one ConfigCompatibilityError listing
    every incompatibility (architecture, format version, config fields and values, tensor
    names, shapes and dtypes, and the caller's ``expected`` values).
    """
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing from the export")
    try:
        raw = json.loads((directory / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigCompatibilityError([f"{CONFIG_NAME}: not valid JSON ({error})"], context="export") from error
    if not isinstance(raw, dict):
        raise ConfigCompatibilityError(
            [f"{CONFIG_NAME}: expected a JSON object, got {type(raw).__name__}"], context="export"
        )
    tensors, metadata = _read_safetensors_header(directory / WEIGHTS_NAME)

    problems: list[str] = []
    if raw.get("architecture") != ARCHITECTURE:
        problems.append(f"architecture: expected {ARCHITECTURE!r}, got {raw.get('architecture')!r}")
    version = raw.get("format_version")
    writer = str(raw.get("ipa_export_version", "unknown"))
    if not isinstance(version, int) or isinstance(version, bool):
        problems.append(f"format_version: expected an integer, got {version!r}")
    elif version > FORMAT_VERSION:
        problems.append(
            f"format_version: {version} is newer than this ipa_export {__version__} reads ({FORMAT_VERSION}); "
            f"upgrade to ipa-export>={writer} (pip install -U 'ipa-export>={writer}')"
        )
    dtype = raw.get("dtype")
    if dtype not in DTYPES:
        problems.append(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    config = None
    fields = raw.get("config")
    if not isinstance(fields, dict):
        problems.append(f"config: expected an object of encoder config fields, got {type(fields).__name__}")
    else:
        try:
            config = EncoderConfig.from_dict(fields)
        except ConfigCompatibilityError as error:
            problems += [f"config.{p}" for p in error.problems]
    if config is not None:
        problems += _expected_problems(config, expected or {})
        if dtype in DTYPES:
            problems += _tensor_problems(config, _SAFETENSORS_DTYPES[dtype], tensors)
    if problems:
        raise ConfigCompatibilityError(problems, context=f"export {directory}")
    assert config is not None
    return ExportHeader(directory, config, dtype, version, writer, tensors, metadata)


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a valid safetensors file ({error})") from error
    return tensors, metadata


def _expected_problems(config: EncoderConfig, expected: Mapping[str, Any]) -> list[str]:
    problems = []
    values = config.to_dict()
    for key, want in expected.items():
        if key not in values:
            problems.append(f"expected.{key}: unknown config field")
        elif values[key] != want:
            problems.append(f"{key}: the caller expects {want!r}, the export has {values[key]!r}")
    return problems


def _tensor_problems(config: EncoderConfig, dtype: str, tensors: Mapping[str, tuple[list[int], str]]) -> list[str]:
    """Compare the safetensors header with the tensors a model of ``config`` has."""
    from .encoder import IPAEncoder

    with torch.device("meta"):
        wanted = {k: list(v.shape) for k, v in IPAEncoder(config).state_dict().items()}
    problems = [f"tensor {k}: missing from {WEIGHTS_NAME}" for k in wanted if k not in tensors]
    problems += [f"tensor {k}: unexpected in {WEIGHTS_NAME}" for k in tensors if k not in wanted]
    for key in wanted.keys() & tensors.keys():
        shape, stored = tensors[key]
        if shape != wanted[key]:
            problems.append(f"tensor {key}: shape {shape} disagrees with the config, which needs {wanted[key]}")
        if stored != dtype:
            problems.append(f"tensor {key}: dtype {stored} disagrees with config dtype {dtype}")
    return sorted(problems)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``target`` and rename it to ``target`` on
    success; on any error remove it, leaving ``target`` as it was."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True / --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        make_shareable(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_shareable(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) paths: give ``path`` (and what a directory
    holds) the modes the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def push_export(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload IPAEncoder export",
    token: str | bool | None = None,
) -> str:
    """Upload a validated export directory to the Hub with ``huggingface_hub.HfApi``;
    returns the commit URL."""
    read_header(directory)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        allow_patterns=list(EXPORT_FILES),
    )
    return str(getattr(commit, "commit_url", commit))
