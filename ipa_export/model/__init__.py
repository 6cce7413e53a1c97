"""The encoder: frames, kNN, edge embedder, attention, IPA, the stack, and compilation."""
