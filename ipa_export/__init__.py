"""ipa_export: frozen, shareable FlashIPA encoders in plain PyTorch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ipa-export")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

from .adapter import (
    EdgeEmbedderAdapter,
    FlashIPAModule,
    FlashIPAModuleConfig,
    ProjectEdgeConfig,
    create_edge_embedder,
    create_flashipa_module,
)
from .config import ConfigCompatibilityError, EncoderConfig
from .edge_embedder import EdgeEmbedder
from .encoder import EncoderOutput, IPAEncoder
from .frames import Frames
from .stack import FlashIPAStack

__all__ = [
    "ConfigCompatibilityError",
    "EdgeEmbedder",
    "EdgeEmbedderAdapter",
    "EncoderConfig",
    "EncoderOutput",
    "FlashIPAModule",
    "FlashIPAModuleConfig",
    "FlashIPAStack",
    "Frames",
    "IPAEncoder",
    "ProjectEdgeConfig",
    "__version__",
    "create_edge_embedder",
    "create_flashipa_module",
]
