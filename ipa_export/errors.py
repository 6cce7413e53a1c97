"""The errors and warnings this package raises on purpose.

Each error derives from :class:`IPAExportError` *and* from the built-in type that describes
it (``ValueError``, ``TypeError``, ...), so ``except ValueError`` keeps working. The command
line prints these (and ``OSError``: files that cannot be read or written) as one line with
exit code 2, or 1 for :class:`CheckFailedError`; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from pathlib import Path


class IPAExportError(Exception):
    """Base of the errors this package raises on purpose; the message names the argument,
    file or field, what was expected and how to fix it."""


class InputError(IPAExportError, ValueError):
    """An argument, file content or config value that cannot be used."""


class ConfigCompatibilityError(InputError):
    """A config (or export) that this package cannot use. ``problems`` lists each one,
    each naming its field or file."""

    def __init__(self, problems: list[str], context: str = "config"):
        self.problems = list(problems)
        super().__init__(f"incompatible {context}:\n" + "\n".join(f"  - {p}" for p in self.problems))


class InputTypeError(IPAExportError, TypeError):
    """An argument of the wrong type or dtype."""


class MissingDependencyError(IPAExportError, ImportError):
    """An optional dependency (an extra) that is not installed."""


class UnsupportedError(IPAExportError, RuntimeError):
    """A requested feature that cannot run here (e.g. flash-attn without CUDA)."""


class HubError(IPAExportError, OSError):
    """A Hugging Face Hub download or upload that failed: one of the two kinds below."""


class HubNotFoundError(HubError, FileNotFoundError):
    """A download that found no export: the repository, revision or files do not exist on the
    Hub, or are not in the local cache while offline (``HF_HUB_OFFLINE=1``, ``local_files_only``)
    or while the Hub cannot be reached."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub could not be reached, or refused the request (e.g. an upload without write access)."""


class ClusterError(IPAExportError, RuntimeError):
    """A task failed on the Ray cluster after Ray's own retries (complete shards are kept)."""


class UntrustedFileError(IPAExportError, PermissionError):
    """A file this package refuses to load because loading it would run code it holds (a compile
    cache from outside the user's cache directory, or one another user can write)."""


class CheckFailedError(IPAExportError, RuntimeError):
    """A self-check failed (e.g. conversion parity): the result is not to be trusted."""


class EmbedFailure(IPAExportError, RuntimeError):
    """A chain or file failed in ``embed_corpus(..., fail_fast=True)``; complete shards written so
    far are kept."""


class FrozenModuleWarning(UserWarning):
    """``.train()`` on a frozen module (as ``from_pretrained`` returns it): it stays in eval mode."""


class CoordinatePrecisionWarning(UserWarning):
    """Coordinates given in float16 or bfloat16: rounded before the encoder saw them."""


class CoordinateScaleWarning(UserWarning):
    """C-alpha coordinates whose spacing does not look like a chain in Angstrom, in sequence order.

    The message is the same whatever the values (so warning filters de-duplicate it); ``medians``
    maps each offending protein (batch index) to its median consecutive C-alpha distance (Angstrom)."""

    def __init__(self, message: str, medians: Mapping[int, float] | None = None):
        super().__init__(message)
        self.medians = dict(medians or {})


def warn_at_caller(warning: Warning) -> None:
    """``warnings.warn(warning)`` attributed to the first caller outside this package (its
    examples excepted) and torch: the line that called the model, not ``nn.Module.__call__``."""
    package = Path(__file__).parent
    torch = sys.modules.get("torch")  # not imported here: the command line answers --help without it
    internal = (str(package), *([str(Path(torch.__file__).parent)] if torch and torch.__file__ else []))
    examples = str(package / "examples")
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        if frame.f_code.co_filename.startswith(examples):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(warning, stacklevel=level)
