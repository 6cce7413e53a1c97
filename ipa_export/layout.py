"""The one map between BINDRAE state-dict keys and this package's module layout.

BINDRAE nests flash_ipa's EdgeEmbedder (whose MLP is called ``edge_embedder``) inside its
adapter, under ``edge_embedder.``; here that MLP is called ``mlp``. The IPA stack has the
same layout in both, under ``ipa_module.`` in a BINDRAE Stage-1 checkpoint and
``ipa_stack.`` in an :class:`~ipa_export.IPAEncoder`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")

# (BINDRAE prefix, native prefix); the first matching rule applies.
ADAPTER_EDGE_RULES = (("edge_embedder.edge_embedder.", "edge_embedder.mlp."),)
CHECKPOINT_RULES = (
    ("edge_embedder.edge_embedder.edge_embedder.", "edge_embedder.mlp."),
    ("edge_embedder.edge_embedder.", "edge_embedder."),
    ("ipa_module.", "ipa_stack."),
)


def rename(key: str, rules: tuple[tuple[str, str], ...], *, reverse: bool = False) -> str | None:
    """Apply the first rule whose source prefix starts ``key``; None if no rule matches."""
    for bindrae, native in rules:
        source, target = (native, bindrae) if reverse else (bindrae, native)
        if key.startswith(source):
            return target + key[len(source) :]
    return None


def checkpoint_to_encoder(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Keys of a BINDRAE Stage-1 ``model_state_dict`` to :class:`IPAEncoder` keys. Keys of
    other Stage-1 modules (ESM adapter, ligand conditioner, torsion heads, ...) are dropped."""
    renamed = ((rename(key, CHECKPOINT_RULES), value) for key, value in state_dict.items())
    return {key: value for key, value in renamed if key is not None}


def encoder_to_checkpoint(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Inverse of :func:`checkpoint_to_encoder` (residue-embedding keys have no BINDRAE name)."""
    renamed = ((rename(key, CHECKPOINT_RULES, reverse=True), value) for key, value in state_dict.items())
    return {key: value for key, value in renamed if key is not None}
