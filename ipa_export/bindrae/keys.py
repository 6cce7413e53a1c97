"""Every BINDRAE state-dict name, and the map between a Stage-1 checkpoint and an IPAEncoder.

A BINDRAE ``Stage1Model`` holds the edge-embedder adapter under ``edge_embedder.`` (which
wraps flash_ipa's EdgeEmbedder, again under ``edge_embedder.``) and the FlashIPA module under
``ipa_module.``. This package's modules use flash_ipa's and BINDRAE's own names below those
prefixes, so the adapter modules need no renaming and an :class:`~ipa_export.IPAEncoder`
differs from a checkpoint by prefixes only::

    Stage1Model                           IPAEncoder
    edge_embedder.edge_embedder.<edge>    edge_embedder.<edge>
    ipa_module.<stack>                    ipa_stack.<stack>
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")

STAGE1_EDGE = "edge_embedder."  #: the EdgeEmbedderAdapter in a Stage1Model
STAGE1_IPA = "ipa_module."  #: the FlashIPAModule in a Stage1Model
ADAPTER_EDGE = "edge_embedder."  #: flash_ipa's EdgeEmbedder inside the adapter
STATE_DICT_KEY = "model_state_dict"  #: where a training checkpoint keeps the Stage1Model's tensors
CONFIG_KEY = "config"  #: where it keeps its config dict
# (Stage-1 prefix, IPAEncoder prefix)
CHECKPOINT_RULES = ((STAGE1_EDGE + ADAPTER_EDGE, "edge_embedder."), (STAGE1_IPA, "ipa_stack."))


def _rename(key: str, reverse: bool) -> str | None:
    for stage1, encoder in CHECKPOINT_RULES:
        source, target = (encoder, stage1) if reverse else (stage1, encoder)
        if key.startswith(source):
            return target + key[len(source) :]
    return None


def checkpoint_to_encoder(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Keys of a BINDRAE Stage-1 ``model_state_dict`` to :class:`IPAEncoder` keys. Keys of
    other Stage-1 modules (ESM adapter, ligand conditioner, torsion heads, ...) are dropped."""
    renamed = ((_rename(key, reverse=False), value) for key, value in state_dict.items())
    return {key: value for key, value in renamed if key is not None}


def encoder_to_checkpoint(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Inverse of :func:`checkpoint_to_encoder` (residue-embedding keys have no BINDRAE name)."""
    renamed = ((_rename(key, reverse=True), value) for key, value in state_dict.items())
    return {key: value for key, value in renamed if key is not None}


def checkpoint_name(encoder_key: str) -> str:
    """The Stage-1 name of an IPAEncoder key (the key itself if it has none)."""
    return _rename(encoder_key, reverse=True) or encoder_key


def stage1_modules(state_dict: Mapping[str, V]) -> dict[str, dict[str, V]]:
    """The edge-embedder adapter's and the FlashIPA module's own state dicts, by Stage-1 prefix."""
    return {
        prefix: {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        for prefix in (STAGE1_EDGE, STAGE1_IPA)
    }
