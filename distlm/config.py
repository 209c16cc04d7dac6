"""Typed schema of the composed Hydra config, and the checks that run before any worker starts.

conf/ holds every default; the dataclasses here only say what each key is. `load_config` merges the
composed config onto the schema (wrong types and unknown keys fail there, naming the key), resolves
paths to absolute, and `validate` checks the values that depend on each other.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(os.environ.get("DISTLM_CONF", Path(__file__).resolve().parents[1] / "conf"))


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what would be valid."""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class ExportDtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class WandbMode(str, Enum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


WANDB_ENV_MODES = ("online", "offline", "disabled")  # the WANDB_MODE values logger.mode=auto follows


@dataclass
class ModelConfig:
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: int = MISSING
    ffn_dim: int = MISSING
    vocab_size: int = MISSING
    max_seq_len: int = MISSING
    rope_theta: float = MISSING
    norm_eps: float = MISSING
    tie_embeddings: bool = MISSING
    init_std: float = MISSING

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class TokenizerConfig:
    path: Optional[str] = MISSING
    vocab_size: int = MISSING
    eos_token: str = MISSING
    bos_token: Optional[str] = MISSING
    pad_token: Optional[str] = MISSING
    train_docs: int = MISSING


@dataclass
class DataConfig:
    inputs: list[str] = MISSING
    text_field: str = MISSING
    txt_document: str = MISSING
    dir: str = MISSING
    seq_len: int = MISSING
    val_fraction: float = MISSING
    mix_seed: int = MISSING
    tokenize_task_mb: float = MISSING
    unicode_form: Optional[str] = MISSING
    min_chars: int = MISSING
    max_chars: int = MISSING
    min_alpha_fraction: float = MISSING
    max_repeated_line_fraction: float = MISSING
    dedup_exact: bool = MISSING
    near_dup_threshold: Optional[float] = MISSING
    minhash_perms: int = MISSING
    minhash_ngram: int = MISSING
    keep_doc_boundaries: bool = MISSING
    samples_per_shard: Optional[int] = MISSING
    shard_mb: float = MISSING
    shuffle_window: int = MISSING
    loader_workers: int = MISSING
    shard_url: Optional[str] = MISSING
    verify_shards: bool = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


class PipelinePartition(str, Enum):
    blocks = "blocks"          # the same number of transformer blocks per stage
    parameters = "parameters"  # balance parameter counts (embedding and head weigh in)
    uniform = "uniform"        # the same number of pipeline layers (embedding and head count as layers)


@dataclass
class ParallelConfig:
    tp: int = MISSING
    pp: int = MISSING
    zero_stage: int = MISSING
    offload_optimizer: bool = MISSING
    offload_params: bool = MISSING
    pipeline_partition: PipelinePartition = MISSING
    activation_checkpoint_interval: int = MISSING


@dataclass
class ClusterConfig:
    address: Optional[str] = MISSING
    num_workers: int = MISSING
    use_gpu: bool = MISSING
    cpus_per_worker: int = MISSING
    max_failures: int = MISSING
    workers_per_node: Optional[int] = MISSING
    submit_env: list[str] = MISSING
    forward_env: list[str] = MISSING
    gpu_mem_gb: float = MISSING
    host_mem_gb: Optional[float] = MISSING
    host_overhead_gb: float = MISSING
    plan_headroom: float = MISSING


@dataclass
class OptimizerConfig:
    lr: float = MISSING
    min_lr: float = MISSING
    warmup_steps: int = MISSING
    weight_decay: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING
    eps: float = MISSING
    grad_clip: float = MISSING


@dataclass
class TrainerConfig:
    max_steps: int = MISSING
    stop_at_step: Optional[int] = MISSING
    micro_batch_size: int = MISSING
    grad_accum: int = MISSING
    precision: Precision = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_batches: int = MISSING
    checkpoint_every: int = MISSING
    checkpoint_minutes: Optional[float] = MISSING
    keep_checkpoints: int = MISSING
    keep_every: Optional[int] = MISSING
    resume: str = MISSING
    stop_grace_seconds: float = MISSING
    skip_spike_factor: Optional[float] = MISSING
    max_skipped_in_a_row: int = MISSING


@dataclass
class LoggerConfig:
    wandb: bool = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: WandbMode = MISSING
    init_timeout: float = MISSING
    finish_timeout: float = MISSING
    name: Optional[str] = MISSING
    group: Optional[str] = MISSING
    tags: list[str] = MISSING
    samples: int = MISSING
    sample_tokens: int = MISSING
    sample_prompt_tokens: int = MISSING
    peak_tflops: Optional[float] = MISSING


@dataclass
class ExportConfig:
    checkpoint_dir: str = MISSING
    tag: Optional[str] = MISSING
    out_dir: str = MISSING
    dtype: ExportDtype = MISSING
    verify: bool = MISSING
    max_shard_mb: float = MISSING


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    model_dir: Optional[str] = MISSING
    split: str = MISSING
    batch_size: int = MISSING
    batches: Optional[int] = MISSING
    out: str = MISSING


@dataclass
class GenerateConfig:
    model_dir: str = MISSING
    prompt: str = MISSING
    max_new_tokens: int = MISSING
    temperature: float = MISSING
    top_k: int = MISSING
    top_p: float = MISSING
    seed: int = MISSING


@dataclass
class Config:
    run_name: str = MISSING
    run_dir: str = MISSING
    seed: int = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def data_parallel_size(self) -> int:  # world = tp x pp x dp
        return self.cluster.num_workers // (self.parallel.tp * self.parallel.pp)

    @property
    def global_batch_size(self) -> int:
        return self.trainer.micro_batch_size * self.trainer.grad_accum * self.data_parallel_size


def load_config(cfg: DictConfig | dict) -> Config:
    """The composed config as a typed `Config`, with paths made absolute. Raises ConfigError."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        config: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config key '{e.full_key}': {e.msg}") from None
    _resolve_paths(config)
    return config


def compose_config(*overrides: str) -> Config:
    """Compose conf/ with Hydra overrides outside a `distlm` command (tools, tests, notebooks)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return load_config(compose("config", overrides=list(overrides)))


def to_dict(config: Config) -> dict[str, Any]:
    """Plain, JSON-able form of a Config (enums as their values), for checkpoints and logs."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True, enum_to_str=True)


def _absolute(path: str) -> str:
    if "://" in path or path.startswith("pipe:"):
        return path  # an fsspec URL or a webdataset pipe is left as given
    return str(Path(path).expanduser().resolve())


def _resolve_paths(c: Config) -> None:
    # Ray workers run in their own working directory: every path they see must be absolute.
    c.run_dir = _absolute(c.run_dir)
    c.data.dir = _absolute(c.data.dir)
    c.data.inputs = [_absolute(p) for p in c.data.inputs]
    if c.data.tokenizer.path:
        c.data.tokenizer.path = _absolute(c.data.tokenizer.path)
    c.export.checkpoint_dir = _absolute(c.export.checkpoint_dir)
    c.export.out_dir = _absolute(c.export.out_dir)
    c.generate.model_dir = _absolute(c.generate.model_dir)
    c.eval.checkpoint = _absolute(c.eval.checkpoint)
    if c.eval.model_dir:
        c.eval.model_dir = _absolute(c.eval.model_dir)
    c.eval.out = _absolute(c.eval.out)
    if c.trainer.resume not in ("auto", "never"):
        c.trainer.resume = _absolute(c.trainer.resume)


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
    _check(p, manifest.is_file(),
           f"data.dir: no preprocessed data at '{c.data.dir}' (missing manifest.json); run `distlm preprocess` first "
           f"or point data.dir at a preprocessed dataset")
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
    _check(p, t.max_skipped_in_a_row >= 0, f"trainer.max_skipped_in_a_row={t.max_skipped_in_a_row} must be >= 0")
    _check(p, t.resume in ("auto", "never") or Path(t.resume).exists(),
           f"trainer.resume='{t.resume}': use auto, never, or an existing checkpoint directory")
    _check(p, 0 < o.min_lr <= o.lr, f"need 0 < optimizer.min_lr <= optimizer.lr, got {o.min_lr}, {o.lr}")
    _check(p, 0 <= o.warmup_steps < t.max_steps,
           f"optimizer.warmup_steps={o.warmup_steps} must be below trainer.max_steps={t.max_steps}")
    return p


def validate_layout(c: Config) -> list[str]:
    """The parallel layout against the world size, the model and DeepSpeed's rules."""
    par, m, world = c.parallel, c.model, c.cluster.num_workers
    p: list[str] = []
    for key in ("tp", "pp"):
        _check(p, getattr(par, key) >= 1, f"parallel.{key}={getattr(par, key)} must be at least 1")
    if p:
        return p
    tp, pp = par.tp, par.pp
    _check(p, world % (tp * pp) == 0,
           f"cluster.num_workers={world} (the world size) must be a multiple of parallel.tp * parallel.pp = "
           f"{tp * pp}: world = tp x pp x data-parallel; e.g. cluster.num_workers={tp * pp * max(1, world // (tp * pp))}")
    _check(p, m.n_heads % tp == 0 and m.n_kv_heads % tp == 0,
           f"parallel.tp={tp} must divide model.n_heads={m.n_heads} and model.n_kv_heads={m.n_kv_heads} "
           f"(each rank holds whole heads); valid tp: "
           f"{[d for d in range(1, m.n_kv_heads + 1) if m.n_heads % d == 0 and m.n_kv_heads % d == 0]}")
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
    _check(p, 0 < cl.plan_headroom <= 1, f"cluster.plan_headroom={cl.plan_headroom} must be in (0, 1]")
    _check(p, lg.samples >= 0, f"logger.samples={lg.samples} must be >= 0 (0 = no generated samples)")
    _check(p, lg.sample_tokens > 0, f"logger.sample_tokens={lg.sample_tokens} must be positive")
    _check(p, lg.sample_prompt_tokens > 0, f"logger.sample_prompt_tokens={lg.sample_prompt_tokens} must be positive")
    env_mode = os.environ.get("WANDB_MODE")
    _check(p, not (lg.wandb and lg.mode == WandbMode.auto and env_mode and env_mode not in WANDB_ENV_MODES),
           f"WANDB_MODE={env_mode!r} in the environment (logger.mode=auto follows it): use one of "
           f"{', '.join(WANDB_ENV_MODES)}, or unset it")
    _check(p, lg.init_timeout > 0 and lg.finish_timeout > 0,
           f"logger.init_timeout={lg.init_timeout} and logger.finish_timeout={lg.finish_timeout} must be positive "
           f"(seconds)")
    _check(p, lg.peak_tflops is None or lg.peak_tflops > 0,
           f"logger.peak_tflops={lg.peak_tflops} must be positive, or null to look the GPU up")
    return p


def raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
