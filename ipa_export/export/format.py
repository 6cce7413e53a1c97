"""The export format: a Hugging Face model repository with ``config.json``,
``model.safetensors`` and a ``README.md`` model card.

``config.json``::

    {"architecture": "IPAEncoder", "format_version": 2, "ipa_export_version": "0.3.0",
     "dtype": "float32", "config": {<every config field>}}

:func:`read_header` checks the config and the safetensors header against each other and
against the model class before any weight is read, and reports every problem at once in a
:class:`~ipa_export.config.ConfigCompatibilityError`. Functions here take the model class
(``__name__`` is the architecture, ``config_class`` parses the config), so the format does not
depend on any one model.

Format versions: 2 names the edge MLP ``edge_embedder.edge_embedder.*`` (flash_ipa's name);
version 1 called it ``edge_embedder.mlp.*`` and is read through :data:`V1_RENAMES`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..dtypes import DTYPE_NAMES
from ..errors import ConfigCompatibilityError, InputError
from .card import render_model_card
from .files import atomic_directory

FORMAT_VERSION = 2
V1_RENAMES = (("edge_embedder.mlp.", "edge_embedder.edge_embedder."),)  #: (v1 prefix, v2 prefix)
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
#: What an export directory may hold: its files, and the compile caches ipa_export <= 0.2 kept
#: there. An existing directory holding anything else is never replaced.
EXPORT_NAMES = (*EXPORT_FILES, "compile_cache")
MAX_CONFIG_BYTES = 1 << 20  #: config.json is refused unread beyond this size
MAX_HEADER_BYTES = 16 << 20  #: the safetensors header (tensor names, shapes, metadata) likewise
SHOWN_TENSOR_PROBLEMS = 3  #: tensor lines listed after the config fields that explain them
#: the dtypes an export may store, by the canonical name ``config.json`` writes (:mod:`ipa_export.dtypes`)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ExportHeader:
    """What ``config.json`` and the safetensors header say, read without loading weights."""

    directory: Path
    config: Any  #: an instance of the model class's ``config_class``
    dtype: str
    format_version: int
    writer_version: str
    tensors: dict[str, tuple[list[int], str]]  # name -> (shape, safetensors dtype)
    metadata: dict[str, str]

    def renamed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (as stored) with this format version's names brought to the current ones."""
        return state if self.format_version >= FORMAT_VERSION else {_v1_to_v2(k): v for k, v in state.items()}


def writing_export(
    target: str | os.PathLike, *, overwrite: bool = False, protect: Iterable[str | os.PathLike] = ()
) -> AbstractContextManager[Path]:
    """:func:`~ipa_export.export.files.atomic_directory` for an export: ``target`` must be new, an
    empty directory, or an export (replaced only with ``overwrite``), and hold none of ``protect``."""
    return atomic_directory(target, owned=EXPORT_NAMES, marker=CONFIG_NAME, overwrite=overwrite, protect=protect)


def write_export(
    model: Any, directory: Path, *, provenance: Mapping[str, Any] | None = None, license: str = "apache-2.0"
) -> dict[str, Any]:
    """Write ``config.json``, ``model.safetensors`` and ``README.md`` of ``model`` (a module
    with a ``config``) into an existing directory (no atomicity: see
    :func:`ipa_export.export.files.atomic_directory`). Returns the config.json dict."""
    architecture = type(model).__name__
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise InputError(f"weights: expected one dtype among {list(DTYPES)}, got {sorted(dtypes)}")
    config_json = {
        "architecture": architecture,
        "format_version": FORMAT_VERSION,
        "ipa_export_version": __version__,
        "dtype": dtypes.pop(),
        "config": model.config.to_dict(),
    }
    metadata = {"format": "pt", "architecture": architecture, "format_version": str(FORMAT_VERSION)}
    try:
        save_file(state, directory / WEIGHTS_NAME, metadata=metadata)
    except SafetensorError as error:  # the Rust writer's I/O errors (ENOSPC, EFBIG, EIO)
        raise OSError(f"cannot write {WEIGHTS_NAME} ({error})") from error
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


def read_header(
    directory: str | os.PathLike, model_class: type, *, expected: Mapping[str, Any] | None = None
) -> ExportHeader:
    """Read and validate ``config.json`` and the safetensors header of an export of
    ``model_class``, without loading weights.

    Raises FileNotFoundError for a missing file, and one ConfigCompatibilityError listing
    every incompatibility (architecture, format version, config fields and values, tensor
    names, shapes and dtypes, and the caller's ``expected`` values).
    """
    directory = Path(directory)
    config_path, weights_path = (_export_file(directory, name) for name in (CONFIG_NAME, WEIGHTS_NAME))
    if (directory / CARD_NAME).exists():  # uploaded by push: never a link to a file elsewhere
        _export_file(directory, CARD_NAME)
    raw = _read_config_json(config_path)
    tensors, metadata = _read_safetensors_header(weights_path)

    problems: list[str] = []
    architecture = model_class.__name__
    if raw.get("architecture") != architecture:
        problems.append(f"architecture: expected {architecture!r}, got {raw.get('architecture')!r}")
    version = raw.get("format_version")
    writer = str(raw.get("ipa_export_version", "unknown"))
    if not isinstance(version, int) or isinstance(version, bool):
        problems.append(f"format_version: expected an integer, got {version!r}")
    elif version < 1:
        problems.append(f"format_version: expected a known version (1 to {FORMAT_VERSION}), got {version}")
    elif version > FORMAT_VERSION:
        problems.append(
            f"format_version: {version} is newer than this ipa_export {__version__} reads ({FORMAT_VERSION}); "
            f"upgrade to ipa-export>={writer} (pip install -U 'ipa-export>={writer}')"
        )
    if metadata.get("architecture", architecture) != architecture:  # absent in files re-saved by other tools
        problems.append(
            f"{WEIGHTS_NAME} metadata architecture: expected {architecture!r}, got {metadata.get('architecture')!r}"
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
            config = model_class.config_class.from_dict(fields)
        except ConfigCompatibilityError as error:
            problems += [f"config.{p}" for p in error.problems]
    if config is not None:
        problems += unmet_expectations(config, expected or {})
        if version == 1 and (both := sorted(k for k in tensors if _v1_to_v2(k) != k and _v1_to_v2(k) in tensors)):
            shown = ", ".join(f"{k} and {_v1_to_v2(k)}" for k in both[:3]) + (" ..." if len(both) > 3 else "")
            problems.append(
                f"{WEIGHTS_NAME}: holds tensors under both the version 1 name and the version 2 name ({shown}); "
                "a format_version 1 export names them edge_embedder.mlp.* only"
            )
        elif dtype in DTYPES:
            stored = tensors if version != 1 else {_v1_to_v2(k): v for k, v in tensors.items()}
            fields, larger = _field_problems(model_class, config, stored)
            # A few tensors follow the fields they explain, unless the config claims more than
            # the header holds: no model (even on the meta device) is built for such a config.
            code = DTYPE_NAMES[dtype].safetensors
            tensors_wrong = [] if larger else _tensor_problems(model_class, config, code, stored)
            if fields and len(tensors_wrong) > SHOWN_TENSOR_PROBLEMS:
                more = len(tensors_wrong) - SHOWN_TENSOR_PROBLEMS
                tensors_wrong = tensors_wrong[:SHOWN_TENSOR_PROBLEMS] + [f"... and {more} more tensor(s)"]
            problems += fields + tensors_wrong
    if problems:
        raise ConfigCompatibilityError(problems, context=f"export {directory}")
    assert config is not None
    return ExportHeader(directory, config, dtype, version, writer, tensors, metadata)


def _export_file(directory: Path, name: str) -> Path:
    """``directory / name``, a regular file that stays inside the export: a symbolic link may
    only point inside ``directory`` or, in a Hugging Face cache snapshot
    (``snapshots/<revision>/``), into the repository's ``blobs/``."""
    path = directory / name
    if path.is_symlink():
        real, home = os.path.realpath(path), os.path.realpath(directory)
        roots = [home]
        if directory.parent.name == "snapshots":
            roots.append(os.path.join(os.path.dirname(os.path.dirname(home)), "blobs"))
        if not any(os.path.commonpath([root, real]) == root for root in roots):
            raise InputError(f"{path}: refused: a symbolic link out of the export directory (to {real})")
    if not path.is_file():
        if not any((directory / known).exists() for known in (CONFIG_NAME, WEIGHTS_NAME)):
            raise FileNotFoundError(
                f"{directory}: not an export (no {CONFIG_NAME}, no {WEIGHTS_NAME}); an export is what "
                "save_pretrained or `ipa-export convert` writes"
            )
        raise FileNotFoundError(f"{path}: missing from the export, or not a regular file")
    return path


def _read_config_json(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict, read only if it is at most :data:`MAX_CONFIG_BYTES`."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigCompatibilityError(
            [f"{CONFIG_NAME}: {size:,} bytes, more than the {MAX_CONFIG_BYTES:,} an export's config may have"],
            context="export",
        )
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read(MAX_CONFIG_BYTES + 1), object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as error:
        raise ConfigCompatibilityError(
            [f"{CONFIG_NAME}: key {error.args[0]!r} appears twice in one object"], context="export"
        ) from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError, a 5,000-digit number
        raise ConfigCompatibilityError([f"{CONFIG_NAME}: not valid JSON ({error})"], context="export") from error
    except RecursionError as error:
        raise ConfigCompatibilityError([f"{CONFIG_NAME}: nested too deeply"], context="export") from error
    if not isinstance(raw, dict):
        raise ConfigCompatibilityError(
            [f"{CONFIG_NAME}: expected a JSON object, got {type(raw).__name__}"], context="export"
        )
    return raw


class _DuplicateKeyError(Exception):
    """A JSON object with one key twice (``json`` would keep the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for key, item in pairs:
        if key in value:
            raise _DuplicateKeyError(key)
        value[key] = item
    return value


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    with open(path, "rb") as f:
        prefix = f.read(8)
    length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
    if length is not None and length > MAX_HEADER_BYTES:
        raise ConfigCompatibilityError(
            [
                f"{path}: not a valid safetensors file (its header claims {length:,} bytes, more than the "
                f"{MAX_HEADER_BYTES:,} an export's header may have)"
            ],
            context="export",
        )
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: not a valid safetensors file ({error})") from error
    return tensors, metadata


def _field_problems(
    model_class: type, config: Any, tensors: Mapping[str, tuple[list[int], str]]
) -> tuple[list[str], bool]:
    """Config fields that disagree with what the tensor shapes imply, read from the header
    alone (``model_class.implied_config``, if the class has one; no model is built), and
    whether the config claims more than the header holds (or the header is malformed)."""
    implied = getattr(model_class, "implied_config", None)
    if implied is None:
        return [], False
    values = config.to_dict()
    fields, malformed = implied({k: shape for k, (shape, _) in tensors.items()}, values)
    wrong = {field: value for field, value in fields.items() if values.get(field) != value}
    problems = [
        f"{field}: config says {values[field]!r}, the weights imply {value!r}" for field, value in wrong.items()
    ]
    larger = any(isinstance(value, int) and values[field] > value for field, value in wrong.items())
    return problems + malformed, bool(malformed) or larger


def unmet_expectations(config: Any, expected: Mapping[str, Any]) -> list[str]:
    """One problem per ``expected`` field the config does not have (with the closest field name)
    or holds another value of."""
    values = config.to_dict()
    problems = []
    for key, want in expected.items():
        if key not in values:
            close = difflib.get_close_matches(key, values, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"expected.{key}: unknown config field{hint}")
        elif values[key] != want:
            problems.append(f"{key}: the caller expects {want!r}, the export has {values[key]!r}")
    return problems


def expected_tensors(model_class: type, config: Any) -> dict[str, list[int]]:
    """Name -> shape of every tensor a ``model_class(config)`` holds (built on the meta device:
    nothing is allocated)."""
    with torch.device("meta"):
        return {k: list(v.shape) for k, v in model_class(config).state_dict().items()}


def _v1_to_v2(key: str) -> str:
    for old, new in V1_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def _tensor_problems(
    model_class: type, config: Any, dtype: str, tensors: Mapping[str, tuple[list[int], str]]
) -> list[str]:
    """Compare the safetensors header with the tensors a model of ``config`` has."""
    wanted = expected_tensors(model_class, config)
    problems = [f"tensor {k}: missing from {WEIGHTS_NAME}" for k in wanted if k not in tensors]
    problems += [f"tensor {k}: unexpected in {WEIGHTS_NAME}" for k in tensors if k not in wanted]
    for key in wanted.keys() & tensors.keys():
        shape, stored = tensors[key]
        if shape != wanted[key]:
            problems.append(f"tensor {key}: shape {shape} disagrees with the config, which needs {wanted[key]}")
        if stored != dtype:
            problems.append(f"tensor {key}: dtype {stored} disagrees with config dtype {dtype}")
    return sorted(problems)


def read_weights(header: ExportHeader, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The export's tensors (current names), read after :func:`read_header` accepted it; every
    value must be finite."""
    path = header.directory / WEIGHTS_NAME
    try:
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path}: cannot read weights ({error})") from error
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if not torch.isfinite(v).all()}
    if bad:
        shown = ", ".join(f"{k} ({n})" for k, n in sorted(bad.items())[:3]) + (" and more" if len(bad) > 3 else "")
        raise InputError(
            f"{path}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): {shown}; the file is damaged"
        )
    return header.renamed(state)
