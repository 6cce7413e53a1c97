"""The inputs of a corpus run: structure files, directories searched recursively, manifests.

Everything here is resolved and checked before any structure is parsed, so that a mistyped
path or two files that would give the same record id stop the run before any work starts.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .reader import STRUCTURE_FORMATS, read_chains, structure_stem
from .storage import Location, is_url, local_copy

__all__ = ["STRUCTURE_SUFFIXES", "Source", "collect_sources", "record_id"]

STRUCTURE_SUFFIXES = tuple(STRUCTURE_FORMATS)  #: each optionally followed by .gz
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
            found = _search(path)
            if not found:
                raise InputError(
                    f"inputs: directory {path} holds no structure file (*.pdb, *.ent, *.cif, *.mmcif, optionally .gz)"
                )
            sources += [Source(p, str(p), chain) for p in found]
        elif path.is_file():
            sources.append(Source(path, str(item), chain))
        else:
            raise FileNotFoundError(f"inputs: {item}: {_not_a_file(path)}")
    if manifest is not None:
        sources += _read_manifest(Location(manifest, "manifest"), chain)
    if not sources:
        raise InputError("inputs: no structure given; pass structure files, directories or a manifest FILE")
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


def _search(directory: Path) -> list[Path]:
    """Structure files under ``directory``, sorted; symbolic links to directories are followed,
    each directory searched once (a link back into one already searched is skipped)."""
    seen: set[tuple[int, int]] = set()
    found = []
    for root, dirs, files in os.walk(directory, followlinks=True):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        found += [p for name in files if is_structure_file(p := Path(root) / name) and p.is_file()]
    return sorted(found)


def _not_a_file(path: Path) -> str:
    """Why ``path`` is neither a regular file nor a directory."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop"
        if os.path.islink(path):
            return f"a broken symbolic link (to {os.readlink(path)})"
        return "no such file or directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), expected a structure file or directory"
    return "a special file (socket or device), expected a structure file or directory"


def _read_manifest(manifest: Location, chain: str | None) -> list[Source]:
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest: {manifest}: no such file")
    if manifest.size() > MAX_MANIFEST_BYTES:
        raise InputError(f"manifest: {manifest} is larger than {MAX_MANIFEST_BYTES:,} bytes; expected a path list")
    sources, missing = [], []
    for number, line in enumerate(manifest.read_bytes().decode("utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) > 2 or not fields[0].strip():
            raise InputError(f"manifest: {manifest}:{number}: expected 'PATH' or 'PATH<TAB>CHAIN', got {line!r}")
        given = fields[0].strip()
        absolute = is_url(given) or Path(given).is_absolute()
        path = Location(given, "manifest") if absolute else manifest.parent / given
        if not path.is_file():
            why = _not_a_file(path.local) if path.local is not None else "no such file"
            missing.append(f"{manifest}:{number}: {given} ({why})")
        line_chain = fields[1].strip() if len(fields) == 2 else chain
        sources.append(Source(path.url if path.local is None else path.local, given, line_chain or None))
    if missing:
        raise FileNotFoundError(
            f"manifest: {len(missing)} listed file(s) not found (relative paths are read from the manifest's "
            f"directory): " + "; ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        )
    return sources


def _final_id_clashes(by_stem: Mapping[str, Sequence[Source]]) -> list[str]:
    """Clashes among the record ids of the files whose stem is another stem + ``_`` + suffix."""
    suspects: set[str] = set()
    for stem in by_stem:
        for i, char in enumerate(stem):
            if char == "_" and stem[:i] in by_stem:
                suspects |= {stem, stem[:i]}
    given: dict[str, list[str]] = defaultdict(list)
    for source in (s for stem in sorted(suspects) for s in by_stem[stem]):
        try:
            with local_copy(source.path) as copy:
                chains = read_chains(copy, source.chain)
        except (OSError, ValueError):  # an error record when the run reaches it
            continue
        for chain in [b.chain for b in chains.backbones] + [f.chain for f in chains.failures]:
            where = f"chain {chain}" if chain else "no chain id"
            given[record_id(source.stem, chain)].append(f"{source.given} ({where})")
    return [f"{rid}: " + ", ".join(names) + " (rename one)" for rid, names in given.items() if len(names) > 1]


def _check_unique(sources: Sequence[Source]) -> None:
    """Record ids are ``<stem>_<chain>``: two files with one stem may clash on any chain, and one
    file listed twice for one chain (or all chains) would be embedded twice. A stem that is
    another stem + ``_`` + something (``prot_A.pdb`` beside ``prot.pdb``) may clash on the final
    ids: those files alone are read here to compare the ids they give."""
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
            fix = "list the file once, or once per chain with a manifest chain column" if same_file else "rename one"
            listed = ", ".join(s.given + (f" (chain {s.chain})" if s.chain else "") for s in group)
            clashes.append(f"{stem}: {listed} ({fix})")
    if not clashes:
        clashes = _final_id_clashes(by_stem)
    if clashes:
        raise InputError(
            f"inputs: record ids (<file stem>_<chain>) would not be unique; {len(clashes)} clash(es): "
            + "; ".join(clashes[:20])
            + (" ..." if len(clashes) > 20 else "")
            + "."
        )
