"""flash_ipa checkpoint layouts and their map to :class:`~ipa_export.IPAEncoder` keys.

A flash_ipa checkpoint holds flash_ipa's ``EdgeEmbedder`` directly under ``edge_embedder.`` (a
BINDRAE Stage-1 checkpoint nests it one level deeper, inside its adapter) and a stack of
``InvariantPointAttention`` blocks as BINDRAE builds it (``ipa_blocks.<i>.ipa``,
``.backbone_update``, ``.ffn``, ``final_norm``) under ``ipa_module.`` or ``ipa_stack.``::

    flash_ipa checkpoint                        IPAEncoder
    edge_embedder.<EdgeEmbedder keys>           edge_embedder.<EdgeEmbedder keys>
    ipa_module.<stack> or ipa_stack.<stack>     ipa_stack.<stack>

The no-bias modes' edge MLP, which flash_ipa builds and never uses, is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")

EDGE = "edge_embedder."  #: flash_ipa's EdgeEmbedder
STACK_PREFIXES = ("ipa_module.", "ipa_stack.")  #: the IPA stack, BINDRAE's name or IPAEncoder's
MLP = EDGE + "edge_embedder."  #: the edge MLP inside flash_ipa's EdgeEmbedder
FEATURES = EDGE + "linear_s_p.weight"  #: present in every mode that uses the MLP


def is_flash_ipa_checkpoint(state_dict: Mapping[str, object]) -> bool:
    """True if the edge MLP sits right inside ``edge_embedder.`` (BINDRAE's is one level deeper)."""
    return MLP + "0.weight" in state_dict


def flash_ipa_to_encoder(state_dict: Mapping[str, V]) -> dict[str, V]:
    """flash_ipa checkpoint keys to IPAEncoder keys; keys of other modules are dropped."""
    uses_mlp = FEATURES in state_dict
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        stack = next((p for p in STACK_PREFIXES if key.startswith(p)), None)
        if stack is not None:
            out["ipa_stack." + key[len(stack) :]] = value
        elif key.startswith(EDGE) and (uses_mlp or not key.startswith(MLP)):
            out[key] = value
    return out
