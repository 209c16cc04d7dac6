"""A checkpoint's weights under one-process Llama names, read one tensor at a time.

Every reader of checkpoint weights goes through here: `distlm export` (tensor by tensor into its output
files), `distlm eval`, `distlm generate`, a run that starts from an imported model, and the import's shape
check. Where the fp32 weights of a checkpoint live depends on how it was written:

- imported (`distlm import-hf`): `model.safetensors`, one-process names;
- ZeRO 0-2 in fp32 (and ZeRO-0 in any precision): the module's weights, one file per tensor-parallel rank
  (`mp_rank_<tp>_model_states.pt`) or, in a pipeline, per layer and TP rank (`layer_<i>-model_<tp>-model_states.pt`);
  TP slices are joined by the rules the model saved in the checkpoint (`universal_checkpoint_info`) and the
  vocabulary padding is dropped, as DeepSpeed's `ds_to_universal` does;
- ZeRO-3, and bf16 ZeRO-1/2 at TP = PP = 1: the fp32 master weights in the optimizer's flat partitions, one
  file per data-parallel rank; each tensor is put together from its pieces on every rank (as DeepSpeed's
  zero_to_fp32 does; not it: its lazy mode is lazy for ZeRO-3 only, for ZeRO-1/2 it joins every rank's
  partitions into one vector, the whole model in memory);
- bf16 ZeRO-1/2 at TP or PP > 1: the checkpoint's universal form (made once), one file per parameter.

Files are opened with `torch.load(mmap=True)`: only the bytes of the tensors asked for are read. The pages
read stay mapped (and count in the RSS) until `release()`: a reader of the whole model calls it after every
few tensors, so its memory is those tensors, not the model.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from distlm.checkpoint import store, universal
from distlm.checkpoint.store import RunState
from distlm.config import CheckpointError, ModelConfig
from distlm.memory import return_freed_memory
from distlm.model.materialize import check_shapes as check_model_shapes

Loader = Callable[[Path], Any]  # a checkpoint file, loaded (memory-mapped) once until release()
Reader = Callable[[str, Loader], torch.Tensor]  # one tensor by its one-process name


def is_weights_only(tag_dir: Path) -> bool:
    """An imported checkpoint (`distlm import-hf`): weights and run state, no optimizer or layout."""
    return (Path(tag_dir) / store.WEIGHTS_FILE).is_file()


def find_checkpoint(root: Path, tag: str | None = None) -> Path:
    """The verified tag directory `root/tag`, `root` itself if it is a tag directory, or else the latest
    complete tag under `root` (a checkpoints directory)."""
    root = Path(root)
    path = root / tag if tag is not None else root
    if tag is not None and not path.is_dir():
        raise CheckpointError(f"no checkpoint {path} (complete tags in {root}: {store.complete_tags(root)})")
    if any(path.glob("*model_states.pt")) or is_weights_only(path):
        store.read_state(path)  # a tag directory whose save did not finish says so
    ckpt_dir, tag = store.resolve(path)
    return ckpt_dir / tag


def check_shapes(shapes: dict[str, torch.Size], m: ModelConfig, where: str) -> dict[str, torch.Size]:
    """materialize.check_shapes, as a CheckpointError."""
    try:
        return check_model_shapes(shapes, m, where)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def checked_weights(weights: dict[str, torch.Tensor], m: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """`weights` in Llama(m)'s order, checked as `check_shapes` does."""
    return {k: weights[k] for k in check_shapes({k: w.shape for k, w in weights.items()}, m, where)}


class CheckpointWeights:
    """The fp32 weights of one checkpoint, checked against its model config; `get(name)` reads one tensor.
    Use as a context manager (or call `release()`): files stay mapped until then."""

    def __init__(self, tag_dir: Path, state: RunState, m: ModelConfig):
        self.tag_dir, self.model = Path(tag_dir), m
        self._files: dict[Path, Any] = {}
        found, self._read, self.source = self._guard(lambda: _source(self.tag_dir, state, self._load))
        self.release()
        self.shapes = check_shapes(found, m, f"checkpoint {self.tag_dir}")  # Llama's order

    def get(self, name: str) -> torch.Tensor:
        """One fp32 tensor in memory of its own; `lm_head.weight` of tied embeddings is `embed_tokens.weight`."""
        if self.model.tie_embeddings and name == "lm_head.weight":
            name = "embed_tokens.weight"
        if name not in self.shapes:
            raise KeyError(f"checkpoint {self.tag_dir} has no weight {name}")
        tensor = self._guard(lambda: self._read(name, self._load))
        return tensor.to(torch.float32, copy=True).reshape(self.shapes[name])

    def read_all(self) -> dict[str, torch.Tensor]:
        """The whole model (for evaluation); tied embeddings also as `lm_head.weight`."""
        weights = {name: self.get(name) for name in self.shapes}
        self.release()
        if self.model.tie_embeddings:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        return weights

    def release(self) -> None:
        """Unmap every file read so far (their pages leave this process's memory) and give freed tensors back."""
        self._files.clear()
        return_freed_memory()

    def __enter__(self) -> "CheckpointWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _load(self, path: Path) -> Any:
        if path not in self._files:
            # DeepSpeed's files hold its own objects, hence weights_only=False: it is the run's own checkpoint.
            self._files[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        return self._files[path]

    def _guard(self, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except CheckpointError:
            raise
        except Exception as e:  # torch.load and the files' contents fail in many ways when damaged
            raise CheckpointError(f"checkpoint {self.tag_dir}: cannot read its weights ({self.source_name()}): "
                                  f"{type(e).__name__}: {e}") from e

    def source_name(self) -> str:
        return getattr(self, "source", "layout files")


def read_weights(tag_dir: Path, state: RunState, m: ModelConfig) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights under one-process names (tied embeddings also as lm_head.weight)."""
    with CheckpointWeights(tag_dir, state, m) as weights:
        return weights.read_all()


def _source(tag_dir: Path, state: RunState, load: Loader) -> tuple[dict[str, torch.Size], Reader, str]:
    """(shapes, reader, description) of where this checkpoint keeps its fp32 weights."""
    if is_weights_only(tag_dir):
        return (*_imported(tag_dir), "imported model.safetensors")
    par = state.config["parallel"]
    zero, tp, pp = par["zero_stage"], par["tp"], par["pp"]
    bf16 = state.config["trainer"]["precision"] == "bf16"
    if zero == 3 or (zero in (1, 2) and bf16 and tp == pp == 1):
        return (*_zero_partitions(tag_dir, zero, load), f"ZeRO-{zero} optimizer partitions")
    if zero == 0 or not bf16:
        return (*_module_states(tag_dir, tp, pp, load), f"module weights of tp {tp} x pp {pp}")
    return (*_universal(universal.convert(tag_dir), load), "universal form")


def _imported(tag_dir: Path) -> tuple[dict[str, torch.Size], Reader]:
    path = tag_dir / store.WEIGHTS_FILE
    with safe_open(path, framework="pt") as f:
        shapes = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}

    def read(name: str, load: Loader) -> torch.Tensor:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)
    return shapes, read


def _universal(universal_dir: Path, load: Loader) -> tuple[dict[str, torch.Size], Reader]:
    zero = universal_dir / "zero"
    names = [p.name for p in sorted(zero.iterdir()) if p.is_dir() and not p.is_symlink()]
    shapes = {n: load(zero / n / "fp32.pt")["param"].shape for n in names}
    return shapes, lambda name, load: load(zero / name / "fp32.pt")["param"]


def _module_states(tag_dir: Path, tp: int, pp: int, load: Loader) -> tuple[dict[str, torch.Size], Reader]:
    """Module weights per TP rank, joined. In a pipeline every layer has its file (per TP rank)."""
    from distlm.model.parallelize import universal_checkpoint_info

    slices: dict[str, list[tuple[Path, str, torch.Size]]] = {}  # name -> one (file, key, shape) per TP rank
    for rank in range(tp):
        files = sorted(tag_dir.glob(f"layer_*-model_{rank:02d}-model_states.pt")) if pp > 1 else \
            [tag_dir / f"mp_rank_{rank:02d}_model_states.pt"]
        if not files or not all(f.is_file() for f in files):
            raise CheckpointError(f"checkpoint {tag_dir}: the module weights of tensor-parallel rank {rank} are "
                                  f"missing ({files[0].name if files else f'layer_*-model_{rank:02d}-model_states.pt'})")
        seen: set[str] = set()
        for f in files:
            for key, t in _module_of(load(f), pp).items():
                if key not in seen:  # tied embeddings: the first stage's copy
                    seen.add(key)
                    slices.setdefault(key, []).append((f, key, t.shape))
    incomplete = sorted(k for k, s in slices.items() if len(s) != tp)
    if incomplete:
        raise CheckpointError(f"checkpoint {tag_dir}: {incomplete} are not on all {tp} tensor-parallel ranks")
    info = load(tag_dir / "mp_rank_00_model_states.pt").get("universal_checkpoint_info") if tp > 1 else None
    merge = _TensorParallelMerge(info or universal_checkpoint_info(0), tp)
    shapes = {k: merge.shape(k, [s for _, _, s in parts]) for k, parts in slices.items()}

    def read(name: str, load: Loader) -> torch.Tensor:
        return merge(name, [_module_of(load(f), pp)[key] for f, key, _ in slices[name]])
    return shapes, read


def _module_of(states: dict, pp: int) -> dict[str, torch.Tensor]:
    return states if pp > 1 else states["module"]  # a pipeline layer's file is that layer's state dict


class _TensorParallelMerge:
    """Joins a parameter's TP slices as ds_to_universal does: row-parallel on dim 1, replicated ones from
    rank 0, the rest on dim 0; vocabulary-parallel ones lose the padding that made them divisible by tp."""

    def __init__(self, info: dict, tp: int):
        self.tp = tp
        self.row = [re.compile(p) for p in info.get("parameter_with_row_parallelism_patterns", [])]
        self.replicated = [re.compile(p) for p in info.get("tp_replicated_parameter_patterns", [])]
        self.vocab = [re.compile(p) for p in info.get("vocabulary_parameter_patterns", [])]
        self.vocab_size = info.get("original_vocab_size")

    def _rule(self, name: str) -> tuple[int | None, bool]:  # (dim to join on or None = replicated, is vocabulary)
        if self.tp == 1 or any(p.match(name) for p in self.replicated):
            return None, False
        dim = 1 if any(p.match(name) for p in self.row) else 0
        return dim, any(p.match(name) for p in self.vocab)

    def shape(self, name: str, shapes: list[torch.Size]) -> torch.Size:
        dim, vocab = self._rule(name)
        if dim is None:
            return shapes[0]
        joined = list(shapes[0])
        joined[dim] = sum(s[dim] for s in shapes)
        if vocab and self.vocab_size:
            joined[0] = min(joined[0], self.vocab_size)
        return torch.Size(joined)

    def __call__(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        dim, vocab = self._rule(name)
        if dim is None:
            return parts[0]
        joined = torch.cat(parts, dim=dim)
        return joined[: self.vocab_size] if vocab and self.vocab_size else joined


def _zero_partitions(tag_dir: Path, stage: int, load: Loader) -> tuple[dict[str, torch.Size], Reader]:
    """fp32 master weights from the ZeRO optimizer files of one model-parallel rank (tp = pp = 1).

    ZeRO-1/2 flatten each parameter group (with DeepSpeed's alignment padding after each parameter) and give
    every rank an equal slice of it; ZeRO-3 splits every parameter into equal pieces, one per rank, each
    rank's pieces back to back. `param_shapes` in the model-states file gives the order."""
    files = {int(m.group(1)): f for f in tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_mp_rank_00", f.name))}
    model_file = tag_dir / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt")
    if not files or not model_file.is_file():
        raise CheckpointError(f"checkpoint {tag_dir}: no ZeRO-{stage} optimizer files or no {model_file.name}")
    first = load(files[min(files)])["optimizer_state_dict"]
    count = first["partition_count"]
    world = max(count) if isinstance(count, list) else count
    if sorted(files) != list(range(world)):
        raise CheckpointError(f"checkpoint {tag_dir}: ZeRO-{stage} over {world} ranks needs their {world} optimizer "
                              f"files; found ranks {sorted(files)}")
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    group_sizes = [g.numel() for g in first[key]]
    paddings = first.get("param_alignment_paddings") if stage < 3 else None
    where: dict[str, tuple[int, int, int]] = {}  # name -> (group, offset, numel); stage 3: offset in each piece
    shapes: dict[str, torch.Size] = {}
    for g, group in enumerate(load(model_file)["param_shapes"]):
        offset = 0
        for i, (name, shape) in enumerate(group.items()):
            n = math.prod(shape)
            where[name], shapes[name] = (g, offset, n), torch.Size(shape)
            offset += math.ceil(n / world) if stage == 3 else n + (paddings[g][i] if paddings else 0)
        if offset > group_sizes[g] * (1 if stage == 3 else world):
            raise CheckpointError(f"checkpoint {tag_dir}: parameter group {g} needs {offset} elements, its ZeRO-"
                                  f"{stage} partitions hold fewer: the files do not belong together")

    def read(name: str, load: Loader) -> torch.Tensor:
        g, offset, n = where[name]
        flat = [load(files[r])["optimizer_state_dict"][key][g] for r in range(world)]
        if stage == 3:
            piece = math.ceil(n / world)
            return torch.cat([f[offset:offset + piece] for f in flat])[:n]
        size = group_sizes[g]  # each rank holds [r * size, (r + 1) * size) of the group
        return torch.cat([flat[r][max(offset - r * size, 0):min(offset + n - r * size, size)]
                          for r in range(offset // size, (offset + n - 1) // size + 1)])
    return shapes, read
