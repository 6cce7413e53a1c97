"""ipa_export: frozen, shareable FlashIPA encoders in plain PyTorch."""

from ._version import __version__
from .bindrae.adapter import (
    EdgeEmbedderAdapter,
    FlashIPAModule,
    FlashIPAModuleConfig,
    ProjectEdgeConfig,
    create_edge_embedder,
    create_flashipa_module,
)
from .config import EncoderConfig
from .errors import ConfigCompatibilityError, CoordinateScaleWarning, FrozenModuleWarning
from .model.edge_embedder import EdgeEmbedder
from .model.encoder import EncoderOutput, EncoderOutputWithHiddenStates, HiddenStates, IPAEncoder
from .model.frames import Frames
from .model.stack import FlashIPAStack
from .structures.corpus import EmbedSummary, embed_corpus
from .structures.shards import load_embeddings

__all__ = [
    "ConfigCompatibilityError",
    "CoordinateScaleWarning",
    "EdgeEmbedder",
    "EdgeEmbedderAdapter",
    "EncoderConfig",
    "EmbedSummary",
    "EncoderOutput",
    "EncoderOutputWithHiddenStates",
    "FlashIPAModule",
    "FlashIPAModuleConfig",
    "FlashIPAStack",
    "FrozenModuleWarning",
    "Frames",
    "HiddenStates",
    "IPAEncoder",
    "ProjectEdgeConfig",
    "__version__",
    "create_edge_embedder",
    "create_flashipa_module",
    "embed_corpus",
    "load_embeddings",
]
