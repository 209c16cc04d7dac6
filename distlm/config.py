"""Typed schema of the composed Hydra config.

conf/ holds every default; the dataclasses here only say what each key is. `load_config` merges the
composed config onto the schema (wrong types and unknown keys fail there, naming the key) and resolves
paths to absolute; distlm/validation.py checks the values that depend on each other.
"""

from __future__ import annotations

import json
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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says why. (Here, not in distlm/train, so
    that the CLI can catch it without importing torch.)"""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"  # bf16 on GPUs, fp32 on CPU: `load_config` replaces it with one of the two


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
class RopeScaling:
    """Llama 3's RoPE frequency scaling for contexts longer than the model was first trained at (HF rope_type
    'llama3'): wavelengths above original_max_seq_len / low_freq_factor are stretched by `factor`, those below
    original_max_seq_len / high_freq_factor kept, the band between interpolated."""
    factor: float = MISSING
    low_freq_factor: float = MISSING
    high_freq_factor: float = MISSING
    original_max_seq_len: int = MISSING


def describe_layout(tp: int, pp: int, cp: int, dp: int) -> str:
    """"tp 2 x pp 2 x dp 4", with "x cp N" only where context parallelism is used (logs, metrics, plans)."""
    return f"tp {tp} x pp {pp}{f' x cp {cp}' if cp > 1 else ''} x dp {dp}"


@dataclass
class MoeConfig:
    """Sparse blocks: each token's SwiGLU MLP is the weighted sum of `top_k` of `experts` experts that a router
    picks (docs/parallelism.md, mixture of experts)."""
    experts: int = MISSING
    top_k: int = MISSING
    expert_ffn_dim: int = MISSING
    every: int = MISSING             # layer i is sparse when (i + 1) % every == 0 (1: every layer, as Mixtral)
    aux_loss_weight: float = MISSING  # load balancing (Switch Transformer's loss)
    z_loss_weight: float = MISSING    # router z-loss (ST-MoE): keeps the router's logits small

    def is_sparse(self, layer: int) -> bool:
        return (layer + 1) % self.every == 0


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
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = MISSING
    tie_embeddings: bool = MISSING
    init_std: float = MISSING
    moe: Optional[MoeConfig] = None  # None: every block dense

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "ModelConfig":
        """The model config a checkpoint saved (to_dict's form; written before rope_scaling and moe existed, too)."""
        scaling, moe = saved.get("rope_scaling"), saved.get("moe")
        return cls(**{**saved, "rope_scaling": RopeScaling(**scaling) if scaling else None,
                      "moe": MoeConfig(**moe) if moe else None})


@dataclass
class TokenizerConfig:
    path: Optional[str] = MISSING
    vocab_size: int = MISSING
    eos_token: str = MISSING
    bos_token: Optional[str] = MISSING
    pad_token: Optional[str] = MISSING
    train_docs: int = MISSING


@dataclass
class PiiConfig:
    enabled: bool = MISSING
    kinds: list[str] = MISSING
    placeholders: dict[str, str] = MISSING
    patterns: dict[str, str] = MISSING


@dataclass
class MixSource:
    name: str = MISSING      # names the source in metrics (tokens_seen/NAME, val_loss/NAME) and errors
    dir: str = MISSING       # a preprocessed data directory (its manifest.json)
    weight: float = MISSING  # share of training samples drawn from it (weights are normalized)


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
    pii: PiiConfig = field(default_factory=PiiConfig)
    mix: Optional[list[MixSource]] = MISSING


class PipelinePartition(str, Enum):
    blocks = "blocks"          # the same number of transformer blocks per stage
    parameters = "parameters"  # balance parameter counts (embedding and head weigh in)
    uniform = "uniform"        # the same number of pipeline layers (embedding and head count as layers)


@dataclass
class ParallelConfig:
    tp: int = MISSING
    pp: int = MISSING
    cp: int = MISSING
    zero_stage: int = MISSING
    offload_optimizer: bool = MISSING
    offload_params: bool = MISSING
    pipeline_partition: PipelinePartition = MISSING
    activation_checkpoint_interval: int = MISSING
    # ZeRO's buffers, in blocks' worth of a rank's parameters (engine.zero_config turns them into elements)
    reduce_bucket_blocks: float = MISSING
    zero3_prefetch_blocks: float = MISSING
    zero3_max_live_blocks: float = MISSING
    zero3_reuse_distance_blocks: float = MISSING
    zero3_sub_group_blocks: float = MISSING


@dataclass
class ClusterConfig:
    address: Optional[str] = MISSING
    num_workers: int = MISSING
    use_gpu: bool = MISSING
    cpus_per_worker: int = MISSING
    max_failures: int = MISSING
    min_workers: Optional[int] = MISSING
    elastic_check_seconds: float = MISSING
    start_timeout_seconds: float = MISSING
    replace_wait_seconds: float = MISSING
    node_probe_seconds: float = MISSING
    workers_per_node: Optional[int] = MISSING
    submit_env: list[str] = MISSING
    forward_env: list[str] = MISSING
    gpu_mem_gb: float = MISSING
    host_mem_gb: Optional[float] = MISSING
    host_overhead_gb: float = MISSING
    malloc_mmap_threshold_kb: Optional[int] = MISSING
    plan_headroom: float = MISSING


class OptimizerType(str, Enum):
    AdamW = "AdamW"
    Adam = "Adam"


class WarmupType(str, Enum):
    linear = "linear"
    log = "log"


@dataclass
class OptimizerConfig:
    type: OptimizerType = MISSING
    fused: bool = MISSING
    lr: float = MISSING
    min_lr: float = MISSING
    warmup_steps: int = MISSING
    warmup_type: WarmupType = MISSING
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
    compile: bool = MISSING
    tf32: bool = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    eval_batches: int = MISSING
    checkpoint_every: int = MISSING
    checkpoint_minutes: Optional[float] = MISSING
    keep_checkpoints: int = MISSING
    keep_every: Optional[int] = MISSING
    async_checkpoint: bool = MISSING
    checkpoint_mirror: Optional[str] = MISSING
    resume: str = MISSING
    stop_grace_seconds: float = MISSING
    skip_spike_factor: Optional[float] = MISSING
    spike_window: int = MISSING
    spike_min_history: int = MISSING
    max_skipped_in_a_row: int = MISSING
    doc_masking: bool = MISSING
    doc_positions: bool = MISSING


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
    notes: Optional[str] = MISSING
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
    def data_parallel_size(self) -> int:  # world = tp x pp x cp x dp
        par = self.parallel
        return self.cluster.num_workers // (par.tp * par.pp * par.cp)

    @property
    def global_batch_size(self) -> int:
        return self.trainer.micro_batch_size * self.trainer.grad_accum * self.data_parallel_size


def data_vocab_size(data_dir: str, tokenizer_path: Optional[str], trained_size: int) -> int:
    """model.vocab_size's default in conf/model/*.yaml: the data's own tokenizer. That of the preprocessed
    data.dir (its manifest.json), else that of a given data.tokenizer.path, else the size a trained tokenizer
    is asked for (data.tokenizer.vocab_size)."""
    try:
        return int(json.loads((Path(data_dir).expanduser() / "manifest.json").read_text())["tokenizer"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not preprocessed yet (or unreadable: `distlm train` names that problem itself)
    if tokenizer_path:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(Path(tokenizer_path).expanduser())).get_vocab_size(with_added_tokens=True)
        except Exception:  # a missing or broken file: preprocessing's validation names it
            pass
    return trained_size


if not OmegaConf.has_resolver("data_vocab_size"):
    OmegaConf.register_new_resolver("data_vocab_size", data_vocab_size)


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
    if config.trainer.precision == Precision.auto:
        config.trainer.precision = Precision.bf16 if config.cluster.use_gpu else Precision.fp32
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
    if "://" in path:
        return path  # an fsspec URL is left as given
    return str(Path(path).expanduser().resolve())


def _resolve_paths(c: Config) -> None:
    # Ray workers run in their own working directory: every path they see must be absolute.
    c.run_dir = _absolute(c.run_dir)
    c.data.dir = _absolute(c.data.dir)
    for source in c.data.mix or []:
        source.dir = _absolute(source.dir)
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


def raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
