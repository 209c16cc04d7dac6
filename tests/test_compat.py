"""Guards of distlm/compat: each dependency gap that distlm patches is still there, and the private names the
patches use still mean what they assume. When an upgrade fixes a gap or moves a name, the test here fails and
says what to remove or redo, so a patch can neither break silently nor be applied on top of a fix."""

import inspect
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed import run_ranks

from distlm.compat import deepspeed as ds_compat
from distlm.config import compose_config
from distlm.parallel.layout import make_layout


def tiny(*overrides: str):
    return compose_config("model=test", "model.vocab_size=128", "data.seq_len=16", "cluster.num_workers=1",
                          "trainer.micro_batch_size=2", "logger.wandb=false", *overrides)


def test_the_pinned_versions_are_the_ones_the_patches_were_written_for():
    import deepspeed
    import ray

    from distlm.compat import ray as ray_compat

    assert deepspeed.__version__ == ds_compat.WRITTEN_FOR, "check every patch in distlm/compat/deepspeed.py"
    assert ray.__version__ == ray_compat.WRITTEN_FOR, "check every patch in distlm/compat/ray.py"


def _zero3_fp32_copies(rank: int, out: Path) -> None:
    import deepspeed

    from distlm.model.materialize import InitialWeights
    from distlm.model.parallelize import build_model
    from distlm.train.worker.engine import deepspeed_config, param_groups

    c = tiny("parallel=zero3")
    config = deepspeed_config(c, use_cuda=False)
    shared = {}
    for patched in (False, True):
        module = build_model(c.model, make_layout(1, 1), InitialWeights(c.model, c.seed), "blocks", 0, config)
        with ds_compat.shared_fp32_partitions() if patched else _nothing():
            engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, 0.1), config=config)
        opt = engine.optimizer
        shared[patched] = [fp32.data_ptr() == weights.data_ptr() for fp32, weights in
                           zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)]
    torch.save(shared, out)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_zero3_still_copies_fp32_weights_and_the_patch_makes_it_share_them(tmp_path):
    run_ranks(_zero3_fp32_copies, 1, tmp_path / "shared.pt")
    shared = torch.load(tmp_path / "shared.pt")
    assert not any(shared[False]), ("DeepSpeed's ZeRO-3 now shares fp32 weight and master partitions by itself: "
                                    "remove compat.deepspeed.shared_fp32_partitions")
    assert shared[True] and all(shared[True])


def _checkpoint_writes(rank: int, out: Path) -> None:
    from distlm.train.worker.engine import build_engine

    engine = build_engine(tiny(), make_layout(1, 1))
    through_writer: list[str] = []
    cls = type(engine.checkpoint_engine)
    original = cls.save

    def counting(self, state_dict, path):
        through_writer.append(Path(path).name)
        return original(self, state_dict, path)

    cls.save = counting
    try:
        with ds_compat.routing_checkpoint_writes(engine, lambda state, path, save: save(state, str(path))):
            engine.save_checkpoint(str(out), tag="t", save_latest=False)
    finally:
        cls.save = original
    written = sorted(p.name for p in (out / "t").iterdir())
    torch.save({"through_writer": sorted(through_writer), "written": written}, out / "result.pt")


def test_every_checkpoint_file_goes_through_the_writer_the_patch_wraps(tmp_path):
    run_ranks(_checkpoint_writes, 1, tmp_path)
    result = torch.load(tmp_path / "result.pt")
    assert result["written"] and result["through_writer"] == result["written"], \
        "DeepSpeed now writes checkpoint files outside checkpoint_engine.save: redo compat.routing_checkpoint_writes"


def _routed_writes(rank: int, out: Path) -> None:
    from distlm.train.worker.engine import build_engine

    engine = build_engine(tiny(), make_layout(1, 1))
    routed: list[str] = []
    with ds_compat.routing_checkpoint_writes(engine, lambda state, path, save: routed.append(path.name)):
        engine.save_checkpoint(str(out), tag="t", save_latest=False)  # must not write anything itself
    torch.save({"routed": routed, "written": sorted(p.name for p in (out / "t").iterdir())}, out / "result.pt")


def test_routed_checkpoint_files_are_left_to_distlm_and_deepspeed_goes_on_with_the_next(tmp_path):
    run_ranks(_routed_writes, 1, tmp_path)
    result = torch.load(tmp_path / "result.pt")
    assert len(result["routed"]) >= 2 and result["written"] == [], result  # model states and optimizer shard


def test_the_universal_converter_takes_the_namespace_and_pool_hook_distlm_gives_it(monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.setattr(sys, "argv", ["ds_to_universal", "--input_folder", "in", "--output_folder", "out"])
    expected = vars(ds_to_universal.parse_arguments())
    given = {}
    monkeypatch.setattr(ds_to_universal, "main", lambda args: given.update(vars(args)))
    ds_compat.run_ds_to_universal(Path("in"), Path("out"))
    assert given.keys() == expected.keys(), "ds_to_universal's options changed: update compat.run_ds_to_universal"
    def options(args: dict) -> dict:  # distlm's own: the folders, and one worker per phase (Ray runs the items)
        return {k: v for k, v in args.items() if not k.endswith(("_folder", "_workers"))}
    assert options(given) == options(expected), "ds_to_universal's defaults changed: check compat.run_ds_to_universal"
    assert list(inspect.signature(ds_to_universal._do_parallel_work).parameters) == \
        ["do_work", "work_chunks", "num_workers"], "the converter's pool hook changed: update run_ds_to_universal"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_optimizers_keep_the_gradient_buffers_drop_accumulated_gradients_clears(stage, tmp_path):
    run_ranks(_gradient_buffers, 1, stage, tmp_path / "buffers.pt")
    kinds = torch.load(tmp_path / "buffers.pt")
    if stage in (1, 2):
        assert kinds == {"averaged_gradients": "dict", "all_grad_tensors": "dict", "micro_steps": "int"}
    else:
        assert kinds == {"averaged_gradients": "dict", "micro_steps": "int"}


def _gradient_buffers(rank: int, stage: int, out: Path) -> None:
    from distlm.train.worker.engine import build_engine

    engine = build_engine(tiny(f"parallel.zero_stage={stage}"), make_layout(1, 1))
    names = ["averaged_gradients", "all_grad_tensors"] if stage in (1, 2) else ["averaged_gradients"]
    kinds = {name: type(getattr(engine.optimizer, name)).__name__ for name in names}
    kinds["micro_steps"] = type(engine.micro_steps).__name__
    ids = torch.randint(0, 128, (2, 17))
    engine(ids[:, :-1], ids[:, 1:]).backward()  # one accumulated micro-batch, then forgotten
    ds_compat.drop_accumulated_gradients(engine, 0)
    torch.save(kinds, out)


def test_ray_still_keeps_the_handles_the_local_cluster_stop_uses():
    import ray
    from ray._private import ray_constants, worker

    from distlm.compat.ray import stop_local_cluster

    assert not ray.is_initialized()
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        monitors = worker._global_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]
        assert len(monitors) == 1 and monitors[0].process.poll() is None
    finally:
        start = time.perf_counter()
        stop_local_cluster()
    assert not ray.is_initialized() and monitors[0].process.poll() is not None
    assert time.perf_counter() - start < 5


def test_placement_groups_are_removed_by_their_table_id():
    import ray
    from ray.util.placement_group import placement_group

    from distlm.compat.ray import remove_placement_groups, stop_local_cluster

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        before = set(ray.util.placement_group_table())
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready(), timeout=30)
        (created,) = set(ray.util.placement_group_table()) - before
        assert created.endswith(ray.get_runtime_context().get_job_id())
        remove_placement_groups(before)
        assert ray.util.placement_group_table()[created]["state"] == "REMOVED"
    finally:
        stop_local_cluster()


def _exchange_gradients(rank: int, out: Path) -> None:
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    ds_compat.register_all_to_all_group(group)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (ds_compat.all_to_all_first_dim(group, x * 3.0) ** 2).sum()

    grads = {}
    for name, fn in (("eager", f), ("compiled", torch.compile(f))):
        x = torch.arange(8.0).reshape(2, 4).add(rank).requires_grad_()
        fn(x).backward()
        grads[name] = x.grad
    torch.save(grads, out / f"rank{rank}.pt")


def test_the_sequence_exchange_keeps_its_gradient_under_torch_compile(tmp_path):
    run_ranks(_exchange_gradients, 2, tmp_path)
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        # d/dx sum((3x)^2) = 18 x, whichever rank the slices travel to
        expected = 18 * torch.arange(8.0).reshape(2, 4).add(rank)
        torch.testing.assert_close(grads["eager"], expected)
        torch.testing.assert_close(grads["compiled"], expected, msg="the compiled exchange lost its gradient")


def test_ray_train_forwards_its_start_timeout_from_the_driver_environment():
    from ray.train.v2._internal import constants

    from distlm.compat.ray import START_TIMEOUT_ENV

    assert constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == START_TIMEOUT_ENV
    assert START_TIMEOUT_ENV in constants.ENV_VARS_TO_PROPAGATE, "set_start_timeout no longer reaches the controller"


def test_ray_train_still_retries_start_failures_unless_told_not_to_and_they_are_recognized():
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
    )
    from ray.train.v2._internal.execution.failure_handling.default import (
        RETRYABLE_CONTROLLER_ERRORS,
    )
    from ray.train.v2.api.config import FailureConfig

    from distlm.compat.ray import is_start_failure

    assert FailureConfig().controller_failure_limit == -1, "Ray Train no longer retries a stalled start forever"
    assert set(RETRYABLE_CONTROLLER_ERRORS) == {WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError}
    assert is_start_failure(ControllerError(WorkerGroupStartupTimeoutError(4)))
    assert is_start_failure(ControllerError(WorkerGroupStartupFailedError("a worker died while starting")))
    assert not is_start_failure(ControllerError(ValueError("a bug")))
    assert not is_start_failure(WorkerGroupError("rank 1 died", {1: RuntimeError("gone")}))


def _stalled_fit(tmp_path, start_timeout: float):
    """A TorchTrainer of 2 workers on a 1-CPU Ray: its placement group can never be ready. Returns (thread, box)."""
    import threading

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from distlm.compat.ray import set_start_timeout

    set_start_timeout(start_timeout)
    trainer = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(name="stalled", storage_path=str(tmp_path),
                                                failure_config=FailureConfig(max_failures=0, controller_failure_limit=0)))
    box = {}

    def fit():
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001
            box["error"], box["at"] = e, time.monotonic()

    thread = threading.Thread(target=fit, daemon=True)
    return thread, box


@pytest.fixture(scope="module")
def one_cpu_ray():
    import ray

    from distlm.compat.ray import START_TIMEOUT_ENV, stop_local_cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(START_TIMEOUT_ENV, raising=False)
        ray.init(address="local", num_cpus=1, include_dashboard=False)
        try:
            yield
        finally:
            stop_local_cluster()


def test_a_start_that_cannot_be_placed_ends_after_the_timeout_set_in_the_environment(one_cpu_ray, tmp_path):
    from distlm.compat.ray import is_start_failure

    thread, box = _stalled_fit(tmp_path, start_timeout=3)
    start = time.monotonic()
    thread.start()
    thread.join(300)
    assert is_start_failure(box["error"]), box
    assert box["at"] - start >= 3, "it waited for the placement group as long as it was told"


def test_the_train_controller_is_found_and_killed_by_pid(one_cpu_ray, tmp_path):
    from ray.exceptions import RayActorError

    from distlm.compat.ray import kill_train_controller

    thread, box = _stalled_fit(tmp_path, start_timeout=600)
    thread.start()
    deadline = time.monotonic() + 120
    while not kill_train_controller():
        assert time.monotonic() < deadline and thread.is_alive(), "no TrainController of this job appeared"
        time.sleep(0.5)
    killed = time.monotonic()
    thread.join(30)
    assert isinstance(box["error"], RayActorError) and box["at"] - killed < 10
