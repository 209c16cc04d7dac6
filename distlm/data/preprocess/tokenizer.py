"""The tokenizer: a byte-level BPE trained with Hugging Face `tokenizers`, or any given tokenizer.json.

Special tokens are explicit (data.tokenizer.eos_token / bos_token / pad_token). A trained tokenizer has EOS
at id 0, then PAD and BOS when configured, and decodes back to the exact text (byte-level, no prefix
space). Its file loads in `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distlm.files import write_atomic


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class SpecialIds:
    eos: int
    bos: int | None
    pad: int | None


def special_tokens(t) -> list[str]:
    """The configured special tokens (`t` is data.tokenizer), EOS first."""
    return [tok for tok in (t.eos_token, t.pad_token, t.bos_token) if tok is not None]


def train_tokenizer(texts: Iterable[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """A byte-level BPE of (at most) `vocab_size` tokens trained on `texts`; specials get ids 0, 1, ..."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,                             # special tokens come first
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even unseen ones
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path, specials: list[str]) -> Tokenizer:
    """Any Hugging Face tokenizer.json; fails naming the file if it lacks a configured special token."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"cannot load tokenizer '{path}': {e}") from None
    missing = [tok for tok in specials if tokenizer.token_to_id(tok) is None]
    if missing:
        raise TokenizerError(f"tokenizer '{path}' has no token(s) {missing} (data.tokenizer.eos_token / bos_token / "
                             f"pad_token); set them to special tokens it has, or bos/pad to null")
    return tokenizer


def special_ids(tokenizer: Tokenizer, t) -> SpecialIds:
    def id_of(token: str | None) -> int | None:
        if token is None:
            return None
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer has no token '{token}'")
        return token_id

    return SpecialIds(eos=id_of(t.eos_token), bos=id_of(t.bos_token), pad=id_of(t.pad_token))


def eos_id(tokenizer: Tokenizer, eos_token: str) -> int:
    token_id = tokenizer.token_to_id(eos_token)
    if token_id is None:
        raise TokenizerError(f"tokenizer has no token '{eos_token}'")
    return token_id


def vocab_size(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    write_atomic(path, tokenizer.to_str())
