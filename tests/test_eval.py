"""`distlm eval` and lm-eval on a run that 2 Ray Train workers trained on real Bible shards, and its export."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distlm.checkpoint import store
from distlm.checkpoint.weights import read_weights
from distlm.config import ConfigError, ModelConfig, compose_config
from distlm.eval import evaluate
from distlm.hf.export import export
from distlm.model.llama import Llama
from distlm.train.driver.launch import train
from distlm.train.worker.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS, MICRO, WORKERS, EVAL_BATCHES = 4, 4, 2, 2


@pytest.fixture(scope="module")
def run_dir(bible_shards, tmp_path_factory) -> Path:
    """4 steps of the test model (vocab 512, 64-token inputs), evaluated and saved at step 4, then exported."""
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config(
        "model=test", "data.seq_len=64", "data.tokenizer.vocab_size=512", f"data.dir={bible_shards}",
        f"run_dir={run_dir}", f"cluster.num_workers={WORKERS}", f"trainer.max_steps={STEPS}",
        f"trainer.micro_batch_size={MICRO}", "optimizer.warmup_steps=1", f"trainer.eval_every={STEPS}",
        f"trainer.eval_batches={EVAL_BATCHES}", f"trainer.checkpoint_every={STEPS}", "logger.wandb=false"))
    export(compose_config(f"run_dir={run_dir}"))  # runs/…/checkpoints -> runs/…/hf
    return run_dir


def eval_config(run_dir: Path, data_dir: Path, *overrides: str):
    return compose_config(f"run_dir={run_dir}", f"data.dir={data_dir}", *overrides)


def test_checkpoint_perplexity_is_the_trainers_validation_loss(run_dir, bible_shards, tmp_path):
    # The trainer's batches: each of the 2 workers takes 4 samples of every 8, for eval_batches batches.
    out = tmp_path / "eval.json"
    result = evaluate(eval_config(run_dir, bible_shards, f"eval.batch_size={MICRO * WORKERS}",
                                  f"eval.batches={EVAL_BATCHES}", f"eval.out={out}"))
    logged = [r for r in read_metrics(run_dir) if r["step"] == STEPS and "val_loss" in r][-1]
    assert result["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(logged["val_ppl"], rel=1e-4)
    assert result["step"] == STEPS and result["checkpoint"] == str(run_dir / "checkpoints" / store.tag_for_step(STEPS))
    assert result["tokens"] == EVAL_BATCHES * MICRO * WORKERS * 64
    assert json.loads(out.read_text()) == result


def test_checkpoint_and_export_have_the_same_perplexity(run_dir, bible_shards):
    ours = evaluate(eval_config(run_dir, bible_shards, "eval.batch_size=4"))  # the whole split
    assert json.loads((run_dir / "eval.json").read_text()) == ours  # eval.out defaults into run_dir
    hf = evaluate(eval_config(run_dir, bible_shards, "eval.batch_size=4", f"eval.model_dir={run_dir / 'hf'}",
                              f"eval.out={run_dir / 'eval_hf.json'}"))
    assert hf["tokens"] == ours["tokens"] == ours["samples"] * 64 and ours["samples"] > ours["split_samples"] - 4
    assert hf["perplexity"] == pytest.approx(ours["perplexity"], rel=1e-4)
    assert 1 < ours["perplexity"] < 512  # trained: better than a uniform guess over the vocabulary


def test_distlm_eval_command_prints_and_writes_the_result(run_dir, bible_shards, tmp_path):
    out = tmp_path / "cli.json"
    proc = subprocess.run([sys.executable, "-m", "distlm.cli", "eval", f"run_dir={run_dir}", f"data.dir={bible_shards}",
                           f"eval.model_dir={run_dir / 'hf'}", "eval.batches=2", "eval.batch_size=3",
                           f"eval.out={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["batches"], result["tokens"]) == (2, 2 * 3 * 64)
    assert f"perplexity {result['perplexity']:.3f} over 384 tokens" in proc.stdout


@pytest.mark.parametrize("overrides, message", [
    (["eval.model_dir={tmp}"], "not a Hugging Face model directory"),
    (["eval.split=test"], r"eval.split='test': .* has the splits \['train', 'val'\]"),
    (["eval.batch_size=100000"], "is more than the"),
    (["eval.batches=0"], "eval.batches=0"),
    (["data.dir={tmp}"], "data.dir: no manifest.json"),
])
def test_eval_says_what_is_wrong(overrides, message, run_dir, bible_shards, tmp_path):
    with pytest.raises(ConfigError, match=message):
        evaluate(eval_config(run_dir, bible_shards, *[o.format(tmp=tmp_path) for o in overrides],
                             f"eval.out={tmp_path / 'eval.json'}"))


def test_eval_refuses_shards_of_another_tokenizer(run_dir, tmp_path, data_config, kjv_chapters, ray_local):
    from distlm.data.preprocess.pipeline import preprocess

    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(json.dumps(doc) + "\n" for doc in kjv_chapters[200:260]), encoding="utf-8")
    other = tmp_path / "shards"
    preprocess(data_config([corpus], other))  # another corpus, so another BPE vocabulary
    for model in ([], [f"eval.model_dir={run_dir / 'hf'}"]):
        with pytest.raises(ConfigError, match="another (tokenizer|vocabulary)"):
            evaluate(eval_config(run_dir, other, *model, f"eval.out={tmp_path / 'eval.json'}"))


# ---------------------------------------------------------------- lm-evaluation-harness on the export

TASK_YAML = """\
task: distlm_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
metadata:
  version: 1.0
"""


def import_lm_eval():
    """lm-eval is part of the `test` extra that `make test` installs: there (DISTLM_TEST_EXTRAS=required, set by
    the Makefile) and in CI (CI=true) its absence is a broken install and fails; elsewhere the test is skipped,
    saying why and how to install it (`-ra`, pytest's default here, lists the reason)."""
    try:
        import lm_eval
    except ImportError as e:
        message = f"lm-eval is not installed ({e}); install it with: pip install -e '.[eval]'"
        if os.environ.get("CI") == "true" or os.environ.get("DISTLM_TEST_EXTRAS") == "required":
            pytest.fail(message)
        pytest.skip(message)
    return lm_eval


def test_lm_eval_scores_the_export_offline_as_distlm_does(run_dir, kjv_chapters, tmp_path, monkeypatch):
    """lm-eval's `hf` model on the export, with a task read from a local JSONL; its word perplexity equals
    the one distlm's own model gives the same documents (each read after the EOS token, as lm-eval does)."""
    lm_eval = import_lm_eval()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval.tasks import TaskManager

    hf_dir = run_dir / "hf"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    # Unseen verses short enough for one 64-token window (longer ones would be scored in rolling windows).
    verses = [v for chapter in kjv_chapters[900:] for v in chapter["text"].split("\n")]
    docs = [v for v in verses if 20 <= len(tok(v).input_ids) <= 60][:12]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "distlm_local_ppl.yaml").write_text(TASK_YAML.format(data=tmp_path / "docs.jsonl"))

    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
                                      tasks=["distlm_local_ppl"], task_manager=TaskManager(include_path=str(tmp_path / "task")),
                                      batch_size=4, device="cpu")
    scores = results["results"]["distlm_local_ppl"]
    assert all(math.isfinite(scores[k]) for k in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"))

    tag_dir = run_dir / "checkpoints" / store.tag_for_step(STEPS)
    state = store.read_state(tag_dir)
    m = ModelConfig.from_dict(state.config["model"])
    model = Llama(m).eval()
    model.load_state_dict(read_weights(tag_dir, state, m))
    # The export has one row more, its pad token's (the mean row): lm-eval's softmax counts its logit, which
    # only the export can give; every other logit is distlm's own.
    exported = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert exported.config.vocab_size == m.vocab_size + 1 and tok.pad_token_id == m.vocab_size
    log_likelihood = 0.0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([[tok.eos_token_id, *tok(doc).input_ids]])
            pad_logit = exported(input_ids=ids[:, :-1]).logits[0, :, -1:]
            logits = torch.cat([model(ids[:, :-1])[0], pad_logit], dim=-1)
            log_likelihood -= torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    words = sum(len(re.split(r"\s+", d)) for d in docs)  # lm-eval's word count
    assert scores["word_perplexity,none"] == pytest.approx(math.exp(-log_likelihood / words), rel=1e-4)
