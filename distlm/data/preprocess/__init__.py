"""Preprocessing: raw text -> cleaned, deduplicated, tokenized, packed shards, as Ray tasks (pipeline.py).

Nothing here imports torch: preprocessing runs on CPU nodes that need none, and starts faster without it
(tests/test_preprocess.py checks what `distlm preprocess` imports)."""
