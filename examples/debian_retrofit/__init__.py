"""Retrofitting all-MiniLM-L6-v2 for cross-lingual retrieval on Debian's translated package
descriptions: the data builder, the Cyrillic query rewrite, the recipe, its benchmark and
its ablations (README.md here)."""
