"""The Hugging Face Hub side of an export: resolve a repo id to a local snapshot, upload a directory."""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

from ..errors import HubConnectionError, HubNotFoundError
from .format import EXPORT_FILES, read_header


def resolve_export(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local directory as it is, else a Hub repo id through ``huggingface_hub.snapshot_download``
    (only the export's own files are fetched). A name that can only be a local path (a path
    object; written like a path; not a valid repo id; or under a directory that exists here)
    is never sent to the Hub. A download that finds no export raises
    :class:`~ipa_export.errors.HubNotFoundError` (a FileNotFoundError), any other Hub failure
    :class:`~ipa_export.errors.HubConnectionError` (a ConnectionError)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(
            f"{path_or_repo_id}: not an export directory (it is a file; an export is a directory holding "
            f"{' and '.join(EXPORT_FILES[:2])})"
        )
    reason = _local_path_only(path_or_repo_id)
    if reason:
        raise FileNotFoundError(f"{path_or_repo_id}: no such export directory ({reason}){_did_you_mean(path)}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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
    # EntryNotFoundError includes LocalEntryNotFoundError: not in the cache, offline or unreachable
    except (HFValidationError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise HubNotFoundError(
            f"{path_or_repo_id}: neither a local export directory nor a Hub repository that could be resolved "
            f"({' '.join(str(error).split())})"
        ) from error
    except _network_errors() as error:
        raise HubConnectionError(f"cannot download Hub repo {path_or_repo_id}: {_reason(error)}") from error


def _local_path_only(path_or_repo_id: str | os.PathLike) -> str | None:
    """Why ``path_or_repo_id`` can only mean a local path, or None if it may be a Hub repo id."""
    if not isinstance(path_or_repo_id, str):
        return "a path object, not looked up on the Hub"
    name = path_or_repo_id
    if name.startswith((".", "/", "~")) or name.endswith("/") or os.sep in name.replace("/", ""):
        return "written as a local path, so not looked up on the Hub"
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return "not a Hub repo id either, which looks like 'org/name'"
    first = name.split("/")[0]
    if "/" in name and Path(first).is_dir():
        return f"read as a local path because the directory {first}/ exists here; a Hub repo id looks like 'org/name'"
    return None


def _did_you_mean(path: Path) -> str:
    """``; did you mean <sibling>?`` for the closest existing sibling directory, if any."""
    try:
        siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1)
    return f"; did you mean {path.parent / close[0]}?" if close else ""


def push_export(
    directory: str | os.PathLike,
    repo_id: str,
    model_class: type,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload IPAEncoder export",
    token: str | bool | None = None,
) -> str:
    """Upload a validated export directory (an export of ``model_class``) to the Hub with
    ``huggingface_hub.HfApi``; only the export's own files are uploaded. Returns the commit URL."""
    read_header(directory, model_class)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            allow_patterns=list(EXPORT_FILES),
        )
    except _network_errors() as error:
        raise HubConnectionError(f"cannot upload to Hub repo {repo_id}: {_reason(error)}") from error
    return str(getattr(commit, "commit_url", commit))


def _reason(error: BaseException) -> str:
    """The first line of a Hub error, and where to look."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    hint = "" if "HF_HUB_OFFLINE" in reason else "; check the network, HF_ENDPOINT and your token (`hf auth login`)"
    return reason + hint


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when the Hub cannot be reached or refuses a request: its own
    errors (OSError subclasses, as is ``requests``' ConnectionError) and the transport errors of
    ``httpx``/``httpx2``, whichever this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx", "httpx2"):
        module = sys.modules.get(client)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    return tuple(errors)
