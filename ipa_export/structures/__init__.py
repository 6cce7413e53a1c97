"""Protein structures in, embeddings out: backbone reading and embedding with an export."""
