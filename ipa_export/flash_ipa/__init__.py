"""flash_ipa's API as a drop-in: ``from ipa_export.flash_ipa import EdgeEmbedderConfig,
EdgeEmbedder, IPAConfig, InvariantPointAttention`` instead of ``from flash_ipa...``.

Same names, config fields, defaults, call signatures, return values and state-dict keys as
flash_ipa, on this package's modules: runs on CPU and current torch, any head size, padding
never leaks into real residues. See the README section "Coming from flash_ipa".
"""

from .edge_embedder import EdgeEmbedder, EdgeEmbedderConfig
from .ipa import InvariantPointAttention, IPAConfig

__all__ = ["EdgeEmbedder", "EdgeEmbedderConfig", "IPAConfig", "InvariantPointAttention"]
