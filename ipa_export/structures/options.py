"""Defaults of the corpus-embedding options, importable without torch (the command line builds
its parser from them before any command needs torch)."""

DEFAULT_OUTPUTS = ("s", "rotations", "translations", "s_mean")
DEFAULT_MAX_TOKENS = 8192  #: padded residues per batch (batch size x longest chain)
DEFAULT_BATCH_SIZE = 64
DEFAULT_SHARD_SIZE = 1000
DEFAULT_MAX_STRUCTURE_BYTES = 256 * 1000 * 1000  #: a structure file's size after decompression
