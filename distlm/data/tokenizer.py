"""The tokenizer: a byte-level BPE trained with Hugging Face `tokenizers`, or a given tokenizer.json.

A trained tokenizer has the end-of-document token at id 0 and decodes back to the exact text (byte-level,
no prefix space). Its file loads in `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, eos_token: str) -> Tokenizer:
    """A byte-level BPE of (at most) `vocab_size` tokens trained on `texts`; `eos_token` gets id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],                          # special tokens come first: id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen ones
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path, eos_token: str) -> Tokenizer:
    """Any Hugging Face tokenizer.json; fails naming the file if it lacks `eos_token`."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"cannot load tokenizer '{path}': {e}") from None
    if tokenizer.token_to_id(eos_token) is None:
        raise TokenizerError(f"tokenizer '{path}' has no token '{eos_token}' (data.tokenizer.eos_token); "
                             f"set data.tokenizer.eos_token to one of its special tokens")
    return tokenizer


def eos_id(tokenizer: Tokenizer, eos_token: str) -> int:
    token_id = tokenizer.token_to_id(eos_token)
    if token_id is None:
        raise TokenizerError(f"tokenizer has no token '{eos_token}'")
    return token_id


def vocab_size(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    save_bytes(tokenizer.to_str().encode("utf-8"), Path(path))


def save_bytes(data: bytes, path: Path) -> None:
    """Write a file atomically: a temporary name, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
