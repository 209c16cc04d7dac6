"""Document masking: in a packed sample attention never crosses a document boundary and positions restart
per document, so a document's logits are those of the document alone (fp32); and a preprocess -> train run
with masking on works through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from distlm.config import compose_config
from distlm.eval import evaluate
from distlm.model.llama import Attention, Llama, document_mask, document_positions, flex_document_mask
from distlm.train.worker.metrics import read_metrics

LEN_A, LEN_B = 23, 41


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    return Llama(compose_config("model=test", "data.tokenizer.vocab_size=300", "data.seq_len=64").model).eval()


def packed(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample A|B as token ids [1, len] and the document number of each token."""
    doc_ids = torch.tensor([[0] * a.shape[1] + [1] * b.shape[1]])
    return torch.cat([a, b], dim=1), doc_ids


def test_positions_restart_at_every_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4, 5, 6, 7]]


@torch.no_grad()
def test_a_packed_document_gives_the_logits_of_the_document_alone(model):
    a, b = torch.randint(0, 300, (1, LEN_A)), torch.randint(0, 300, (1, LEN_B))
    ids, doc_ids = packed(a, b)
    logits = model(ids, doc_ids=doc_ids, position_ids=document_positions(doc_ids))
    torch.testing.assert_close(logits[:, LEN_A:], model(b), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[:, :LEN_A], model(a), rtol=0, atol=1e-5)
    unmasked = model(ids)   # the check can fail: without the mask, B sees A
    assert (unmasked[:, LEN_A:] - model(b)).abs().max() > 1e-2


@torch.no_grad()
def test_without_restarted_positions_attention_still_ignores_the_other_document(model):
    a, other_a, b = (torch.randint(0, 300, (1, n)) for n in (LEN_A, LEN_A, LEN_B))
    ids, doc_ids = packed(a, b)
    positions = torch.arange(ids.shape[1])[None]
    logits = model(ids, doc_ids=doc_ids, position_ids=positions)
    logits_other = model(packed(other_a, b)[0], doc_ids=doc_ids, position_ids=positions)
    torch.testing.assert_close(logits[:, LEN_A:], logits_other[:, LEN_A:], rtol=0, atol=1e-5)
    # RoPE scores depend on relative positions only: inside one document, shifted positions change nothing
    # but rounding, which is why restarting them (trainer.doc_positions) is a choice of exactness, not of model.
    torch.testing.assert_close(logits[:, LEN_A:], model(b), rtol=0, atol=1e-4)


@torch.no_grad()
def test_flex_attention_document_mask_matches_the_sdpa_mask():
    """The GPU path's mask and attention call, run on CPU with flex_attention's eager reference version
    (compiled Triton kernels need a GPU)."""
    cfg = compose_config("model=test", "data.tokenizer.vocab_size=300").model
    torch.manual_seed(0)
    attention = Attention(cfg)
    x = torch.randn(2, 70, cfg.dim)
    doc_ids = torch.tensor([[0] * 30 + [1] * 25 + [2] * 15, [0] * 70])
    positions = document_positions(doc_ids)
    cos, sin = Llama(cfg).rope_cos[positions][:, None], Llama(cfg).rope_sin[positions][:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "flex_attention called without torch.compile()"
        flex = attention(x, cos, sin, flex_document_mask(doc_ids))
    sdpa = attention(x, cos, sin, document_mask(doc_ids))
    assert document_mask(doc_ids).dtype == torch.bool
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-5)


def test_masked_activation_checkpointing_gives_the_same_gradients(model):
    ids, doc_ids = packed(torch.randint(0, 300, (1, LEN_A)), torch.randint(0, 300, (1, LEN_B)))
    labels = torch.randint(0, 300, ids.shape)
    grads = []
    for interval in (0, 1):
        model.train()
        model.zero_grad()
        model.activation_checkpoint_interval = interval
        model(ids, labels, doc_ids=doc_ids, position_ids=document_positions(doc_ids)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.activation_checkpoint_interval = 0
    model.eval()
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_preprocess_then_train_with_document_masking_through_the_cli(kjv_chapters, tmp_path):
    verses = [v for c in kjv_chapters[:20] for v in c["text"].split("\n")]   # short documents: many per sample
    corpus = tmp_path / "verses.jsonl"
    corpus.write_text("".join(json.dumps({"text": v}) + "\n" for v in verses))
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    common = [f"data.dir={data_dir}", "data.seq_len=64", "data.tokenizer.vocab_size=300", "cluster.num_workers=2"]
    subprocess.run([sys.executable, "-m", "distlm.cli", "preprocess", f"data.inputs=[{corpus}]",
                    "data.keep_doc_boundaries=true", "data.near_dup_threshold=null", "data.val_fraction=0.1",
                    *common], check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "distlm.cli", "train", "model=test", f"run_dir={run_dir}", *common,
                    "trainer.doc_masking=true", "trainer.max_steps=4", "trainer.micro_batch_size=4",
                    "optimizer.warmup_steps=1", "trainer.eval_every=4", "trainer.eval_batches=1",
                    "trainer.checkpoint_every=4", "logger.wandb=false"], check=True, timeout=600)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and all(0 < v < 7 for v in val), val   # evaluated (masked) at steps 0 and 4
    assert json.loads((run_dir / "checkpoints" / "step00000004" / "distlm_state.json").read_text()) \
        ["config"]["trainer"]["doc_masking"] is True
    # `distlm eval` reads the checkpoint as the trainer evaluated it: masked, so the same loss.
    result = evaluate(compose_config(f"run_dir={run_dir}", f"data.dir={data_dir}", "eval.batch_size=8",
                                     "eval.batches=1", f"eval.out={tmp_path / 'eval.json'}"))
    assert result["doc_masking"] is True
    assert result["loss"] == pytest.approx(val[-1], rel=1e-5)
