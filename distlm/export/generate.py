"""Sample text from a local Hugging Face Llama directory (a distlm export, or any other) with transformers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from distlm.config import Config

log = logging.getLogger(__name__)


def generate(c: Config) -> str:
    """Continue `c.generate.prompt` with the model in `c.generate.model_dir`; print prompt + continuation
    and return the continuation. Temperature 0 means greedy decoding."""
    g = c.generate
    model_dir = Path(g.model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"generate.model_dir {model_dir} is not a Hugging Face model directory (no "
                                f"config.json); run `distlm export` first or point generate.model_dir at one")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
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
