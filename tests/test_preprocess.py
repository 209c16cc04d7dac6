"""distlm.data.preprocess on a real local Ray cluster, with real shards and a real tokenizer."""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distlm.config import ConfigError
from distlm.data import dedup
from distlm.data.clean import clean_text, read_documents
from distlm.data.loader import ShardLoader
from distlm.data.preprocess import preprocess
from distlm.data.shards import Manifest
from distlm.data.tokenizer import TokenizerError, file_sha256

MAX_CHARS = 20_000
MALFORMED_LINES = [
    b"{not json\n",
    b'{"id": "no text field"}\n',
    b'{"text": 5}\n',
    b'{"text": "caf\xe9 latin-1 bytes are not UTF-8, and this line is long enough"}\n',
    b'{"text": "tiny"}\n',
    b"\n",  # a blank line is not a document and not an error
]


def write_jsonl(path: Path, docs: list[dict], extra_lines: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for doc in docs:
            f.write((json.dumps(doc) + "\n").encode("utf-8"))
        for line in extra_lines:
            f.write(line)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, kjv_chapters) -> list[Path]:
    """Two files: 150 chapters, malformed lines, a too-long document, and 3 duplicates across files
    (one differing only in whitespace, equal after cleaning)."""
    root = tmp_path_factory.mktemp("corpus")
    chapters = kjv_chapters[:150]
    spaced = {"text": "  " + chapters[7]["text"].replace(" ", "   ").replace("\n", " \r\n") + "\t\n"}
    a = write_jsonl(root / "a.jsonl", chapters[:80] + [{"text": "long " * 5000}], MALFORMED_LINES)
    b = write_jsonl(root / "b.jsonl", chapters[80:] + [chapters[3], chapters[5], spaced])
    return [a, b]


@pytest.fixture(scope="module")
def processed(ray_local, corpus, data_config, tmp_path_factory):
    cfg = data_config(corpus, tmp_path_factory.mktemp("shards"), f"data.max_chars={MAX_CHARS}")
    return cfg, preprocess(cfg)


def expected_documents(corpus: list[Path], min_chars: int) -> list[str]:
    """The cleaned, length-filtered, deduplicated documents, computed without the pipeline."""
    docs: list[str] = []
    for path in corpus:
        for line in path.read_bytes().splitlines():
            try:
                text = json.loads(line.decode("utf-8")).get("text")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if isinstance(text, str) and min_chars <= len(clean_text(text)) <= MAX_CHARS:
                docs.append(clean_text(text))
    return list(dict.fromkeys(docs))


def test_tokens_in_shards_plus_dropped_equal_direct_tokenization(processed, corpus):
    cfg, manifest = processed
    tokenizer = Tokenizer.from_file(str(manifest.tokenizer_path))
    docs = expected_documents(corpus, cfg.data.min_chars)
    is_val = dedup.validation_mask(dedup.digests([d.encode() for d in docs]), cfg.data.val_fraction)
    for split, docs_of_split in (("train", [d for d, v in zip(docs, is_val) if not v]),
                                 ("val", [d for d, v in zip(docs, is_val) if v])):
        direct = sum(len(tokenizer.encode(d).ids) + 1 for d in docs_of_split)
        assert manifest.stats["docs"][split] == len(docs_of_split)
        assert manifest.splits[split].tokens + manifest.stats["dropped_tokens"][split] == direct
    # The first train sample is the start of the first train document, then EOS where it ends.
    first_doc = [d for d, v in zip(docs, is_val) if not v][0]
    stream = tokenizer.encode(first_doc).ids + [manifest.eos_id]
    sample = next(ShardLoader(manifest.data_dir, "train", 1, 0, 1, seed=0, shuffle=False).iter_batches())
    assert sample[0, : min(len(stream), manifest.sample_len)].tolist() == stream[: manifest.sample_len]
    assert manifest.stats["docs"]["val"] > 0


def test_malformed_lines_are_counted_per_reason_and_skipped(processed):
    _, manifest = processed
    assert manifest.stats["removed"] == {"invalid_json": 1, "bad_utf8": 1, "missing_text": 2, "too_short": 1,
                                         "too_long": 1}
    assert manifest.stats["duplicates"] == 3
    assert manifest.stats["docs_read"] == 150 + 1 + 5 + 3


def test_manifest_matches_the_tars_on_disk(processed):
    _, manifest = processed
    manifest.verify()
    names = set()
    for split in ("train", "val"):
        for shard in manifest.shards(split):
            path = manifest.shard_path(shard)
            assert file_sha256(path) == shard.sha256 and path.stat().st_size == shard.bytes
            with tarfile.open(path) as tar:
                members = tar.getnames()
            assert len(members) == shard.samples and all(m.endswith(".npy") for m in members)
            names.add(shard.name)
        assert manifest.num_samples(split) == sum(s.samples for s in manifest.shards(split))
    on_disk = {p.name for p in manifest.data_dir.iterdir()}
    assert on_disk == names | {"manifest.json", "tokenizer.json"}
    assert Manifest.load(manifest.data_dir) == manifest


def test_rerun_with_same_inputs_skips_the_work(processed, caplog):
    cfg, manifest = processed
    before = {p.name: p.stat().st_mtime_ns for p in manifest.data_dir.iterdir()}
    with caplog.at_level(logging.INFO, logger="distlm.data.preprocess"):
        again = preprocess(cfg)
    assert "up to date" in caplog.text
    assert again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in manifest.data_dir.iterdir()} == before


def test_two_runs_give_byte_identical_shards_and_a_new_config_removes_stale_ones(processed, corpus, data_config,
                                                                                 tmp_path):
    cfg, manifest = processed
    other = preprocess(data_config(corpus, tmp_path, f"data.max_chars={MAX_CHARS}"))
    assert other.fingerprint == manifest.fingerprint
    for split in ("train", "val"):
        assert [s.sha256 for s in other.shards(split)] == [s.sha256 for s in manifest.shards(split)]
        for mine, theirs in zip(manifest.shards(split), other.shards(split)):
            assert manifest.shard_path(mine).read_bytes() == other.shard_path(theirs).read_bytes()

    bigger = preprocess(data_config(corpus, tmp_path, f"data.max_chars={MAX_CHARS}", "data.samples_per_shard=256"))
    shards = {s.name for split in ("train", "val") for s in bigger.shards(split)}
    assert len(shards) < len({s.name for split in ("train", "val") for s in other.shards(split)})
    assert {p.name for p in tmp_path.iterdir()} == shards | {"manifest.json", "tokenizer.json"}
    assert bigger.num_samples("train") == other.num_samples("train")


def test_missing_input_fails_before_any_work_naming_it(data_config, tmp_path):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    with pytest.raises(ConfigError, match=str(missing)):
        preprocess(data_config([missing], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def byte_level_tokenizer(texts: list[str], special_tokens: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


def test_given_tokenizer_is_used_as_is(ray_local, kjv_chapters, data_config, tmp_path):
    corpus = write_jsonl(tmp_path / "small.jsonl", kjv_chapters[:30])
    given = tmp_path / "given.json"
    byte_level_tokenizer([c["text"] for c in kjv_chapters[:30]], ["<pad>", "<|endoftext|>"]).save(str(given))
    manifest = preprocess(data_config([corpus], tmp_path / "out", f"data.tokenizer.path={given}"))
    assert manifest.tokenizer_sha256 == file_sha256(given) == file_sha256(manifest.tokenizer_path)
    assert manifest.eos_id == 1 and manifest.vocab_size == Tokenizer.from_file(str(given)).get_vocab_size()
    assert manifest.stats["tokenizer_trained"] is False


def test_given_tokenizer_without_the_eos_token_fails_naming_the_file(kjv_chapters, data_config, tmp_path):
    corpus = write_jsonl(tmp_path / "small.jsonl", kjv_chapters[:5])
    given = tmp_path / "no_eos.json"
    byte_level_tokenizer([c["text"] for c in kjv_chapters[:5]], ["<pad>"]).save(str(given))
    with pytest.raises(TokenizerError, match="no_eos.json"):
        preprocess(data_config([corpus], tmp_path / "out", f"data.tokenizer.path={given}"))
    assert not (tmp_path / "out").exists()


def test_byte_ranges_split_a_file_without_losing_or_repeating_lines(corpus):
    path, size = str(corpus[0]), corpus[0].stat().st_size
    whole, _ = read_documents(path, "text", 20, MAX_CHARS)
    for cuts in ([size // 2], [1, 2, 3, 777, size - 1], list(range(0, size, size // 7))[1:]):
        bounds = [0, *cuts, size]
        parts = [read_documents(path, "text", 20, MAX_CHARS, lo, hi)[0] for lo, hi in zip(bounds, bounds[1:])]
        assert [d for part in parts for d in part] == whole


def test_clean_text_normalizes_unicode_controls_and_spaces():
    assert clean_text("  Cafe\u0301\x00 and\u00a0\u00a0tea \t\r\nnext   line \n\n\n\nend\x1b ") == \
        "Caf\u00e9 and tea\nnext line\n\nend"
    assert clean_text("tab\tinside  a line") == "tab\tinside a line"
    assert np.array_equal(dedup.first_occurrences(dedup.digests([b"a", b"b", b"a"])), [True, True, False])
