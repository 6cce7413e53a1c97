"""The inputs of a corpus run: structure files, directories searched recursively, manifests.

Everything here is resolved and checked before any structure is parsed, so that a mistyped
path or two files that would give the same record id stop the run before any work starts.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .reader import structure_stem
from .storage import Location, is_url

__all__ = ["STRUCTURE_SUFFIXES", "Source", "collect_sources", "record_id"]

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")  #: each optionally followed by .gz
MAX_MANIFEST_BYTES = 1 << 30  #: a manifest is a list of paths; anything bigger is a mistake


@dataclass(frozen=True)
class Source:
    """One structure file to read: ``path`` on disk (or a file-system URL such as
    ``s3://bucket/1abc.cif.gz``), ``given`` as the user wrote it (a path, or a directory-relative
    path joined to the directory given), ``chain`` to keep (None: all)."""

    path: Path | str
    given: str
    chain: str | None = None

    @property
    def stem(self) -> str:
        return structure_stem(self.path)


def record_id(stem: str, chain: str) -> str:
    """``<file stem>_<chain>``; the stem alone for a file whose chain has no id."""
    return f"{stem}_{chain}" if chain else stem


def is_structure_file(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(STRUCTURE_SUFFIXES)


def collect_sources(
    inputs: Iterable[str | os.PathLike], manifest: str | os.PathLike | None = None, chain: str | None = None
) -> list[Source]:
    """Files, directories (searched recursively, sorted, for ``*.pdb|ent|cif|mmcif[.gz]``) and
    the lines of ``manifest`` (``path`` or ``path<TAB>chain``; relative paths are relative to the
    manifest; blank lines and ``#`` comments skipped), in that order.

    ``chain`` keeps one chain of every file (a manifest's own chain column wins). Raises
    FileNotFoundError for a missing input and ValueError when no structure is found or when two
    sources would give the same record id (all clashes listed)."""
    sources: list[Source] = []
    for item in inputs:
        where = Location(item, "inputs")
        if where.local is None:
            sources += _url_sources(where, chain)
            continue
        path = where.local
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_structure_file(p))
            if not found:
                raise InputError(
                    f"inputs: directory {path} holds no structure file (*.pdb, *.ent, *.cif, *.mmcif, optionally .gz)"
                )
            sources += [Source(p, str(p), chain) for p in found]
        elif path.is_file():
            sources.append(Source(path, str(item), chain))
        else:
            raise FileNotFoundError(f"inputs: {item}: no such file or directory")
    if manifest is not None:
        sources += _read_manifest(Location(manifest, "--manifest"), chain)
    if not sources:
        raise InputError("inputs: no structure given; pass structure files, directories or --manifest FILE")
    _check_unique(sources)
    return sources


def _url_sources(where: Location, chain: str | None) -> list[Source]:
    """The sources of an input given as a file-system URL (a file, or a directory searched)."""
    if where.is_dir():
        found = [f for f in where.files() if is_structure_file(Path(f.name))]
        if not found:
            raise InputError(
                f"inputs: directory {where} holds no structure file (*.pdb, *.ent, *.cif, *.mmcif, optionally .gz)"
            )
        return [Source(f.url, f.url, chain) for f in found]
    if where.is_file():
        return [Source(where.url, where.url, chain)]
    raise FileNotFoundError(f"inputs: {where}: no such file or directory")


def _read_manifest(manifest: Location, chain: str | None) -> list[Source]:
    if not manifest.is_file():
        raise FileNotFoundError(f"--manifest: {manifest}: no such file")
    if manifest.size() > MAX_MANIFEST_BYTES:
        raise InputError(f"--manifest: {manifest} is larger than {MAX_MANIFEST_BYTES:,} bytes; expected a path list")
    sources, missing = [], []
    for number, line in enumerate(manifest.read_bytes().decode("utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) > 2 or not fields[0].strip():
            raise InputError(f"--manifest: {manifest}:{number}: expected 'PATH' or 'PATH<TAB>CHAIN', got {line!r}")
        given = fields[0].strip()
        absolute = is_url(given) or Path(given).is_absolute()
        path = Location(given, "--manifest") if absolute else manifest.parent / given
        if not path.is_file():
            missing.append(f"{manifest}:{number}: {given}")
        line_chain = fields[1].strip() if len(fields) == 2 else chain
        sources.append(Source(path.url if path.local is None else path.local, given, line_chain or None))
    if missing:
        raise FileNotFoundError(
            f"--manifest: {len(missing)} listed file(s) not found (relative paths are read from the manifest's "
            f"directory): " + "; ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        )
    return sources


def _check_unique(sources: Sequence[Source]) -> None:
    """Record ids are ``<stem>_<chain>``: two files with one stem may clash on any chain, and one
    file listed twice for one chain (or all chains) would be embedded twice."""
    by_stem: dict[str, list[Source]] = defaultdict(list)
    for source in sources:
        by_stem[source.stem].append(source)
    clashes = []
    for stem, group in by_stem.items():
        if len(group) == 1:
            continue
        chains = [s.chain for s in group]
        same_file = len({s.path.resolve() if isinstance(s.path, Path) else s.path for s in group}) == 1
        if not (same_file and None not in chains and len(set(chains)) == len(chains)):
            clashes.append(f"{stem}: " + ", ".join(s.given + (f" (chain {s.chain})" if s.chain else "") for s in group))
    if clashes:
        raise InputError(
            f"inputs: record ids (<file stem>_<chain>) would not be unique; {len(clashes)} clash(es): "
            + "; ".join(clashes[:20])
            + (" ..." if len(clashes) > 20 else "")
            + ". Rename the files or list one chain per line in a --manifest."
        )
