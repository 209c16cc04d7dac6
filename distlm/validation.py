"""The checks of a composed config that run before any work starts: each returns a list of problems, each
naming the key and what would be valid (`config.raise_if` turns them into one ConfigError).

config.py says what each key is; this module says which values work together: the model's shape, the
preprocessing keys, a training run's layout against the world size and DeepSpeed's rules, the cluster's
placement, monitoring and worker range, export and eval."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Optional

from distlm.config import WANDB_ENV_MODES, Config, DataConfig, ModelConfig, Precision, WandbMode


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def validate_model(m: ModelConfig) -> list[str]:
    p: list[str] = []
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len"):
        _check(p, getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    if p:
        return p
    _check(p, m.dim % m.n_heads == 0,
           f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads} (the head size is dim / n_heads)")
    _check(p, m.n_heads % m.n_kv_heads == 0,
           f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads} "
           f"(valid n_kv_heads: {[d for d in range(1, m.n_heads + 1) if m.n_heads % d == 0]})")
    _check(p, m.head_dim % 2 == 0, f"head size model.dim / model.n_heads = {m.head_dim} must be even for RoPE")
    if m.moe:
        e = m.moe
        _check(p, e.experts >= 1 and e.expert_ffn_dim >= 1 and e.every >= 1,
               f"model.moe.experts={e.experts}, expert_ffn_dim={e.expert_ffn_dim} and every={e.every} must be positive")
        _check(p, 1 <= e.top_k <= e.experts,
               f"model.moe.top_k={e.top_k} must be between 1 and model.moe.experts={e.experts}; e.g. top_k="
               f"{min(2, max(e.experts, 1))}")
        _check(p, e.aux_loss_weight >= 0 and e.z_loss_weight >= 0,
               f"model.moe.aux_loss_weight={e.aux_loss_weight} and z_loss_weight={e.z_loss_weight} must be >= 0")
    return p


def validate_preprocess(c: Config) -> list[str]:
    d, t = c.data, c.data.tokenizer
    p: list[str] = []
    _check(p, len(d.inputs) > 0, "data.inputs is empty: give at least one file, glob or fsspec URL")
    for pattern in d.inputs:
        if "://" not in pattern and not glob.glob(pattern):
            p.append(f"data.inputs: no file matches '{pattern}'")
    _check(p, "://" not in d.dir, f"data.dir={d.dir}: preprocessing writes to a local (or mounted) directory")
    _check(p, d.txt_document in ("file", "paragraph", "line"),
           f"data.txt_document={d.txt_document!r} must be file, paragraph or line")
    _check(p, d.unicode_form in (None, "NFC", "NFKC", "NFD", "NFKD"),
           f"data.unicode_form={d.unicode_form!r} must be NFC, NFKC, NFD, NFKD or null")
    _check(p, d.seq_len > 0, f"data.seq_len={d.seq_len} must be positive")
    _check(p, 0.0 <= d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    _check(p, 0 <= d.min_chars <= d.max_chars, f"need 0 <= data.min_chars <= data.max_chars, got {d.min_chars}, {d.max_chars}")
    _check(p, 0.0 <= d.min_alpha_fraction <= 1.0, f"data.min_alpha_fraction={d.min_alpha_fraction} must be in [0, 1]")
    _check(p, 0.0 <= d.max_repeated_line_fraction <= 1.0,
           f"data.max_repeated_line_fraction={d.max_repeated_line_fraction} must be in [0, 1]")
    _check(p, d.near_dup_threshold is None or 0.0 < d.near_dup_threshold <= 1.0,
           f"data.near_dup_threshold={d.near_dup_threshold} must be in (0, 1], or null to skip near-duplicate removal")
    _check(p, d.minhash_perms >= 16 and d.minhash_perms & (d.minhash_perms - 1) == 0,
           f"data.minhash_perms={d.minhash_perms} must be a power of two >= 16")
    _check(p, d.minhash_ngram > 0, f"data.minhash_ngram={d.minhash_ngram} must be positive")
    _check(p, d.samples_per_shard is None or d.samples_per_shard > 0,
           f"data.samples_per_shard={d.samples_per_shard} must be positive, or null to size shards by data.shard_mb")
    _check(p, d.shard_mb > 0, f"data.shard_mb={d.shard_mb} must be positive")
    _check(p, d.tokenize_task_mb > 0, f"data.tokenize_task_mb={d.tokenize_task_mb} must be positive")
    if t.path:
        _check(p, Path(t.path).is_file(), f"data.tokenizer.path: no file '{t.path}'")
    else:
        _check(p, t.vocab_size >= 260,
               f"data.tokenizer.vocab_size={t.vocab_size} must be at least 260 (256 bytes + special tokens)")
        _check(p, t.train_docs > 0, f"data.tokenizer.train_docs={t.train_docs} must be positive")
    specials = [x for x in (t.eos_token, t.bos_token, t.pad_token) if x is not None]
    _check(p, len(set(specials)) == len(specials) and all(specials),
           f"data.tokenizer: eos_token, bos_token and pad_token must be distinct non-empty strings (or null for "
           f"bos/pad), got {specials}")
    return p


def validate_train(c: Config) -> list[str]:
    t, cl, o = c.trainer, c.cluster, c.optimizer
    p = validate_model(c.model)
    manifest = Path(c.data.dir) / "manifest.json"
    _check(p, bool(c.data.mix) or manifest.is_file(),
           f"data.dir: no preprocessed data at '{c.data.dir}' (missing manifest.json); run `distlm preprocess` first "
           f"or point data.dir at a preprocessed dataset")
    p += validate_mix(c.data)
    _check(p, not (c.data.shard_url or "").startswith("pipe:"),
           f"data.shard_url={c.data.shard_url!r}: a pipe: command streams whole shards, but each rank reads only its "
           f"own samples at their offsets; give a path or fsspec URL template, e.g. s3://bucket/set/{{name}}")
    _check(p, c.model.max_seq_len >= c.data.seq_len,
           f"model.max_seq_len={c.model.max_seq_len} is shorter than data.seq_len={c.data.seq_len}")
    _check(p, cl.num_workers > 0, f"cluster.num_workers={cl.num_workers} must be positive")
    _check(p, cl.cpus_per_worker > 0, f"cluster.cpus_per_worker={cl.cpus_per_worker} must be positive")
    p += validate_layout(c)
    p += validate_cluster(c)
    for key in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "eval_every", "eval_batches",
                "checkpoint_every", "keep_checkpoints"):
        _check(p, getattr(t, key) > 0, f"trainer.{key}={getattr(t, key)} must be positive")
    if t.stop_at_step is not None:
        _check(p, 0 < t.stop_at_step <= t.max_steps,
               f"trainer.stop_at_step={t.stop_at_step} must be in [1, trainer.max_steps={t.max_steps}]")
    for key in ("checkpoint_minutes", "keep_every"):
        _check(p, getattr(t, key) is None or getattr(t, key) > 0,
               f"trainer.{key}={getattr(t, key)} must be positive, or null for none")
    _check(p, t.stop_grace_seconds > 0, f"trainer.stop_grace_seconds={t.stop_grace_seconds} must be positive")
    _check(p, t.skip_spike_factor is None or t.skip_spike_factor > 1,
           f"trainer.skip_spike_factor={t.skip_spike_factor} must be above 1 (a multiple of the recent mean loss), "
           f"or null to skip only NaN/inf losses")
    _check(p, 0 < t.spike_min_history <= t.spike_window,
           f"need 0 < trainer.spike_min_history <= trainer.spike_window, got {t.spike_min_history}, {t.spike_window}")
    _check(p, t.max_skipped_in_a_row >= 0, f"trainer.max_skipped_in_a_row={t.max_skipped_in_a_row} must be >= 0")
    if t.checkpoint_mirror is not None:
        _check(p, _filesystem_known(t.checkpoint_mirror),
               f"trainer.checkpoint_mirror={t.checkpoint_mirror!r}: fsspec knows no installed filesystem for it; give a "
               f"URL such as s3://bucket/run (with s3fs installed), gs://..., or file:///path")
    _check(p, t.resume in ("auto", "never") or Path(t.resume).exists(),
           f"trainer.resume='{t.resume}': use auto, never, or an existing checkpoint directory")
    _check(p, 0 < o.min_lr <= o.lr, f"need 0 < optimizer.min_lr <= optimizer.lr, got {o.min_lr}, {o.lr}")
    _check(p, 0 <= o.warmup_steps < t.max_steps,
           f"optimizer.warmup_steps={o.warmup_steps} must be below trainer.max_steps={t.max_steps}")
    return p


def _filesystem_known(url: str) -> bool:
    """fsspec has an installed filesystem for the URL's protocol (no connection is made)."""
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        fsspec.get_filesystem_class(protocol)
        return True
    except (ImportError, ValueError):
        return False


def validate_mix(d: DataConfig) -> list[str]:
    """data.mix: distinct names, positive weights, a preprocessed dataset with training samples in every dir,
    and one tokenization for all: the first source's tokenizer (sha256) and seq_len."""
    from distlm.data.shards import Manifest

    p: list[str] = []
    names = [source.name for source in d.mix or []]
    _check(p, len(set(names)) == len(names), f"data.mix: source names must be distinct, got {names}")
    manifests = {}
    for i, source in enumerate(d.mix or []):
        _check(p, bool(source.name) and "/" not in source.name,
               f"data.mix[{i}].name={source.name!r} must be a non-empty name without '/'")
        _check(p, source.weight > 0, f"data.mix[{i}] ({source.name}): weight={source.weight} must be positive")
        if not (Path(source.dir) / "manifest.json").is_file():
            p.append(f"data.mix[{i}] ({source.name}): no preprocessed data at '{source.dir}' (missing manifest.json); "
                     f"run `distlm preprocess` with data.dir={source.dir} first")
            continue
        try:
            manifests[i] = Manifest.load(source.dir)
        except ValueError as e:  # a manifest from an older distlm, or unreadable
            p.append(f"data.mix source {source.name}: {e}")
            continue
        _check(p, manifests[i].num_samples("train") > 0,
               f"data.mix source {source.name} ({source.dir}) has no training samples")
    if p or not manifests:
        return p
    first, first_manifest = d.mix[0], manifests[0]
    for i, manifest in manifests.items():
        source = d.mix[i]
        _check(p, manifest.tokenizer_sha256 == first_manifest.tokenizer_sha256,
               f"data.mix sources {first.name} ({first.dir}) and {source.name} ({source.dir}) were tokenized "
               f"differently (tokenizer {first_manifest.tokenizer_sha256[:12]} vs {manifest.tokenizer_sha256[:12]}): "
               f"preprocess both with the same data.tokenizer.path")
        _check(p, manifest.seq_len == first_manifest.seq_len,
               f"data.mix sources {first.name} ({first.dir}) and {source.name} ({source.dir}) hold samples of seq_len "
               f"{first_manifest.seq_len} and {manifest.seq_len}: preprocess both with the same data.seq_len")
    return p


def validate_layout(c: Config) -> list[str]:
    """The parallel layout against the world size, the model and DeepSpeed's rules."""
    par, m, world = c.parallel, c.model, c.cluster.num_workers
    p: list[str] = []
    for key in ("tp", "pp", "cp"):
        _check(p, getattr(par, key) >= 1, f"parallel.{key}={getattr(par, key)} must be at least 1")
    if p:
        return p
    tp, pp, cp = par.tp, par.pp, par.cp
    replica = tp * pp * cp
    _check(p, world % replica == 0,
           f"cluster.num_workers={world} (the world size) must be a multiple of parallel.tp * parallel.pp * parallel.cp "
           f"= {replica}: world = tp x pp x cp x data-parallel; e.g. cluster.num_workers="
           f"{replica * max(1, world // replica)}")
    _check(p, m.n_heads % tp == 0 and m.n_kv_heads % tp == 0,
           f"parallel.tp={tp} must divide model.n_heads={m.n_heads} and model.n_kv_heads={m.n_kv_heads} "
           f"(each rank holds whole heads); valid tp: "
           f"{[d for d in range(1, m.n_kv_heads + 1) if m.n_heads % d == 0 and m.n_kv_heads % d == 0]}")
    if m.moe and m.moe.experts >= 1:  # experts are split over the TP group (expert parallelism): whole experts per
        e, ffn = m.moe.experts, m.moe.expert_ffn_dim  # rank, or an equal part of each expert's hidden units
        valid = [d for d in range(1, 2 * e + 1) if e % d == 0 or (d % e == 0 and ffn % (d // e) == 0)]
        _check(p, e % tp == 0 or (tp % e == 0 and ffn % (tp // e) == 0),
               f"parallel.tp={tp} (= expert parallelism) must divide model.moe.experts={e}, or be a multiple of it "
               f"that divides each expert's model.moe.expert_ffn_dim={ffn}; valid tp for the experts: {valid}")
    if cp > 1:  # attention splits heads by tp, then by cp; each rank holds an equal slice of every sequence
        heads = m.n_heads // tp if m.n_heads % tp == 0 else 0
        valid = [d for d in range(1, heads + 1) if heads % d == 0 and c.data.seq_len % d == 0]
        _check(p, heads % cp == 0 and c.data.seq_len % cp == 0,
               f"parallel.cp={cp} must divide the query heads of a tensor-parallel rank (model.n_heads / parallel.tp "
               f"= {m.n_heads}/{tp}) and data.seq_len={c.data.seq_len}; valid cp: {valid}")
    _check(p, m.n_layers >= pp, f"parallel.pp={pp} is more pipeline stages than model.n_layers={m.n_layers}")
    _check(p, par.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={par.zero_stage} must be 0, 1, 2 or 3")
    _check(p, pp == 1 or par.zero_stage <= 1,
           f"parallel.zero_stage={par.zero_stage} with parallel.pp={pp}: DeepSpeed's pipeline engine supports "
           f"ZeRO stages 0 and 1 only; set parallel.zero_stage=1")
    _check(p, pp == 1 or c.trainer.precision != Precision.bf16 or par.zero_stage == 1,
           "bf16 pipelines need parallel.zero_stage=1 (DeepSpeed cannot reload a ZeRO-0 bf16 pipeline checkpoint)")
    _check(p, tp == 1 or par.zero_stage <= 2,
           f"parallel.zero_stage=3 with parallel.tp={tp} is not supported; use zero_stage<=2 with tensor parallelism")
    _check(p, not par.offload_optimizer or par.zero_stage >= 1,
           "parallel.offload_optimizer=true needs parallel.zero_stage >= 1")
    _check(p, not par.offload_params or par.zero_stage == 3, "parallel.offload_params=true needs parallel.zero_stage=3")
    _check(p, par.activation_checkpoint_interval >= 0,
           f"parallel.activation_checkpoint_interval={par.activation_checkpoint_interval} must be >= 0 (0 = off)")
    for key in ("reduce_bucket_blocks", "zero3_sub_group_blocks"):
        _check(p, getattr(par, key) > 0, f"parallel.{key}={getattr(par, key)} must be positive (blocks' worth of "
                                         f"parameters, e.g. 0.5 or 2)")
    for key in ("zero3_prefetch_blocks", "zero3_max_live_blocks", "zero3_reuse_distance_blocks"):
        _check(p, getattr(par, key) >= 0, f"parallel.{key}={getattr(par, key)} must be >= 0 (blocks' worth of "
                                          f"parameters; 0 = none)")
    return p


def node_placement_problems(num_workers: int, tp: int, workers_per_node: Optional[int]) -> list[str]:
    """Can every tensor-parallel group (tp consecutive ranks) live inside one node?

    Ray Train numbers ranks node by node, so the groups never straddle a node boundary exactly when the
    workers on every node are a multiple of tp; with PACK placement on free nodes that holds when
    workers_per_node is (the last, partial node then holds num_workers mod workers_per_node, also a multiple
    of tp since tp divides num_workers). None means one machine: nothing to check."""
    if workers_per_node is None:
        return []
    if workers_per_node < 1:
        return [f"cluster.workers_per_node={workers_per_node} must be positive, or null for a single machine"]
    if tp > workers_per_node:
        return [f"parallel.tp={tp} is more than cluster.workers_per_node={workers_per_node}: a tensor-parallel "
                f"group must fit in one node (its all-reduces need NVLink); use parallel.tp<={workers_per_node} "
                f"and parallel.pp to span nodes"]
    if workers_per_node % tp:
        valid = [d for d in range(1, workers_per_node + 1) if workers_per_node % d == 0]
        return [f"cluster.workers_per_node={workers_per_node} is not a multiple of parallel.tp={tp}: tensor-parallel "
                f"groups of consecutive ranks would straddle two nodes; valid parallel.tp: {valid}"]
    return []


def validate_cluster(c: Config) -> list[str]:
    """Cluster placement and monitoring keys (the parts `distlm submit` can check before anything ships)."""
    cl, lg = c.cluster, c.logger
    p = node_placement_problems(cl.num_workers, c.parallel.tp, cl.workers_per_node)
    for key, names in (("submit_env", cl.submit_env), ("forward_env", cl.forward_env)):
        bad_names = [name for name in names if not name.isidentifier()]
        _check(p, not bad_names, f"cluster.{key}: {bad_names} are not environment variable names")
    _check(p, cl.max_failures >= 0, f"cluster.max_failures={cl.max_failures} must be >= 0")
    _check(p, cl.gpu_mem_gb > 0, f"cluster.gpu_mem_gb={cl.gpu_mem_gb} must be positive")
    _check(p, cl.host_mem_gb is None or cl.host_mem_gb > 0,
           f"cluster.host_mem_gb={cl.host_mem_gb} must be positive, or null for this machine's memory")
    _check(p, cl.host_overhead_gb >= 0, f"cluster.host_overhead_gb={cl.host_overhead_gb} must be >= 0")
    _check(p, cl.malloc_mmap_threshold_kb is None or 0 < cl.malloc_mmap_threshold_kb <= 32768,
           f"cluster.malloc_mmap_threshold_kb={cl.malloc_mmap_threshold_kb} must be in [1, 32768] (glibc's limit is "
           f"32 MiB), or null for glibc's adaptive threshold")
    _check(p, 0 < cl.plan_headroom <= 1, f"cluster.plan_headroom={cl.plan_headroom} must be in (0, 1]")
    _check(p, cl.start_timeout_seconds > 0,
           f"cluster.start_timeout_seconds={cl.start_timeout_seconds} must be positive (a start that never ends holds "
           f"the run)")
    _check(p, cl.replace_wait_seconds >= 0,
           f"cluster.replace_wait_seconds={cl.replace_wait_seconds} must be >= 0 (0 on a cluster that does not autoscale)")
    _check(p, cl.node_probe_seconds > 0, f"cluster.node_probe_seconds={cl.node_probe_seconds} must be positive")
    p += elastic_problems(c)
    _check(p, lg.samples >= 0, f"logger.samples={lg.samples} must be >= 0 (0 = no generated samples)")
    _check(p, lg.sample_tokens > 0, f"logger.sample_tokens={lg.sample_tokens} must be positive")
    _check(p, lg.sample_prompt_tokens > 0, f"logger.sample_prompt_tokens={lg.sample_prompt_tokens} must be positive")
    env_mode = os.environ.get("WANDB_MODE")
    _check(p, not (lg.wandb and lg.mode != WandbMode.disabled and env_mode == ""),
           "WANDB_MODE is set but empty in the environment: W&B refuses an empty mode, whatever logger.mode says; "
           f"unset it or set one of {', '.join(WANDB_ENV_MODES)}")
    _check(p, not (lg.wandb and lg.mode == WandbMode.auto and env_mode and env_mode not in WANDB_ENV_MODES),
           f"WANDB_MODE={env_mode!r} in the environment (logger.mode=auto follows it): use one of "
           f"{', '.join(WANDB_ENV_MODES)}, or unset it")
    _check(p, lg.init_timeout > 0 and lg.finish_timeout > 0,
           f"logger.init_timeout={lg.init_timeout} and logger.finish_timeout={lg.finish_timeout} must be positive "
           f"(seconds)")
    _check(p, lg.peak_tflops is None or lg.peak_tflops > 0,
           f"logger.peak_tflops={lg.peak_tflops} must be positive, or null to look the GPU up")
    return p


def validate_export(c: Config) -> list[str]:
    p: list[str] = []
    _check(p, c.export.max_shard_mb > 0, f"export.max_shard_mb={c.export.max_shard_mb} must be positive")
    return p


def validate_eval(c: Config) -> list[str]:
    e = c.eval
    p: list[str] = []
    _check(p, e.batch_size > 0 and (e.batches is None or e.batches > 0),
           f"eval.batch_size={e.batch_size} must be positive and eval.batches={e.batches} positive or null (the "
           f"whole split)")
    return p


def model_reads_data(vocab_size: int, max_seq_len: int, data_vocab_size: int, data_seq_len: int,
                     where: str) -> list[str]:
    """Whether a model (at `where`) has the embeddings and positions for a dataset's token ids and inputs."""
    if data_vocab_size > vocab_size or data_seq_len > max_seq_len:
        return [f"{where}: {vocab_size} embeddings and {max_seq_len} positions cannot read the shards in data.dir "
                f"({data_vocab_size} token ids, {data_seq_len}-token inputs)"]
    return []


def data_parallel_for(c: Config, workers: int) -> Optional[int]:
    """The largest data-parallel size that `workers` workers hold at the configured tp x pp x cp while keeping the
    global batch (more gradient accumulation makes up for fewer replicas; dp 1 always can); None if the
    workers do not hold one model replica."""
    model_parallel = c.parallel.tp * c.parallel.pp * c.parallel.cp
    for dp in range(workers // model_parallel, 0, -1):
        if c.global_batch_size % (dp * c.trainer.micro_batch_size) == 0:
            return dp
    return None


def elastic_problems(c: Config) -> list[str]:
    """A worker range [cluster.min_workers, cluster.num_workers]: every count in it must hold a model replica."""
    cl, mp = c.cluster, c.parallel.tp * c.parallel.pp * c.parallel.cp
    if cl.min_workers is None:
        return []
    p: list[str] = []
    _check(p, cl.elastic_check_seconds > 0, f"cluster.elastic_check_seconds={cl.elastic_check_seconds} must be positive")
    _check(p, mp <= cl.min_workers <= cl.num_workers,
           f"cluster.min_workers={cl.min_workers} must be in [parallel.tp x parallel.pp"
           f"{' x parallel.cp' if c.parallel.cp > 1 else ''} = {mp}, cluster.num_workers={cl.num_workers}]: one model "
           f"replica needs {mp} workers (or null for a fixed size)")
    return p


