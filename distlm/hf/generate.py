"""Sample text with transformers from a local Hugging Face Llama directory (a distlm export, or any other)
or straight from a distlm checkpoint (any layout), which is turned into the same HF model in memory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase, PreTrainedTokenizerFast, set_seed)

from distlm.config import Config, ModelConfig

log = logging.getLogger(__name__)


def generate(c: Config) -> str:
    """Continue `c.generate.prompt` with the model in `c.generate.model_dir`; print prompt + continuation
    and return the continuation. Temperature 0 means greedy decoding."""
    g = c.generate
    model_dir = Path(g.model_dir)
    model, tok = load(model_dir)
    set_seed(g.seed)

    # An empty prompt starts a new document, which in training follows the separator token.
    prompt_ids = tok(g.prompt, return_tensors="pt").input_ids
    if prompt_ids.shape[1] == 0:
        prompt_ids = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]])
    sampling = (dict(do_sample=True, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
                if g.temperature > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None))
    with torch.no_grad():
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=g.max_new_tokens,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             **sampling)
    new_ids = out[0, prompt_ids.shape[1]:]
    continuation = tok.decode(new_ids, skip_special_tokens=True)
    log.info("generated %d tokens from %s (%s)", len(new_ids), model_dir,
             "greedy" if g.temperature == 0 else f"temperature {g.temperature}, top_k {g.top_k}, top_p {g.top_p}")
    print(g.prompt + continuation)
    return continuation


def load(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A HF directory, or a distlm checkpoint (a checkpoints directory or one tag) as the HF model an export
    of it would give (fp32)."""
    if (path / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    from distlm.checkpoint import store
    from distlm.checkpoint.weights import find_checkpoint, read_weights
    from distlm.hf.export import SpecialIds, hf_config, hf_reader
    from distlm.hf.names import hf_tensors, to_in_memory

    if not path.is_dir():
        raise FileNotFoundError(f"generate.model_dir {path} is not a Hugging Face model directory (no config.json) "
                                f"nor a distlm checkpoint; run `distlm export` first or point generate.model_dir at one")
    tag_dir = find_checkpoint(path)
    state = store.read_state(tag_dir)
    m = ModelConfig.from_dict(state.config["model"])
    eos = state.config["data"]["tokenizer"]["eos_token"]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tag_dir / store.TOKENIZER_FILE), eos_token=eos,
                                  bos_token=eos, pad_token=eos)
    eos_id = tok.eos_token_id   # one prompt, nothing to pad: the checkpoint's own vocabulary and ids
    model = AutoModelForCausalLM.from_config(hf_config(m, SpecialIds(eos_id, eos_id, eos_id, m.vocab_size),
                                                       torch.float32))
    weights = read_weights(tag_dir, state, m)
    tensors = hf_tensors(m, weights)
    read = hf_reader(m, tensors, weights.__getitem__)
    model.load_state_dict(to_in_memory({hf: read(hf) for hf in tensors}, m.moe.experts if m.moe else 0))
    log.info("loaded checkpoint %s (step %d)", tag_dir, state.step)
    return model.eval(), tok
