"""`distlm eval`: perplexity of a distlm checkpoint or of a Hugging Face directory on preprocessed shards.

The split is read in the order the trainer evaluates it (no shuffle, global batch after global batch), so
with eval.batch_size = trainer.micro_batch_size x data-parallel size and eval.batches = trainer.eval_batches
the loss is the `val_loss` the trainer logged at the checkpoint's step.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from distlm.checkpoint import store
from distlm.config import Config, ConfigError, ModelConfig, raise_if
from distlm.data.loading.loader import ShardLoader
from distlm.data.shards import Manifest
from distlm.validation import model_reads_data, validate_eval

log = logging.getLogger(__name__)


def evaluate(c: Config) -> dict[str, Any]:
    """Mean next-token cross-entropy and perplexity over `c.eval.batches` batches of split `c.eval.split`
    (all of it if null); printed, written as JSON to `c.eval.out`, and returned."""
    e = c.eval
    raise_if(validate_eval(c))
    try:
        manifest = Manifest.load(c.data.dir)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.dir: {err}") from None
    if e.split not in manifest.splits:
        raise ConfigError(f"eval.split={e.split!r}: {c.data.dir} has the splits {sorted(manifest.splits)}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits_fn, source = _load_hf(Path(e.model_dir), manifest, device) if e.model_dir else \
        _load_checkpoint(Path(e.checkpoint), manifest, device)
    masked = source.get("doc_masking", False)
    loader = ShardLoader(c.data, split=e.split, micro_batch_size=e.batch_size, dp_rank=0, dp_size=1, seed=0,
                         shuffle=False, doc_boundaries=masked)
    if loader.batches_per_epoch == 0:
        raise ConfigError(f"eval.batch_size={e.batch_size} is more than the {loader.num_samples} samples of split "
                          f"'{e.split}' in {c.data.dir}")

    nll, tokens, batches = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader.iter_batches(max_batches=e.batches):
            batch, starts = batch if masked else (batch, None)
            batch = batch.to(device)
            logits = logits_fn(batch[:, :-1], None if starts is None else starts[:, :-1]).float()
            # Summed, not averaged per batch: the mean is over tokens, whatever the batch count.
            nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            tokens += batch[:, 1:].numel()
            batches += 1
    loss = nll / tokens
    result = {**source, "data_dir": c.data.dir, "split": e.split, "batch_size": e.batch_size, "batches": batches,
              "samples": batches * e.batch_size, "split_samples": loader.num_samples, "tokens": tokens,
              "loss": loss, "perplexity": math.exp(min(loss, 50))}
    out = Path(e.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"loss {loss:.4f} nats/token, perplexity {result['perplexity']:.3f} over {tokens:,} tokens "
          f"({result['samples']:,} of {loader.num_samples:,} samples of split '{e.split}'); written to {out}")
    return result


def _load_checkpoint(path: Path, manifest: Manifest, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    from distlm.checkpoint.weights import find_checkpoint, read_weights
    from distlm.model.llama import Llama, document_inputs

    tag_dir = find_checkpoint(path)
    state = store.read_state(tag_dir)
    if state.tokenizer_sha256 != manifest.tokenizer_sha256:
        raise ConfigError(f"checkpoint {tag_dir} was trained with another tokenizer than the shards in data.dir="
                          f"{manifest.data_dir}: its perplexity there would mean nothing")
    m = ModelConfig.from_dict(state.config["model"])
    raise_if(model_reads_data(m.vocab_size, m.max_seq_len, manifest.vocab_size, manifest.seq_len, str(tag_dir)))
    model = Llama(m)
    model.load_state_dict(read_weights(tag_dir, state, m))
    model.to(device).eval()
    # A model trained with document masking is evaluated as the trainer evaluated it: attention inside each
    # document, positions restarting per document when it trained so.
    trained = state.config["trainer"]
    masked, restart = trained.get("doc_masking", False), trained.get("doc_positions", True)
    if masked and not manifest.doc_boundaries:
        raise ConfigError(f"checkpoint {tag_dir} was trained with trainer.doc_masking=true, but data.dir="
                          f"{manifest.data_dir} stores no document boundaries (preprocess with "
                          f"data.keep_doc_boundaries=true)")

    def logits(ids: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
        if starts is None:
            return model(ids)
        doc_ids, positions = document_inputs(starts.to(device), restart)
        return model(ids, doc_ids=doc_ids, position_ids=positions)

    log.info("evaluating checkpoint %s (step %d)%s", tag_dir, state.step, " with document masking" * masked)
    return logits, {"checkpoint": str(tag_dir), "step": state.step, "doc_masking": masked}


def _load_hf(model_dir: Path, manifest: Manifest, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from distlm.hf.export import PAD_TOKEN

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"eval.model_dir {model_dir} is not a Hugging Face model directory (no config.json)")
    # The shards hold token ids: the model must read them with the tokenizer that wrote them.
    pad = None
    if (model_dir / "tokenizer.json").is_file():
        theirs = Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
        ours = Tokenizer.from_file(str(manifest.tokenizer_path)).get_vocab(with_added_tokens=True)
        # A distlm export adds a pad token (a new last row when the vocabulary was full): never a target, and
        # left out of the softmax, so an export has its checkpoint's perplexity.
        if theirs.get(PAD_TOKEN) is not None and PAD_TOKEN not in ours:
            pad = theirs.pop(PAD_TOKEN)
        if theirs != ours:
            raise ConfigError(f"eval.model_dir {model_dir} has another vocabulary than the shards in data.dir="
                              f"{manifest.data_dir}: its perplexity there would mean nothing")
    else:
        log.warning("%s has no tokenizer.json: cannot check that it reads the shards' token ids", model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    raise_if(model_reads_data(model.config.vocab_size, model.config.max_position_embeddings, manifest.vocab_size,
                              manifest.seq_len, str(model_dir)))
    model.to(device).eval()
    log.info("evaluating %s", model_dir)
    # A Hugging Face Llama has no document mask: it reads every packed sample as one text.
    if pad is None:
        return (lambda ids, _starts: model(input_ids=ids).logits), {"model_dir": str(model_dir)}
    keep = torch.arange(model.config.vocab_size, device=device) != pad
    return (lambda ids, _starts: model(input_ids=ids).logits[..., keep]), {"model_dir": str(model_dir)}

