"""The encoder config fields that tensor shapes determine, read from names and shapes alone.

One reading of an :class:`~ipa_export.IPAEncoder` state dict's shapes (its own key names),
used by the loader and ``inspect``/``validate`` (through ``read_header``) and by ``convert``.
Nothing is built, so a hostile header costs nothing. What each field is read from::

    depth                     the block numbers ipa_stack.ipa_blocks.<i>
    c_s                       ipa_stack.final_norm.weight              [c_s]
    no_heads                  <block 0>.ipa.head_weights               [H]
    c_hidden                  <block 0>.ipa.linear_q.weight            [H c_hidden, c_s]
    no_qk_points, no_v_points <block 0>.ipa.linear_(kv_)points.weight  [3 H P, c_s]
    num_residue_types         residue_embedding.weight                 [T, c_s] (absent: 0)
    mode                      edge tensors: none -> flash_no_bias (z_factor_rank 0),
                              factorizer.* -> flash_2d_factorize_bias, else flash_1d_bias
    c_p, distance width w     edge_embedder.edge_embedder.0.weight     [c_p, 3 feat_dim + 2 w]
    feat_dim                  edge_embedder.linear_relpos.weight       [.., feat_dim]
    z_factor_rank, knn_k      (1-D) linear_s_p [2 R feat_dim, c_s], linear_t_distogram [2 R w, k (w + feat_dim)]
    z_factor_rank, max_len    (2-D) factorizer.length_compressor.weight [R, max_len]

The distance width ``w`` is ``num_rbf`` with ``distance_features == "rbf"`` and ``num_bins``
otherwise: the one field the shapes cannot place alone, so it is read with the
``distance_features`` the config states. Fields a mode has no tensor for (``c_p``, ``feat_dim``,
``knn_k``, ``num_bins`` without pair bias; ``knn_k`` in the 2-D mode) and fields no shape holds
(``dropout``, ``frame_update_clip``, ...) are left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

IPA_BLOCK_KEY = re.compile(r"ipa_stack\.ipa_blocks\.(\d+)\.")
IPA = "ipa_stack.ipa_blocks.0.ipa."
EDGE = "edge_embedder."
COMPRESSOR = EDGE + "factorizer.length_compressor.weight"
RESIDUE_TABLE = "residue_embedding.weight"
ROWS = ("linear_q.weight", "linear_q_points.weight", "linear_kv_points.weight")  #: block 0's, read by rows


class ImpliedConfig(NamedTuple):
    """``fields``: config field -> value the shapes determine; ``problems``: one line per
    malformed tensor, naming it."""

    fields: dict[str, Any]
    problems: list[str]


def implied_config(
    shapes: Mapping[str, Sequence[int]], stated: Mapping[str, Any] | None = None, name: Callable[[str], str] = str
) -> ImpliedConfig:
    """The config fields that ``shapes`` (IPAEncoder key -> shape) determine. ``stated``: the
    config fields known from elsewhere (a config.json, a checkpoint's config, overrides); only
    ``distance_features`` is read, to name the distance width ``num_rbf`` or ``num_bins``.
    ``name`` maps keys for messages (e.g. to a checkpoint's own names)."""
    reader = _Reader(shapes, name)
    fields = reader.stack_fields()
    if (table := reader.shape(RESIDUE_TABLE, 2)) is not None:
        fields["num_residue_types"] = table[0]
    elif RESIDUE_TABLE not in shapes:
        fields["num_residue_types"] = 0
    rbf = (stated or {}).get("distance_features") == "rbf"
    fields.update(reader.edge_fields(width_field="num_rbf" if rbf else "num_bins"))
    return ImpliedConfig({k: v for k, v in fields.items() if v is not None}, reader.problems)


class _Reader:
    """Shapes with the problems found while reading them."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], name: Callable[[str], str]):
        self.shapes, self.name = shapes, name
        self.problems: list[str] = []

    def shape(self, key: str, ndim: int) -> Sequence[int] | None:
        """The shape of ``key`` if present with ``ndim`` non-empty dimensions, else None
        (a problem if present but malformed)."""
        found = self.shapes.get(key)
        if found is not None and (len(found) != ndim or min(found, default=0) <= 0):
            self.problems.append(
                f"tensor {self.name(key)}: expected {ndim} non-empty dimension(s), got shape {list(found)}"
            )
            return None
        return found

    def quotient(self, key: str, size: int | None, divisor: int | None, what: str) -> int | None:
        """``size / divisor`` where that is a positive integer, else None (and a problem naming ``key``)."""
        if size is None or divisor is None:
            return None
        if divisor <= 0 or size <= 0 or size % divisor:
            self.problems.append(
                f"tensor {self.name(key)}: size {size} is not a positive multiple of {what} = {divisor}"
            )
            return None
        return size // divisor

    def stack_fields(self) -> dict[str, Any]:
        blocks = sorted({int(m.group(1)) for k in self.shapes if (m := IPA_BLOCK_KEY.match(k))})
        if blocks != list(range(len(blocks))):
            self.problems.append(
                f"tensor {self.name('ipa_stack.ipa_blocks')}: block numbers {blocks[:8]} are not 0, 1, 2, ..."
            )
        fields: dict[str, Any] = {"depth": len(blocks)}
        if norm := self.shape("ipa_stack.final_norm.weight", 1):
            fields["c_s"] = norm[0]
        heads = self.shape(IPA + "head_weights", 1)
        if heads is None:
            return fields
        h = fields["no_heads"] = heads[0]
        if pair := self.shape(IPA + "linear_b.weight", 2):  # absent without pair bias
            fields["c_p"] = pair[1]
        size = {key: shape[0] if (shape := self.shape(IPA + key, 2)) else None for key in ROWS}
        fields["c_hidden"] = self.quotient(IPA + "linear_q.weight", size["linear_q.weight"], h, "no_heads")
        qk = self.quotient(IPA + "linear_q_points.weight", size["linear_q_points.weight"], 3 * h, "3 no_heads")
        kv = self.quotient(IPA + "linear_kv_points.weight", size["linear_kv_points.weight"], 3 * h, "3 no_heads")
        fields["no_qk_points"] = qk
        if qk is not None and kv is not None:
            fields["no_v_points"] = kv - qk
            if kv <= qk:
                self.problems.append(
                    f"tensor {self.name(IPA + 'linear_kv_points.weight')}: {kv} points per head, expected more than "
                    f"the {qk} query points of {self.name(IPA + 'linear_q_points.weight')}"
                )
        return fields

    def edge_fields(self, width_field: str) -> dict[str, Any]:
        """The edge mode and the fields of its tensors; the distance width as ``width_field``."""
        if not any(k.startswith(EDGE) for k in self.shapes):
            return {"mode": "flash_no_bias", "z_factor_rank": 0, "max_len": 0}
        two_d = COMPRESSOR in self.shapes
        fields: dict[str, Any] = {"mode": "flash_2d_factorize_bias" if two_d else "flash_1d_bias", "max_len": 0}
        mlp, relpos = self.shape(EDGE + "edge_embedder.0.weight", 2), self.shape(EDGE + "linear_relpos.weight", 2)
        f = fields["feat_dim"] = relpos[1] if relpos else None
        if mlp:
            fields["c_p"] = mlp[0]
        width = None
        if mlp and f:
            name = "num_bins" if two_d else width_field
            inputs = f"2 (inputs: 3 feat_dim + 2 {name})"
            width = self.quotient(EDGE + "edge_embedder.0.weight", mlp[1] - 3 * f, 2, inputs)
            fields[name] = width
        if two_d:
            if compressor := self.shape(COMPRESSOR, 2):
                fields["z_factor_rank"], fields["max_len"] = compressor
            return fields
        s_p, t = self.shape(EDGE + "linear_s_p.weight", 2), self.shape(EDGE + "linear_t_distogram.weight", 2)
        if s_p and f:
            rank = fields["z_factor_rank"] = self.quotient(EDGE + "linear_s_p.weight", s_p[0], 2 * f, "2 feat_dim")
            if t and rank and width and t[0] != 2 * rank * width:
                self.problems.append(
                    f"tensor {self.name(EDGE + 'linear_t_distogram.weight')}: {t[0]} outputs, expected "
                    f"2 z_factor_rank x {width_field} = {2 * rank * width}"
                )
        if t and f and width:
            key = EDGE + "linear_t_distogram.weight"
            fields["knn_k"] = self.quotient(key, t[1], width + f, f"{width_field} + feat_dim")
        return fields
