"""What PII redaction costs next to cleaning and tokenizing, on the same texts in one process:

    python benchmarks/bench_pii.py [--mb 8] [--pii-share 0.1]

The corpus is the King James Bible in documents of 40 random verses; a share of them (--pii-share) get an
e-mail address, a phone number and an IP address planted in them, as web text would. Prints MB/s of
clean_texts (the pyarrow cleaning pass), of redaction, and of the tokenizer's encode_batch_fast on one
thread, and the ratios: redaction's share of the per-document work of preprocessing's read + tokenize stage.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from make_demo_corpus import chapters, kjv_verses_file  # noqa: E402

from distlm.config import compose_config  # noqa: E402
from distlm.data.preprocess.clean import clean_texts  # noqa: E402
from distlm.data.preprocess.pii import Redactor  # noqa: E402
from distlm.data.preprocess.tokenizer import special_tokens, train_tokenizer  # noqa: E402


def corpus(megabytes: float, pii_share: float) -> list[str]:
    verses = [v for doc in chapters(kjv_verses_file()) for v in doc["text"].split("\n")]
    rng = random.Random(0)
    texts, size = [], 0
    while size < megabytes * 2**20:
        text = "\n".join(rng.sample(verses, 40))
        if rng.random() < pii_share:
            text += (f"\nMail user{rng.randrange(999)}@example.com, call +44 20 7946 {rng.randrange(1000, 9999)} "
                     f"or reach 10.0.{rng.randrange(256)}.{rng.randrange(256)}.")
        texts.append(text)
        size += len(text.encode())
    return texts


def best_seconds(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=8)
    p.add_argument("--pii-share", type=float, default=0.1)
    a = p.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one thread, as one preprocessing task
    c = compose_config()
    texts = corpus(a.mb, a.pii_share)
    mb = sum(len(t.encode()) for t in texts) / 2**20
    array = clean_texts(pa.array(texts, pa.string()), c.data.unicode_form)
    redactor = Redactor.from_config(c.data.pii)
    tokenizer = train_tokenizer(texts[:2000], 4096, special_tokens(c.data.tokenizer))
    seconds = {
        "clean_texts": best_seconds(lambda: clean_texts(pa.array(texts, pa.string()), c.data.unicode_form)),
        "pii redact": best_seconds(lambda: redactor.redact(array)),
        "tokenize (1 thread)": best_seconds(lambda: tokenizer.encode_batch_fast(texts, add_special_tokens=False), 1),
    }
    _, counts = redactor.redact(array)
    print(f"{len(texts):,} documents, {mb:.1f} MB, {100 * a.pii_share:.0f}% with planted PII; replaced per kind: "
          f"{dict(zip(redactor.kinds, counts.sum(0).tolist()))}")
    for name, s in seconds.items():
        print(f"{name:22s} {mb / s:8.1f} MB/s")
    work = seconds["clean_texts"] + seconds["tokenize (1 thread)"]
    print(f"redaction / cleaning:  {seconds['pii redact'] / seconds['clean_texts']:.2f}x")
    print(f"redaction / (cleaning + tokenizing): {seconds['pii redact'] / work:.3f}")


if __name__ == "__main__":
    main()
