"""The model card (``README.md``) of an export: YAML front matter, config table, provenance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TAGS = ("protein", "invariant-point-attention", "flash-ipa", "structure-encoder", "ipa-export")


def render_model_card(
    config_json: Mapping[str, Any],
    *,
    num_parameters: int,
    provenance: Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
) -> str:
    """Markdown with Hub metadata (``library_name``, ``tags``, ``license``), the encoder config
    as a table and the export's provenance (source checkpoint sha256, date, parity check)."""
    provenance = dict(provenance or {})
    title = provenance.pop("title", "IPAEncoder export")
    description = provenance.pop(
        "description", "A frozen FlashIPA geometric encoder (EdgeEmbedder + Invariant Point Attention stack)."
    )
    lines = ["---", "library_name: ipa-export", "tags:", *(f"- {t}" for t in TAGS), f"license: {license}", "---", ""]
    lines += [f"# {title}", "", description, ""]
    lines += [
        "## Usage",
        "",
        "```python",
        "from ipa_export import IPAEncoder",
        "",
        'encoder = IPAEncoder.from_pretrained("<this repository or directory>")',
        "out = encoder(node_embed, ca_coords, node_mask)  # out.s, out.rotations, out.translations, out.z_f1, out.z_f2",
        "```",
        "",
        "## Export",
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | `{cell(config_json['architecture'])}` |",
        f"| format_version | {cell(config_json['format_version'])} |",
        f"| written by | ipa_export {cell(config_json['ipa_export_version'])} |",
        f"| weights dtype | {cell(config_json['dtype'])} |",
        f"| parameters | {num_parameters:,} |",
        "",
        "## Config",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| `{cell(k)}` | `{cell(v)}` |" for k, v in config_json["config"].items()),
        "",
    ]
    if provenance:
        lines += [
            "## Provenance",
            "",
            "| field | value |",
            "|---|---|",
            *(f"| {cell(k)} | {cell(v)} |" for k, v in provenance.items()),
            "",
        ]
    return "\n".join(lines)


def cell(value: Any) -> str:
    """``value`` as one markdown table cell: ``|`` escaped, line breaks as spaces."""
    return " ".join(str(value).splitlines()).replace("|", "\\|")
