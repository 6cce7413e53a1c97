"""The errors and warnings this package raises on purpose.

Each error derives from :class:`IPAExportError` *and* from the built-in type that describes
it (``ValueError``, ``TypeError``, ...), so ``except ValueError`` keeps working. The command
line prints these (and ``OSError``: files that cannot be read or written) as one line with
exit code 2, or 1 for :class:`CheckFailedError`; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations


class IPAExportError(Exception):
    """Base of the errors this package raises on purpose; the message names the argument,
    file or field, what was expected and how to fix it."""


class InputError(IPAExportError, ValueError):
    """An argument, file content or config value that cannot be used."""


class InputTypeError(IPAExportError, TypeError):
    """An argument of the wrong type or dtype."""


class MissingDependencyError(IPAExportError, ImportError):
    """An optional dependency (an extra) that is not installed."""


class UnsupportedError(IPAExportError, RuntimeError):
    """A requested feature that cannot run here (e.g. flash-attn without CUDA)."""


class HubError(IPAExportError, ConnectionError):
    """The Hugging Face Hub could not be reached, or refused the request."""


class UntrustedFileError(IPAExportError, PermissionError):
    """A file this package refuses to load because loading it would run code it holds (a compile
    cache from outside the user's cache directory, or one another user can write)."""


class CheckFailedError(IPAExportError, RuntimeError):
    """A self-check failed (e.g. conversion parity): the result is not to be trusted."""


class FrozenModuleWarning(UserWarning):
    """``.train()`` on a frozen module (as ``from_pretrained`` returns it): it stays in eval mode."""


class CoordinateScaleWarning(UserWarning):
    """C-alpha coordinates whose spacing does not look like a chain in Angstrom, in sequence order."""
