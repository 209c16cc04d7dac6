"""The planner's activation bytes equal what autograd really saves in a forward pass of distlm's Llama,
counted with saved-tensor hooks (distinct storages, parameters and buffers left out)."""

import itertools

import pytest
import torch

from distlm.config import compose_config
from distlm.model.llama import Llama
from distlm.model.parallelize import tensor_parallel
from distlm.parallel.layout import make_layout
from distlm.parallel.tensor import VocabParallelCrossEntropy, padded_vocab_size
from distlm.plan import saved_bytes_per_token
from distributed import run_ranks

BATCH, SEQ = 2, 64
# How close the formula must be, in bytes. The smallest term it has, the norms' fp32 1/rms (8 B per token and
# block), is 3,072 B here, so a term left out or counted twice would show. One process: a few bytes (the
# cross-entropy's fp32 total-weight scalar). TP 2 adds two 1-byte masks per token that the planner leaves out
# (the vocabulary-parallel embedding's and loss's out-of-range masks): 0.01 % (docs/scale.md).
FEW_BYTES = 8
TP_MASKS = 2 * BATCH * SEQ


def small_config():
    # GQA, an odd vocabulary (padded under TP) and dims where no term of the formula is negligible.
    return compose_config("model=test", "model.dim=128", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
                          "model.ffn_dim=352", "data.tokenizer.vocab_size=515", f"data.seq_len={SEQ}")


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward pass with loss."""
    skip = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels)  # held: its graph keeps every saved storage alive while they are counted
    total = sum(saved.values())
    del loss
    return total


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g), torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def measure_and_predict(c, model, dtype: torch.dtype, interval: int, tp: int) -> tuple[int, float]:
    model = model.to(dtype).train()
    model.activation_checkpoint_interval = interval
    measured = saved_bytes(model, *batch(c.model.vocab_size))
    predicted = BATCH * SEQ * saved_bytes_per_token(c.model, tp, dtype.itemsize, c.model.n_layers, interval,
                                                    first=True, last=True)
    print(f"{dtype} tp {tp} checkpoint every {interval}: saved {measured:,} B, planner {predicted:,.0f} B "
          f"({predicted / measured - 1:+.2%})")
    return measured, predicted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interval", [0, 1, 2])
def test_planner_activation_bytes_match_what_a_forward_pass_saves(dtype, interval):
    c = small_config()
    torch.manual_seed(0)
    measured, predicted = measure_and_predict(c, Llama(c.model), dtype, interval, tp=1)
    assert abs(measured - predicted) <= FEW_BYTES


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_planner_activation_bytes_of_sparse_blocks_match_what_a_forward_pass_saves(dtype):
    c = compose_config("model=test-moe", "model.dim=128", "model.n_layers=3", "model.moe.expert_ffn_dim=176",
                       "data.tokenizer.vocab_size=515", f"data.seq_len={SEQ}")
    torch.manual_seed(0)
    measured, predicted = measure_and_predict(c, Llama(c.model), dtype, 0, tp=1)
    # + the balancing loss's tokens per expert (fp32, per block and micro-batch, not per token)
    assert abs(measured - predicted) <= FEW_BYTES + c.model.n_layers * 4 * c.model.moe.experts


def test_rmsnorm_in_bf16_saves_an_fp32_copy_of_its_input():
    c = small_config()
    torch.manual_seed(0)
    norm = Llama(c.model).to(torch.bfloat16).layers[0].input_layernorm
    x = torch.randn(BATCH, SEQ, c.model.dim, dtype=torch.bfloat16, requires_grad=True)
    dtypes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: dtypes.append((t.dtype, t.shape)) or t, lambda t: t):
        out = norm(x)
    assert (torch.float32, x.shape) in dtypes and out.dtype == torch.bfloat16


def _tensor_parallel_rank(rank: int, results: dict) -> None:
    c = small_config()
    torch.manual_seed(0)
    layout = make_layout(tp=2, pp=1)
    model = tensor_parallel(Llama(c.model), layout)
    for p in model.parameters():  # the values do not matter, only that they are numbers
        torch.nn.init.normal_(p, std=c.model.init_std)
    local_vocab = padded_vocab_size(c.model.vocab_size, 2) // 2
    model.loss_fn = VocabParallelCrossEntropy(layout.tp_group, layout.tp_rank, local_vocab, c.model.vocab_size)
    results[rank] = measure_and_predict(c, model, torch.bfloat16, interval=0, tp=2)


def test_tensor_parallel_activation_bytes_match_on_two_ranks():
    results = torch.multiprocessing.Manager().dict()
    run_ranks(_tensor_parallel_rank, 2, results)
    assert len(results) == 2
    for measured, predicted in results.values():
        assert abs(measured - predicted) <= TP_MASKS + FEW_BYTES


def _context_parallel_rank(rank: int, results: dict) -> None:
    from distlm.model.parallelize import context_parallel

    c = small_config()
    torch.manual_seed(0)
    layout = make_layout(tp=1, pp=1, cp=2)
    model = Llama(c.model).to(torch.bfloat16).train()
    for block in model.layers:
        context_parallel(block, layout)
    ids, labels = batch(c.model.vocab_size)
    local = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2)  # this rank's half of every sequence
    positions = torch.arange(local.start, local.stop).expand(BATCH, -1)
    skip = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, local], labels[:, local], position_ids=positions)
    measured = sum(saved.values())
    del loss
    predicted = BATCH * SEQ // 2 * saved_bytes_per_token(c.model, 1, 2, c.model.n_layers, 0, first=True, last=True,
                                                         cp=2)
    print(f"bf16 cp 2: saved {measured:,} B, planner {predicted:,.0f} B ({predicted / measured - 1:+.2%})")
    results[rank] = (measured, predicted)


def test_context_parallel_activation_bytes_match_on_two_ranks():
    results = torch.multiprocessing.Manager().dict()
    run_ranks(_context_parallel_rank, 2, results)
    assert len(results) == 2
    for measured, predicted in results.values():
        assert abs(measured - predicted) <= FEW_BYTES
