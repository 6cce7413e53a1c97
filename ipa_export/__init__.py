"""ipa_export: frozen, shareable FlashIPA encoders in plain PyTorch.

The public names are imported on first use (PEP 562), so ``import ipa_export`` and the command
line's ``--help`` do not pay for importing torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .bindrae.adapter import (
        EdgeEmbedderAdapter,
        FlashIPAModule,
        FlashIPAModuleConfig,
        ProjectEdgeConfig,
        create_edge_embedder,
        create_flashipa_module,
    )
    from .config import EncoderConfig
    from .errors import (
        ConfigCompatibilityError,
        CoordinatePrecisionWarning,
        CoordinateScaleWarning,
        FrozenModuleWarning,
    )
    from .model.edge_embedder import EdgeEmbedder
    from .model.encoder import EncoderOutput, EncoderOutputWithHiddenStates, HiddenStates, IPAEncoder
    from .model.frames import Frames
    from .model.stack import FlashIPAStack
    from .structures.corpus import EmbedSummary, embed_corpus
    from .structures.shards import load_embeddings

#: public name -> the module that defines it
_EXPORTS = {
    "ConfigCompatibilityError": ".errors",
    "CoordinatePrecisionWarning": ".errors",
    "CoordinateScaleWarning": ".errors",
    "EdgeEmbedder": ".model.edge_embedder",
    "EdgeEmbedderAdapter": ".bindrae.adapter",
    "EmbedSummary": ".structures.corpus",
    "EncoderConfig": ".config",
    "EncoderOutput": ".model.encoder",
    "EncoderOutputWithHiddenStates": ".model.encoder",
    "FlashIPAModule": ".bindrae.adapter",
    "FlashIPAModuleConfig": ".bindrae.adapter",
    "FlashIPAStack": ".model.stack",
    "Frames": ".model.frames",
    "FrozenModuleWarning": ".errors",
    "HiddenStates": ".model.encoder",
    "IPAEncoder": ".model.encoder",
    "ProjectEdgeConfig": ".bindrae.adapter",
    "create_edge_embedder": ".bindrae.adapter",
    "create_flashipa_module": ".bindrae.adapter",
    "embed_corpus": ".structures.corpus",
    "load_embeddings": ".structures.shards",
}

__all__ = [
    "ConfigCompatibilityError",
    "CoordinatePrecisionWarning",
    "CoordinateScaleWarning",
    "EdgeEmbedder",
    "EdgeEmbedderAdapter",
    "EmbedSummary",
    "EncoderConfig",
    "EncoderOutput",
    "EncoderOutputWithHiddenStates",
    "FlashIPAModule",
    "FlashIPAModuleConfig",
    "FlashIPAStack",
    "Frames",
    "FrozenModuleWarning",
    "HiddenStates",
    "IPAEncoder",
    "ProjectEdgeConfig",
    "create_edge_embedder",
    "create_flashipa_module",
    "embed_corpus",
    "load_embeddings",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ipa_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
