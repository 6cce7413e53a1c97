"""ipa-export: convert, inspect, validate, push and embed with frozen IPA encoders.

Exit codes: 0 success, 1 a check failed (validate's self-check or --expect, convert's parity
check, embed --fail-fast), 2 bad input or usage (one line on stderr), 3 embed finished but some
chains or files failed, 130 interrupted (Ctrl-C), 141 the output pipe was closed (| head).
Any other error is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import CheckFailedError, InputError, IPAExportError
from .structures.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_STRUCTURE_BYTES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_OUTPUTS,
    DEFAULT_SHARD_SIZE,
)

if TYPE_CHECKING:  # torch is imported by the commands that need it: --help and usage errors stay fast
    import torch

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_BROKEN_PIPE = 128 + 13  # killed by SIGPIPE, what other Unix tools report
EXIT_INTERRUPTED = 128 + 2  # SIGINT (Ctrl-C), what shells report
SELF_CHECK_LENGTH = 48
SELF_CHECK_ATOL = 1e-3  # fp32, chain centred ~20 A from the origin


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    refuse_unknown_options(parser, argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.run(args)
        sys.stdout.flush()  # inside the try: a closed pipe fails here, not at interpreter exit
        return code
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; embed's finished shards are kept
        resume = " (finished shards are kept: re-run the same command to resume)" if args.command == "embed" else ""
        print(f"ipa-export {args.command}: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (IPAExportError, OSError) as error:  # the package's own errors; files that cannot be read or written
        print(f"ipa-export {args.command}: error: {in_flags(str(error), parser, args.command)}", file=sys.stderr)
        return EXIT_CHECK_FAILED if isinstance(error, CheckFailedError) else EXIT_BAD_INPUT


def in_flags(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """A library message worded by parameter name (``device: ...``, ``pass device='cpu'``) in the
    command's flags (``--device: ...``, ``pass --device cpu``)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices[command]._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None or flag == "--help":
            continue
        name = re.escape(action.dest)
        message = re.sub(rf"(?<![\w.-]){name}='([^']*)'", rf"{flag} \1", message)
        message = re.sub(rf"(?<![\w.-]){name}=(N\b|\d[\w.+-]*|True\b)", rf"{flag} \1", message)
        if action.nargs == 0:  # a switch: name=True is the bare flag
            message = re.sub(rf"(?<![\w.-]){flag} True\b", flag, message)
        message = re.sub(rf"(?<![\w.-]){name}(?= directory| location| FILE)", flag, message)
        message = re.sub(rf"^{name}:", f"{flag}:", message)
    return message


def refuse_unknown_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Exit with a usage error naming the first option the command does not know, with the
    closest known one (argparse alone reports a mistyped required option as missing)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    name = next((a for a in argv if a in commands.choices), None)
    if name is None:
        return
    command = commands.choices[name]
    known = [option for action in command._actions for option in action.option_strings]
    for arg in argv[argv.index(name) + 1 :]:
        if arg == "--":
            return
        option = arg.split("=", 1)[0]
        if option.startswith("--") and option not in known:
            close = difflib.get_close_matches(option, known, n=2, cutoff=0.6)
            command.error(f"unrecognized option {option}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipa-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, allow_abbrev=False, **kwargs)

    p = command("convert", help="convert a BINDRAE Stage-1 checkpoint (or re-write an export) into an export directory")
    p.add_argument(
        "checkpoint",
        type=Path,
        help="training checkpoint (.pt, read with weights_only=True), or an export directory or its model.safetensors",
    )
    p.add_argument("--out", type=Path, required=True, help="export directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config value that shapes cannot tell (e.g. frame_update_clip=clip, attention=sdpa); repeatable",
    )
    p.add_argument(
        "--residue-embedding-seed",
        type=int,
        metavar="SEED",
        help="add a random (untrained) 21-type residue embedding table, for embedding bare structures",
    )
    p.add_argument("--note", help="free text for the model card's provenance")
    p.add_argument("--license", default="apache-2.0", help="license in the model card (default: apache-2.0)")
    p.set_defaults(run=run_convert)

    p = command(
        "inspect", help="show an export's config, parameter count, tensors and metadata without loading weights"
    )
    p.add_argument("export", help="export directory or Hub repo id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_inspect)

    p = command("validate", help="load an export, check expectations and run an SE(3)-invariance self-check")
    p.add_argument("export", help="export directory or Hub repo id")
    p.add_argument(
        "--expect", action="append", default=[], metavar="KEY=VALUE", help="required config value; repeatable"
    )
    p.set_defaults(run=run_validate)

    p = command("push", help="upload an export directory to the Hugging Face Hub")
    p.add_argument("export", type=Path, help="export directory")
    p.add_argument("repo_id", help="target repository, e.g. org/bindrae-ipa")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to push to")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default="Upload IPAEncoder export")
    p.add_argument("--dry-run", action="store_true", help="list files, sizes and target; no network call")
    p.set_defaults(run=run_push)

    p = command(
        "embed",
        help="embed every protein chain of PDB/mmCIF files, directories or a manifest into Parquet shards",
        description="Embed structures into DIR/part-NNNNN.parquet (one row per chain), DIR/_errors.jsonl and "
        "DIR/_manifest.json. Re-running into the same --out resumes. Exit codes: 0 all embedded, 1 stopped by "
        "--fail-fast, 2 bad arguments, 3 some chains or files failed (see DIR/_errors.jsonl).",
    )
    p.add_argument("export", help="export directory or Hub repo id")
    p.add_argument(
        "inputs", nargs="*", help="structure files (.pdb/.ent/.cif/.mmcif, optionally .gz) or directories, or URLs"
    )
    p.add_argument("--out", required=True, help="output directory or URL (created; resumed when it exists)")
    p.add_argument("--manifest", help="file listing one structure path per line, optionally TAB chain id")
    p.add_argument("--chain", help="embed only this chain of every file (default: every protein chain)")
    p.add_argument(
        "--outputs",
        default=",".join(DEFAULT_OUTPUTS),
        help=f"comma-separated tensor columns (default {','.join(DEFAULT_OUTPUTS)}; also z_f1, z_f2)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="padded residues per batch (default %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="most chains per batch (default %(default)s)"
    )
    p.add_argument("--max-length", type=int, help="chains longer than this become error records")
    p.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="rows per Parquet shard, about (default %(default)s)"
    )
    p.add_argument(
        "--node-embed",
        help="node embeddings keyed by record id: a directory of <id>.safetensors/.pt, or one .safetensors or "
        ".parquet (columns id, node_embed) file (default: the export's residue-type table)",
    )
    p.add_argument(
        "--max-structure-bytes",
        type=int,
        default=DEFAULT_MAX_STRUCTURE_BYTES,
        metavar="N",
        help=f"a structure with more text (after gzip decompression) is an error record "
        f"(default {DEFAULT_MAX_STRUCTURE_BYTES:,})",
    )
    p.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--dtype", help="model dtype, e.g. float32, bfloat16")
    p.add_argument("--attention", help="attention backend override (dense, sdpa, flash_attn, auto)")
    p.add_argument("--attn-dtype", help="attention dtype override: fp32, bf16 or fp16 (see the README's precision)")
    p.add_argument("--compile", action="store_true", help="run the encoder under torch.compile")
    p.add_argument("--overwrite", action="store_true", help="replace embeddings of another export/config in --out")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed chain or file (exit 1)")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or a Ray cluster")
    p.add_argument("--ray-address", help="Ray cluster address for --engine ray (default: a local instance)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, log lines or summary")
    p.set_defaults(run=run_embed)
    return parser


def parse_assignments(items: Sequence[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict; values are JSON when they parse (384, 1.5, true), else strings."""
    values = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"{option}: expected KEY=VALUE, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def run_convert(args: argparse.Namespace) -> int:
    from .bindrae.convert import convert
    from .export.format import read_header
    from .model.encoder import IPAEncoder

    provenance = convert(
        args.checkpoint,
        args.out,
        overrides=parse_assignments(args.overrides, "--set"),
        residue_embedding_seed=args.residue_embedding_seed,
        overwrite=args.overwrite,
        note=args.note,
        license=args.license,
    )
    header = read_header(args.out, IPAEncoder)
    print(f"converted {args.checkpoint} -> {args.out}")
    print(f"  config: {_short_config(header.config.to_dict())}")
    print(f"  parity: {provenance['parity']}")
    return EXIT_OK


def run_inspect(args: argparse.Namespace) -> int:
    from .export.format import read_header
    from .export.hub import resolve_export
    from .model.encoder import IPAEncoder

    header = read_header(resolve_export(args.export), IPAEncoder)
    parameters = sum(math.prod(shape) for shape, _ in header.tensors.values())
    if args.json:
        print(
            json.dumps(
                {
                    "directory": str(header.directory),
                    "format_version": header.format_version,
                    "ipa_export_version": header.writer_version,
                    "dtype": header.dtype,
                    "parameters": parameters,
                    "config": header.config.to_dict(),
                    "metadata": header.metadata,
                    "tensors": {k: {"shape": s, "dtype": d} for k, (s, d) in sorted(header.tensors.items())},
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(f"export {header.directory}")
    print(
        f"  format_version {header.format_version}, written by ipa_export {header.writer_version}, dtype {header.dtype}"
    )
    print(f"  parameters: {parameters:,} in {len(header.tensors)} tensors")
    print("config:")
    for key, value in header.config.to_dict().items():
        print(f"  {key} = {value!r}")
    print("metadata:", ", ".join(f"{k}={v}" for k, v in sorted(header.metadata.items())))
    print("tensors:")
    width = max(map(len, header.tensors))
    for key, (shape, dtype) in sorted(header.tensors.items()):
        print(f"  {key:<{width}}  {dtype:<4} {shape}")
    return EXIT_OK


def run_validate(args: argparse.Namespace) -> int:
    from .export.format import unmet_expectations
    from .model.encoder import IPAEncoder

    expected = parse_assignments(args.expect, "--expect")
    encoder = IPAEncoder.from_pretrained(args.export)
    print(f"loaded {args.export}: {_short_config(encoder.config.to_dict())}")
    if problems := unmet_expectations(encoder.config, expected):
        unknown = [p for p in problems if p.startswith("expected.")]  # a mistyped field name: bad input
        message = "; ".join(p.removeprefix("expected.") for p in problems)
        raise (InputError if unknown else CheckFailedError)(f"--expect: {message}")
    error = se3_self_check(encoder)
    ok = error <= SELF_CHECK_ATOL
    print(
        f"SE(3)-invariance self-check: max deviation {error:.2e} (tolerance {SELF_CHECK_ATOL:g}): "
        + ("ok" if ok else "FAILED")
    )
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def se3_self_check(encoder: torch.nn.Module, seed: int = 0) -> float:
    """Largest deviation from SE(3) invariance (s, z_f1, z_f2) and equivariance (frames) on a
    random chain under a random global rotation and translation (inf if an output is not finite)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    config = encoder.config
    length = min(SELF_CHECK_LENGTH, config.max_len or SELF_CHECK_LENGTH)  # a factoriser's length limit
    # Steps of 3.8 A +- 10% (equal steps would tie neighbour distances, and ties may reorder).
    steps = torch.nn.functional.normalize(torch.randn(length, 3, generator=g), dim=-1)
    steps = steps * (3.42 + 0.76 * torch.rand(length, 1, generator=g))
    coords = steps.cumsum(0)[None]
    node_embed = torch.randn(1, length, config.c_s, generator=g)
    mask = torch.ones(1, length, dtype=torch.bool)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = (q * torch.linalg.det(q)).float()  # a proper rotation
    shift = 20 * torch.randn(3, generator=g)
    with torch.no_grad():
        out = encoder(node_embed, coords, mask)
        moved = encoder(node_embed, coords @ q.T + shift, mask, rotations=q.expand(1, length, 3, 3))
    deviations = [
        moved.s - out.s,
        moved.z_f1 - out.z_f1,
        moved.z_f2 - out.z_f2,
        moved.rotations - q @ out.rotations,
        moved.translations - (out.translations @ q.T + shift),
    ]
    # NaN fails; no factors without pair bias
    return max(torch.nan_to_num(d.abs(), nan=math.inf).max().item() for d in deviations if d.numel())


def run_push(args: argparse.Namespace) -> int:
    from .export.format import EXPORT_FILES, read_header
    from .export.hub import push_export
    from .model.encoder import IPAEncoder

    read_header(args.export, IPAEncoder)
    if args.dry_run:
        print(
            f"dry run: would upload to Hub repo {args.repo_id} (revision {args.revision or 'main'}, "
            f"private={args.private}, create_pr={args.create_pr}, message {args.commit_message!r}):"
        )
        for name in EXPORT_FILES:
            path = args.export / name
            if path.is_file():
                print(f"  {name}  {path.stat().st_size:,} bytes")
        return EXIT_OK
    url = push_export(
        args.export,
        args.repo_id,
        IPAEncoder,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.export} -> {url}")
    return EXIT_OK


def run_embed(args: argparse.Namespace) -> int:
    from .structures.corpus import EmbedFailure, embed_corpus

    if not args.quiet:
        logging.getLogger("ipa_export.structures").setLevel(logging.INFO)
    try:
        summary = embed_corpus(
            args.export, args.inputs, args.out, manifest=args.manifest, chain=args.chain,
            outputs=[o.strip() for o in args.outputs.split(",") if o.strip()], max_tokens=args.max_tokens,
            batch_size=args.batch_size, max_length=args.max_length, shard_size=args.shard_size,
            node_embed=args.node_embed, max_structure_bytes=args.max_structure_bytes, device=args.device,
            dtype=args.dtype, attention=args.attention, attn_dtype=args.attn_dtype,
            compile=args.compile, overwrite=args.overwrite, fail_fast=args.fail_fast, engine=args.engine,
            ray_address=args.ray_address, progress=False if args.quiet else None,
        )  # fmt: skip
    except EmbedFailure as failure:
        print(f"ipa-export embed: stopped (--fail-fast): {failure}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if not args.quiet:
        print(
            f"{summary.records} chain(s) embedded ({summary.residues:,} residues, "
            f"{summary.residues / max(summary.seconds, 1e-9):,.0f} residues/s), {summary.skipped} already done, "
            f"{summary.errors} error(s) -> {summary.out} ({len(summary.shards)} shard(s))"
        )
        if summary.errors:
            print(f"failed chains and files: {summary.out / '_errors.jsonl'}")
    return summary.exit_code


def _short_config(config: dict[str, Any]) -> str:
    keys = ("c_s", "c_p", "z_factor_rank", "depth", "no_heads", "c_hidden", "frame_update_clip", "num_residue_types")
    return ", ".join(f"{k}={config[k]}" for k in keys)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
