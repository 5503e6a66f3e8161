"""Data: sources (demo world, jsonl, tfds), image transforms and tiling, tokenizer, features, grain pipelines."""
