"""Packing tokenized documents into fixed-length training samples."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def pack_sequences(token_lists: Sequence[Sequence[int]], sample_len: int, eos_id: int,
                   vocab_size: int) -> tuple[np.ndarray, int]:
    """Documents concatenated, each followed by `eos_id`, cut into rows of `sample_len` tokens.

    Returns (samples [n, sample_len] of `token_dtype(vocab_size)`, number of tokens left over at the end
    and dropped). A sample of seq_len + 1 tokens gives seq_len inputs and their seq_len next-token targets.
    """
    total = sum(len(tokens) + 1 for tokens in token_lists)
    stream = itertools.chain.from_iterable(itertools.chain(tokens, (eos_id,)) for tokens in token_lists)
    flat = np.fromiter(stream, dtype=token_dtype(vocab_size), count=total)
    num_samples = total // sample_len
    samples = flat[: num_samples * sample_len].reshape(num_samples, sample_len)
    return samples, total - num_samples * sample_len
