"""distlm.data.preprocess.pipeline on a real local Ray cluster, with real input formats, real shards and a real tokenizer."""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import decoded_documents
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from distlm.config import ConfigError, compose_config
from distlm.data.loading.loader import ShardLoader
from distlm.data.loading.reading import read_samples
from distlm.data.preprocess import dedup, minhash
from distlm.data.preprocess.clean import alpha_fraction
from distlm.data.preprocess.clean import clean_text as clean_with
from distlm.data.preprocess.pipeline import preprocess
from distlm.data.preprocess.sources import InputFile, ReadTask, read_documents
from distlm.data.preprocess.tokenizer import TokenizerError
from distlm.data.preprocess.workdir import part_bounds
from distlm.data.shards import STATS_FILE, Manifest
from distlm.files import file_sha256

MAX_CHARS = 20_000
NUMBERS_7 = 123   # chapter index of Numbers 7: twelve tribes bring the same offering, line for line
UNICODE_FORM = compose_config().data.unicode_form   # conf/'s, which the corpus here is preprocessed with


def clean_text(text: str, unicode_form: str | None = UNICODE_FORM) -> str:
    """A document as preprocessing cleans it."""
    return clean_with(text, unicode_form)


def jsonl(docs) -> bytes:
    return "".join(json.dumps(doc) + "\n" for doc in docs).encode("utf-8")


def reworded(text: str, fraction: float, seed: int) -> str:
    """The text with `fraction` of its words replaced by made-up ones."""
    words = text.split(" ")
    rng = random.Random(seed)
    for i in rng.sample(range(len(words)), int(fraction * len(words))):
        words[i] = "zq" + "".join(rng.choice("bcdfgkmnp") for _ in range(5))
    return " ".join(words)


BAD_LINES = {   # reason -> lines planted in a.jsonl
    "invalid_json": [b"{not json\n"],
    "bad_utf8": [b'{"text": "caf\xe9: latin-1 bytes are not UTF-8, and this line is long enough"}\n',
                 b'{"text": "a lone surrogate \\ud800 cannot be encoded, long enough"}\n'],
    "missing_text": [b'{"id": "no text field"}\n', b'{"text": 5}\n'],
    "empty": [b'{"text": " \\u0000 \\t "}\n'],
    "too_short": [b'{"text": "tiny"}\n'],
    "too_long": [jsonl([{"text": "long " * 5000}]), jsonl([{"text": "x" * (7 * MAX_CHARS)}])],  # parsed / never parsed
    "low_alpha": [jsonl([{"text": "| 1024 | 2048 | 4096 | 8192 | 16384 | 32768 | 65536 |\n" * 3}])],
    "repeated_lines": [jsonl([{"text": "Buy now!\nBest price.\n" * 6 + "Call us."}])],
}


@pytest.fixture(scope="module")
def chapters(kjv_chapters) -> list[str]:
    return [c["text"] for c in kjv_chapters[:130]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, chapters) -> list[Path]:
    """The first 130 Bible chapters in book order over five formats, with bad input of every kind, two exact
    and one near duplicate of earlier chapters, and a chapter reworded enough to count as distinct."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [{"text": t} for t in chapters]
    (root / "a.jsonl").write_bytes(jsonl(docs[:50]) + b"".join(b"".join(v) for v in BAD_LINES.values()) + b"\n")
    spaced = "  " + chapters[3].upper().replace(" ", "   ").replace("\n", " \r\n") + "\t\n"   # exact duplicate
    (root / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(docs[50:80] + [{"text": spaced}])))
    near, distinct = reworded(chapters[10], 0.01, seed=1), reworded(chapters[11], 0.3, seed=2)
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(docs[80:110] + [{"text": near},
                                                                                               {"text": distinct}])))
    (root / "d.txt").write_text(chapters[110], encoding="utf-8")
    pq.write_table(pa.table({"text": chapters[111:130] + [chapters[5], None]}), root / "e.parquet")
    pq.write_table(pa.table({"body": ["no text column"] * 3}), root / "f.parquet")
    (root / "g.jsonl").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())  # binary
    packed = gzip.compress(jsonl(docs[:1]))
    (root / "h.jsonl.gz").write_bytes(packed[: len(packed) // 2])                                # truncated
    return sorted(root.iterdir())


@pytest.fixture(scope="module")
def processed(ray_local, corpus, data_config, tmp_path_factory):
    cfg = data_config(corpus, tmp_path_factory.mktemp("shards"), f"data.max_chars={MAX_CHARS}")
    return cfg, preprocess(cfg)


def removed(manifest: Manifest) -> dict[str, int]:
    return {row["stage"]: row.get("docs_removed", row.get("files")) for row in manifest.stats["removals"]}


def test_each_kind_of_bad_input_is_counted_per_reason_and_skipped(processed, corpus):
    _, manifest = processed
    counts = removed(manifest)
    for reason in ("invalid_json", "bad_utf8", "empty", "too_short", "too_long", "low_alpha"):
        assert counts[reason] == len(BAD_LINES[reason]), reason
    assert counts["missing_text"] == 2 + 1 + 3   # two JSON lines, a null parquet value, a file without the column
    assert counts["binary_file"] == 1 and counts["corrupt_file"] == 1
    assert sorted(manifest.stats["bad_files"]) == [["binary_file", str(corpus[-2])], ["corrupt_file", str(corpus[-1])]]


def test_filters_report_documents_and_bytes_removed(processed):
    _, manifest = processed
    rows = {row["stage"]: row for row in manifest.stats["removals"]}
    assert rows["repeated_lines"]["docs_removed"] == 2   # the planted one and Numbers 7
    assert rows["low_alpha"]["bytes_removed"] == len(clean_text(json.loads(BAD_LINES["low_alpha"][0])["text"]))
    assert rows["too_long"]["bytes_removed"] == len(BAD_LINES["too_long"][1]) + len(clean_text("long " * 5000))
    for before, after in zip(manifest.stats["removals"][2:], manifest.stats["removals"][3:]):
        assert before["docs_out"] == after["docs_in"]   # documents in/out chain through the stages
    kept = sum(manifest.stats["documents"].values())
    assert manifest.stats["removals"][-1]["docs_out"] == kept == 130   # 130 chapters - Numbers 7 + the reworded one


def test_dedup_removes_planted_exact_and_near_duplicates_and_keeps_distinct_ones(processed, chapters):
    _, manifest = processed
    assert removed(manifest)["exact_duplicate"] == 2 and removed(manifest)["near_duplicate"] == 1
    found = decoded_documents(manifest, "train") + decoded_documents(manifest, "val")
    assert len(found) - 2 >= sum(manifest.stats["documents"].values()) - 2   # all but a tail cut short
    assert found.count(clean_text(chapters[3])) == found.count(clean_text(chapters[5])) == 1
    assert sum(clean_text(chapters[10]) == doc for doc in found) == 1   # the near duplicate went, the original stayed
    assert reworded(chapters[11], 0.3, seed=2) in found and clean_text(chapters[11]) in found
    assert set(found) - {"<cut>"} <= {clean_text(t) for t in chapters} | {reworded(chapters[11], 0.3, seed=2)}


def test_every_part_of_the_stream_mixes_the_whole_corpus(processed, chapters):
    """The inputs are in book order (Genesis first); every quarter of the packed training stream (so every
    shard, whatever its size) must still hold chapters from every quarter of the book."""
    _, manifest = processed
    index = {clean_text(t): i for i, t in enumerate(chapters)}
    chapter_ids = [index[doc] for doc in decoded_documents(manifest, "train") if doc in index]
    for quarter in np.array_split(np.array(chapter_ids), 4):
        assert set(quarter * 4 // len(chapters)) == {0, 1, 2, 3}
    neighbours = np.mean(np.abs(np.diff(chapter_ids)) <= 2)
    assert neighbours < 0.1   # in book order it would be 1.0


def test_manifest_matches_the_tars_on_disk(processed):
    _, manifest = processed
    manifest.verify()
    assert manifest.dtype == "uint16" and manifest.tokenizer.eos_id == 0
    for split in ("train", "val"):
        shards = manifest.shards(split)
        assert all(s.samples == 64 for s in shards[:-1]) and 0 < shards[-1].samples <= 64
        assert manifest.num_samples(split) == sum(s.samples for s in shards)
        assert manifest.splits[split].tokens == manifest.num_samples(split) * manifest.sample_len
        assert manifest.stats["dropped_tokens"][split] < manifest.sample_len   # only the stream's tail
        assert manifest.stats["tokens"][split] == manifest.splits[split].tokens + manifest.stats["dropped_tokens"][split]
    names = {s.name for split in ("train", "val") for s in manifest.shards(split)}
    assert {p.name for p in manifest.data_dir.iterdir()} == names | {"manifest.json", "tokenizer.json", STATS_FILE}
    assert json.loads((manifest.data_dir / STATS_FILE).read_text()) == manifest.stats
    assert Manifest.load(manifest.data_dir) == manifest


def test_ray_data_reads_the_data_directory_as_one_row_per_sequence(processed):
    import ray.data

    _, manifest = processed
    # The call docs/data.md gives: only the tars (manifest.json and the others beside them are not WebDataset).
    rows = ray.data.read_webdataset(str(manifest.data_dir), file_extensions=["tar"]).take_all()
    samples = manifest.num_samples("train") + manifest.num_samples("val")
    assert len(rows) == samples and len({row["__key__"] for row in rows}) == samples
    first = next(row for row in rows if row["__key__"] == "train-00000-000000")
    shard = manifest.shards("train")[0]
    expected, _ = read_samples(str(manifest.shard_path(shard)), shard, manifest.layout, np.array([0]), verify=True)
    assert first["tokens.npy"].dtype == np.uint16 and first["tokens.npy"].tolist() == expected[0].tolist()


def test_rerun_with_same_inputs_skips_the_work(processed, caplog):
    cfg, manifest = processed
    before = {p.name: p.stat().st_mtime_ns for p in manifest.data_dir.iterdir()}
    with caplog.at_level(logging.INFO, logger="distlm.data.preprocess.pipeline"):
        again = preprocess(cfg)
    assert "up to date" in caplog.text
    assert again == manifest
    assert {p.name: p.stat().st_mtime_ns for p in manifest.data_dir.iterdir()} == before


def shard_hashes(manifest: Manifest) -> list[str]:
    return [file_sha256(manifest.shard_path(s)) for split in ("train", "val") for s in manifest.shards(split)]


def test_two_runs_give_byte_identical_shards_however_the_work_is_split(processed, corpus, data_config, tmp_path):
    _, manifest = processed
    other = preprocess(data_config(corpus, tmp_path, f"data.max_chars={MAX_CHARS}", "data.tokenize_task_mb=0.01"))
    assert shard_hashes(other) == shard_hashes(manifest) and other.tokenizer_sha256 == manifest.tokenizer_sha256
    bigger = preprocess(data_config(corpus, tmp_path, f"data.max_chars={MAX_CHARS}", "data.samples_per_shard=256"))
    names = {s.name for split in ("train", "val") for s in bigger.shards(split)}
    assert {p.name for p in tmp_path.iterdir()} == names | {"manifest.json", "tokenizer.json", STATS_FILE}
    assert bigger.num_samples("train") == manifest.num_samples("train")


def test_a_rerun_after_a_crash_redoes_only_the_missing_work(processed, corpus, data_config, tmp_path):
    _, clean_run = processed
    cfg = data_config(corpus, tmp_path, f"data.max_chars={MAX_CHARS}")
    (tmp_path / "train-00001.tar").mkdir(parents=True)   # the write of shard 1 fails, the rest goes on
    with pytest.raises(Exception, match="train-00001.tar"):
        preprocess(cfg)
    assert not (tmp_path / "manifest.json").exists()
    (tmp_path / "train-00001.tar").rmdir()
    next(tmp_path.glob(".work-*/blocks/00000-00001.tokens.npz")).unlink()   # as if killed while tokenizing a.jsonl
    resumed = preprocess(cfg)
    assert resumed.stats["reused"]["blocks"] == resumed.stats["read_tasks"] - 1   # only a.jsonl read again
    written = len(shard_hashes(resumed)) - resumed.stats["reused"]["shards"]
    assert 0 < written < len(shard_hashes(resumed)) / 2    # only the failed group's shards were written
    assert shard_hashes(resumed) == shard_hashes(clean_run)
    assert not list(tmp_path.glob(".work-*")), "the work directory is removed once the manifest is written"


def test_unreadable_inputs_fail_before_any_work_naming_them(data_config, tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "table.csv").write_text("a,b\n")
    cases = {tmp_path / "nowhere" / "corpus.jsonl": "nowhere/corpus.jsonl", tmp_path / "folder.jsonl": "not a file",
             tmp_path / "table.csv": "cannot tell the format", "nosuchproto://bucket/x.jsonl": "nosuchproto"}
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            preprocess(data_config([path], tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def byte_level_tokenizer(texts: list[str], special_tokens: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


def test_a_given_tokenizer_is_used_as_is_with_its_special_tokens(ray_local, chapters, data_config, tmp_path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_bytes(jsonl([{"text": t} for t in chapters[:30]]))
    given = tmp_path / "given.json"
    byte_level_tokenizer(chapters[:30], ["<pad>", "<|endoftext|>", "<s>"]).save(str(given))
    manifest = preprocess(data_config([corpus], tmp_path / "out", f"data.tokenizer.path={given}",
                                      "data.tokenizer.bos_token='<s>'", "data.tokenizer.pad_token='<pad>'"))
    assert manifest.tokenizer_sha256 == file_sha256(given) == file_sha256(manifest.tokenizer_path)
    assert (manifest.tokenizer.eos_id, manifest.tokenizer.bos_id, manifest.tokenizer.pad_id) == (1, 2, 0)
    assert manifest.stats["tokenizer"]["trained"] is False
    data = dataclasses.replace(data_config([corpus], manifest.data_dir).data, shuffle_window=1)
    first = next(ShardLoader(data, "train", 1, 0, 1, seed=0, shuffle=False).iter_batches())
    assert first[0, 0] == 2   # every document starts with BOS


def test_a_given_tokenizer_without_the_eos_token_fails_naming_the_file(chapters, data_config, tmp_path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_bytes(jsonl([{"text": t} for t in chapters[:5]]))
    given = tmp_path / "no_eos.json"
    byte_level_tokenizer(chapters[:5], ["<pad>"]).save(str(given))
    with pytest.raises(TokenizerError, match="no_eos.json"):
        preprocess(data_config([corpus], tmp_path / "out", f"data.tokenizer.path={given}"))
    assert not (tmp_path / "out").exists()


def test_document_boundaries_are_kept_when_asked(ray_local, chapters, data_config, tmp_path):
    corpus = tmp_path / "small.jsonl"
    corpus.write_bytes(jsonl([{"text": t} for t in chapters[:20]]))
    cfg = data_config([corpus], tmp_path / "out", "data.keep_doc_boundaries=true", "data.val_fraction=0",
                      "data.shuffle_window=16")
    manifest = preprocess(cfg)
    source = ShardLoader(cfg.data, "train", 8, 0, 1, seed=0, shuffle=True, doc_boundaries=True)
    for tokens, starts in source.iter_batches(max_batches=20):
        after_eos = np.zeros_like(starts)
        after_eos[:, 1:] = (tokens[:, :-1] == manifest.eos_id).numpy()
        assert np.array_equal(starts[:, 1:].numpy(), after_eos[:, 1:])   # a new document right after every EOS


def test_byte_ranges_split_a_file_without_losing_or_repeating_lines(corpus):
    path = corpus[0]
    size = path.stat().st_size
    source = InputFile(url=str(path), fmt="jsonl", compression=None, size=size, mtime="")

    def texts(lo, hi):
        return read_documents(ReadTask(source, lo, hi), "text", "file", 4 * MAX_CHARS).texts

    whole = texts(0, None)
    for cuts in ([size // 2], [1, 2, 3, 777, size - 1], list(range(0, size, size // 7))[1:]):
        bounds = [0, *cuts, size]
        assert [t for lo, hi in zip(bounds, bounds[1:]) for t in texts(lo, hi)] == whole


def test_tokenize_work_is_split_by_text_bytes_not_document_count():
    few_long = np.array([300_000] * 10 + [5] * 3)   # 10 long documents, then 3 tiny ones
    bounds = part_bounds(few_long, 1 << 20)
    assert bounds[0] == 0 and bounds[-1] == len(few_long) and (np.diff(bounds) > 0).all()
    assert len(bounds) - 1 == 3   # 3 MB of text -> 3 tasks, although 13 documents would have made one
    part_bytes = np.add.reduceat(few_long, bounds[:-1])
    assert (part_bytes <= (1 << 20) + few_long.max()).all()
    assert part_bounds(np.array([5 << 20]), 1 << 20).tolist() == [0, 1]   # a longer document is one task
    assert part_bounds(np.zeros(0, np.int64), 1 << 20).tolist() == [0]


def test_preprocess_runs_one_tokenize_task_per_share_of_text(processed):
    cfg, manifest = processed
    text_mb = manifest.stats["text_bytes"]["train"] / 2**20
    assert manifest.stats["tokenize_tasks"] >= text_mb / cfg.data.tokenize_task_mb


def test_clean_text_normalizes_unicode_controls_and_spaces():
    assert clean_text("  Cafe\u0301\x00 and\u00a0\u00a0tea \t\r\nnext   line \n\n\n\nend\x1b ") == \
        "Caf\u00e9 and tea\nnext line\n\nend"
    assert clean_text("tab\tinside  a line\u3000x") == "tab\tinside a line x"
    assert clean_text("\ufb01ne", "NFKC") == "fine" and clean_text("\ufb01ne", None) == "\ufb01ne"


def test_alpha_fraction_counts_each_text_of_any_slice_of_an_arrow_array():
    """Letters / non-space characters per text, as Python's str.isalpha counts them, including empty texts and
    slices whose data buffer runs past their last text."""
    def expected(text: str) -> float:
        visible = [c for c in text if c not in " \t\n"]
        return 1.0 - sum(not c.isalpha() for c in visible) / len(visible) if visible else 1.0

    rng = random.Random(0)
    texts = pa.array(["".join(rng.choice("ab Z9!\n\t\u00e9\u4e2d,") for _ in range(rng.randint(0, 30)))
                      for _ in range(300)], pa.string())
    for part in (texts, texts.slice(7, 200), texts.slice(0, 1), pa.array(["", "x1", ""], pa.string())):
        chars = pc.utf8_length(part).to_numpy(zero_copy_only=False)
        assert np.allclose(alpha_fraction(part, chars), [expected(t) for t in part.to_pylist()])


def shingle_jaccard(a: np.ndarray, b: np.ndarray, n: int = 5) -> float:
    sa, sb = ({tuple(x[i: i + n]) for i in range(len(x) - n + 1)} for x in (a, b))
    return len(sa & sb) / len(sa | sb)


def test_minhash_signatures_agree_as_often_as_documents_overlap():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4000, 1500)
    for changed in (0.01, 0.05, 0.2):
        b = a.copy()
        b[rng.choice(len(a), int(changed * len(a)), replace=False)] = rng.integers(4000, 8000, int(changed * len(a)))
        sig = minhash.signatures(np.concatenate([a, b]), np.array([len(a), len(b)]), 5, 256)
        assert abs((sig[0] == sig[1]).mean() - shingle_jaccard(a, b)) < 0.07, changed
    bands, rows = minhash.lsh_bands(0.8, 128)
    assert bands * rows <= 128 and 1 - (1 - 0.95**rows) ** bands > 0.99 and 1 - (1 - 0.5**rows) ** bands < 0.01


def test_content_hash_orders_do_not_depend_on_input_order():
    texts = pa.array([f"document number {i}" for i in range(50)], pa.string())
    digests = dedup.digests(texts)
    order = dedup.mix_order(digests, seed=3)
    shuffled = np.random.default_rng(1).permutation(50)
    assert np.array_equal(shuffled[dedup.mix_order(digests[shuffled], seed=3)], order)
    assert not np.array_equal(dedup.mix_order(digests, seed=4), order)


# ---------------------------------------------------------------- the command as a user runs it

@pytest.fixture(scope="module")
def command_run(kjv_chapters, tmp_path_factory):
    """`distlm preprocess` in a new process with no Ray running: it starts its own local cluster and stops it.
    Returns (process, [(process, command line)] of its tree seen while it ran, its `-X importtime` report)."""
    tmp = tmp_path_factory.mktemp("command")
    corpus = tmp / "kjv.jsonl"
    corpus.write_bytes(jsonl(kjv_chapters[:40]))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp / "stderr.txt", "w") as err:   # a file, not a pipe nobody reads while it runs (it would block)
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "distlm.cli", "preprocess",
                                 f"data.inputs=[{corpus}]", f"data.dir={tmp / 'out'}", "data.tokenizer.vocab_size=512",
                                 f"hydra.run.dir={tmp / 'hydra'}"], env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                                stderr=err)
        seen: dict[int, tuple[psutil.Process, str]] = {}   # pid -> (process, its command line when seen)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                for p in root.children(recursive=True):
                    seen.setdefault(p.pid, (p, " ".join(_cmdline(p))))
            except psutil.Error:
                pass
            time.sleep(0.05)
    stderr = (tmp / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert (tmp / "out" / "manifest.json").is_file()
    return proc, list(seen.values()), stderr


def test_the_command_leaves_no_ray_process_behind(command_run):
    _, seen, _ = command_run
    assert any("raylet" in cmdline for _, cmdline in seen)   # it did start a cluster of its own
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p, _ in seen):
        time.sleep(0.1)
    assert not [cmdline for p, cmdline in seen if _alive(p)]


def test_the_command_does_not_import_torch(command_run):
    """torch is for training: importing it would add ≈1.7 s (measured) to every preprocess start."""
    _, _, importtime = command_run
    imported = {line.rsplit("|", 1)[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}
    assert "distlm.data.preprocess.pipeline" in imported   # the report is there
    assert "torch" not in imported


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []
