"""Records, tokenization and packing, the corpus pipeline, the built-in synthetic corpus."""
