"""The Hugging Face Hub side of an export: resolve a repo id to a local snapshot, upload a directory."""

from __future__ import annotations

import os
from pathlib import Path

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
    (only the export's own files are fetched)."""
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
