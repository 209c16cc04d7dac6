"""Monitoring: what rank 0 records per step and per evaluation (metrics.jsonl, samples.jsonl, wandb offline),
a resumed run continuing its W&B run, secrets written nowhere, `distlm report`, the driver's progress bar, and
W&B failures (unreachable server, a dead wandb process) that never stop training."""

from __future__ import annotations

import io
import json
import logging
import math
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import wandb
from conftest import by_step

from distlm.checkpoint import store
from distlm.config import WandbMode, compose_config, to_dict
from distlm.model.llama import Llama
from distlm.train.driver.launch import train
from distlm.train.driver.progress import ProgressBar
from distlm.train.worker.metrics import MetricsLogger, peak_tflops_of, read_metrics, wandb_mode
from distlm.validation import validate_cluster

STEPS = 6
SECRET = f"wandb-key-{secrets.token_hex(24)}"  # long enough to pass wandb's own key check (40+ characters)
STEP_KEYS = {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "step_seconds", "data_wait_seconds", "rss_gib",
             "mfu"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # nothing listens there once the socket is closed


UNREACHABLE_WANDB = f"http://127.0.0.1:{closed_port()}"


@pytest.fixture(scope="module", autouse=True)
def wandb_key_in_environment():
    """A W&B key in the environment, as a submitted job has it, and a W&B server address that nothing answers,
    set before the module's Ray cluster starts so that its workers inherit them too; logger.mode=offline keeps
    the runs that ask for it off the network, logger.mode=auto tries the server."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", SECRET)
        mp.setenv("WANDB_BASE_URL", UNREACHABLE_WANDB)
        mp.delenv("WANDB_MODE", raising=False)
        yield


def monitored_config(data_dir: Path, run_dir: Path, *overrides: str):
    return compose_config(
        "model=test", "data.seq_len=64", "data.tokenizer.vocab_size=512", f"data.dir={data_dir}", f"run_dir={run_dir}",
        f"trainer.max_steps={STEPS}", "trainer.micro_batch_size=4", "optimizer.warmup_steps=1", "trainer.eval_every=3",
        "trainer.eval_batches=1", "trainer.checkpoint_every=3", "logger.mode=offline", "logger.name=monitor-test",
        "logger.group=sweep-7", "logger.tags=[cpu,monitoring]", "logger.notes=tries-notes", "logger.samples=2",
        "logger.sample_tokens=5",
        "logger.peak_tflops=0.001", *overrides)


@pytest.fixture(scope="module")
def monitored_run(bible_shards, tmp_path_factory) -> Path:
    """6 steps on 2 workers, stopped at step 3 and resumed, as a preempted job would be."""
    run_dir = tmp_path_factory.mktemp("monitored")
    train(monitored_config(bible_shards, run_dir, "trainer.stop_at_step=3"))
    train(monitored_config(bible_shards, run_dir))
    return run_dir


def records_with(run_dir: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if key in r]


def test_every_step_records_the_training_metrics(monitored_run):
    steps = records_with(monitored_run, "loss")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), "one record per step: only rank 0 logs"
    for r in steps:
        assert STEP_KEYS <= r.keys(), STEP_KEYS - r.keys()
        assert all(math.isfinite(r[k]) for k in STEP_KEYS)
        assert 0 <= r["data_wait_seconds"] <= r["step_seconds"] and r["rss_gib"] > 0.1
        assert r["tokens_seen"] == r["step"] * 8 * 64


# Training FLOPs per token of model=test (dim 64, 2 layers, 4 heads / 2 KV heads of 16, ffn 176, vocabulary 512)
# at 64 tokens, by hand: 6 per non-embedding parameter + 12 x layers x dim x seq_len (PaLM, appendix B).
BLOCK = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64       # q, o; k, v; SwiGLU; two norm gains = 46,208
NON_EMBEDDING = 2 * BLOCK + 64 + 512 * 64                         # + final norm, lm_head = 125,248
TEST_MODEL_FLOPS_PER_TOKEN = 6 * NON_EMBEDDING + 12 * 2 * 64 * 64  # 849,792


def test_mfu_is_model_flops_per_second_over_the_peak_of_all_devices(monitored_run):
    flops_per_step = TEST_MODEL_FLOPS_PER_TOKEN * 8 * 64   # global batch 8 x 64 tokens
    for r in records_with(monitored_run, "loss"):
        assert r["mfu"] == pytest.approx(flops_per_step / r["step_seconds"] / (0.001e12 * 2), rel=1e-6)


def test_flops_per_token_is_what_a_flop_counter_counts_in_forward_and_backward():
    """torch's FlopCounterMode counts every matmul of a real forward and backward pass of model=tiny (SDPA's math
    kernel, so attention runs as countable matmuls; like the formula it computes the whole seq x seq square, not
    the causal half). The only difference from 6N + 12 L d T: N counts the norm gains, which do no matmul."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    seq, batch = 256, 2
    m = compose_config("model=tiny", "data.tokenizer.vocab_size=512", f"data.seq_len={seq}").model
    model = Llama(m)
    ids = torch.randint(0, m.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids[:, :-1], ids[:, 1:]).backward()
    counted = counter.get_total_flops() / (batch * seq)
    norm_gains = (2 * m.n_layers + 1) * m.dim
    assert model.flops_per_token(seq) - 6 * norm_gains == counted
    # The count can tell a wrong formula: without attention's term, or with the embedding among the N.
    attention = 12 * m.n_layers * m.dim * seq
    assert abs(counted - (model.flops_per_token(seq) - attention)) > 0.2 * counted
    assert abs(counted - (model.flops_per_token(seq) + 6 * m.vocab_size * m.dim)) > 0.05 * counted


def test_evaluations_log_validation_loss_perplexity_and_checkpoint_time(monitored_run):
    val = records_with(monitored_run, "val_loss")
    assert [r["step"] for r in val] == [0, 3, 6]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in val)
    assert [r["step"] for r in records_with(monitored_run, "checkpoint_seconds")] == [3, 6]


def test_evaluations_generate_samples_of_validation_prompts(monitored_run):
    rows = read_metrics(monitored_run, "samples.jsonl")
    assert [r["step"] for r in rows] == [0, 0, 3, 3, 6, 6]
    assert rows[0]["prompt"] == rows[4]["prompt"], "the same prompts at every evaluation, to compare"
    assert all(r["prompt"] and r["continuation"] and r["reference"] for r in rows)


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_resumed_run_continues_the_same_wandb_run(monitored_run):
    runs = wandb_runs(monitored_run)
    assert len(runs) == 2, "one wandb run per launch (rank 0 only)"
    run_id = store.read_state(monitored_run / "checkpoints" / "step00000006").wandb_run_id
    assert all(r.name.endswith(f"-{run_id}") for r in runs), (runs, run_id)


def test_wandb_run_has_name_group_tags_config_and_sample_tables(monitored_run):
    record_bytes = b"".join(p.read_bytes() for r in wandb_runs(monitored_run) for p in r.glob("run-*.wandb"))
    for expected in (b"monitor-test", b"sweep-7", b"monitoring", b"zero_stage", b"sample_tokens"):
        assert expected in record_bytes, expected
    tables = list(monitored_run.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert {int(t.name.split("_")[1]) for t in tables} == {0, 3, 6}
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "continuation", "reference"] and len(table["data"]) == 2


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's .wandb file (what `wandb sync` uploads): a 7-byte header, then
    LevelDB-log chunks (crc32, length, type) in 32 KiB blocks; a record is one full chunk or first..last."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, at, block, records, parts = path.read_bytes(), 7, 32768, [], b""
    while at + 7 <= len(data):
        left = block - at % block
        size, kind = int.from_bytes(data[at + 4: at + 6], "little"), data[at + 6] if left >= 7 else 0
        if left < 7 or (size, kind) == (0, 0):   # a block's zero-filled tail
            at += left
            continue
        parts += data[at + 7: at + 7 + size]
        at += 7 + size
        if kind in (1, 4):   # full, last
            records.append(Record.FromString(parts))
            parts = b""
    return records


def wandb_rows(run_dir: Path) -> tuple[list[tuple[int, dict]], dict]:
    """Every history row (step, values) of the run's offline launches in order, and the last launch's summary."""
    rows, summary = [], {}
    for run in wandb_runs(run_dir):   # named by start time: launch order
        for r in wandb_records(next(run.glob("run-*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "history":   # "a/b" keys come as nested_key ["a", "b"]
                rows.append((r.history.step.num, {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                  for i in r.history.item}))
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return rows, summary


def test_wandb_gets_each_step_once_across_the_resume_with_best_and_last_and_numeric_layout(monitored_run):
    rows, summary = wandb_rows(monitored_run)
    run = next(r.run for r in wandb_records(next(wandb_runs(monitored_run)[0].glob("run-*.wandb")))
               if r.WhichOneof("record_type") == "run")
    assert (run.notes, list(run.tags), run.run_group) == ("tries-notes", ["cpu", "monitoring"], "sweep-7")
    steps = [step for step, _ in rows]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps   # none repeated: W&B would drop it
    by_step = dict(rows)
    assert "attempt" in by_step[4] and by_step[4]["layout/dp"] == 2   # the resume's start row, a step later
    assert all(isinstance(v, (int, float)) for _, row in rows for k, v in row.items() if k.startswith("layout/"))
    last_val = [r["val_loss"] for r in records_with(monitored_run, "val_loss")][-1]
    assert summary["val_loss"]["last"] == pytest.approx(last_val) and "min" in summary["val_loss"]
    assert summary["loss"]["last"] == pytest.approx(records_with(monitored_run, "loss")[-1]["loss"])


def test_the_report_plot_shows_the_late_curve_validation_points_resumes_lr_and_final_numbers(tmp_path):
    from distlm.run_report import figure

    rows = [{"step": 0, "attempt": 1, "workers": 2, "layout": "tp 1 x pp 1 x dp 2"}, {"step": 0, "val_loss": 8.3}]
    for s in range(1, 201):
        if s == 101:   # a resume on fewer workers
            rows.append({"step": 100, "attempt": 1, "workers": 1, "layout": "tp 1 x pp 1 x dp 1"})
        rows.append({"step": s, "loss": 3.5 + 5 * math.exp(-s / 10) + 0.02 * (s % 3), "lr": 1e-3 * (1 - s / 200),
                     "tokens_per_s": 9000 if s <= 100 else 5000})
        if s % 50 == 0:
            rows.append({"step": s, "val_loss": 3.6 + 5 * math.exp(-s / 10), "val_loss/law": 3.8})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = figure(tmp_path)
    loss, zoom, lr, speed = fig.axes[:4]
    assert loss.get_yscale() == "log"
    assert zoom.get_ylim()[1] < 4.5 < 8.3   # the zoomed panel shows the late curve, not the first drop
    val = [line for line in loss.lines if line.get_label() == "validation"][0]
    assert val.get_linestyle() == "None" and val.get_marker() == "o"   # points, not lines between them
    assert "validation: law" in [line.get_label() for line in zoom.lines]
    for ax in (loss, zoom, lr, speed):   # the resume, marked on every panel
        assert any(list(line.get_xdata()) == [100, 100] for line in ax.lines), ax.get_title()
    assert any("resume: 2 -> 1 workers" in t.get_text() for t in speed.texts)
    assert lr.get_title() == "learning rate" and len(lr.lines[0].get_xdata()) == 200
    title = fig._suptitle.get_text()
    assert f"val loss {rows[-1]['val_loss']:.3f} (perplexity {math.exp(rows[-1]['val_loss']):.1f})" in title


def test_api_key_is_written_nowhere(monitored_run):
    assert SECRET not in json.dumps(to_dict(monitored_config(Path("."), monitored_run)))
    files = [p for p in monitored_run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name.startswith("mp_rank") for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_report_prints_a_summary_of_the_records_and_writes_a_plot(monitored_run):
    out = subprocess.run([sys.executable, "-m", "distlm.cli", "report", str(monitored_run)], capture_output=True,
                         text=True, check=True).stdout
    # The numbers, computed here from metrics.jsonl and samples.jsonl as the docs describe them.
    loss, val, step_seconds = (by_step(monitored_run, k) for k in ("loss", "val_loss", "step_seconds"))
    median = {k: statistics.median(by_step(monitored_run, k).values()) for k in ("tokens_per_s", "mfu")}
    wait = sum(by_step(monitored_run, "data_wait_seconds").values()) / sum(step_seconds.values())
    last_ten = statistics.fmean(loss[s] for s in sorted(loss)[-10:])
    expected = [
        f"steps          {STEPS}   tokens seen {STEPS * 8 * 64:,}   median {median['tokens_per_s']:,.0f} tokens/s, "
        f"{statistics.median(step_seconds.values()):.2f} s/step",
        f"train loss     {loss[1]:.3f} -> {last_ten:.3f} (mean of the last 10 steps)",
        f"val loss       {val[0]:.3f} -> {val[STEPS]:.3f}   (perplexity {math.exp(val[STEPS]):.1f})",
        f"efficiency     MFU {median['mfu']:.1%}   data-loader wait {wait:.1%} of step time   peak RSS memory "
        f"{max(by_step(monitored_run, 'rss_gib').values()):.2f} GiB",
        f"checkpoints    median save {statistics.median(by_step(monitored_run, 'checkpoint_seconds').values()):.1f} s"
        f"   skipped steps 0",
        *(f"sample @{STEPS:<6} {r['prompt']!r} -> {r['continuation']!r}"
          for r in read_metrics(monitored_run, "samples.jsonl") if r["step"] == STEPS),
    ]
    for line in expected:
        assert line in out.splitlines(), f"{line!r} not in:\n{out}"
    png = monitored_run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_steps_loss_throughput_and_eta(tmp_path):
    screen = Terminal()
    with ProgressBar(tmp_path, total_steps=10, file=screen):
        with (tmp_path / "metrics.jsonl").open("a") as f:
            for step in (1, 2, 3):
                f.write(json.dumps({"step": step, "loss": 5.0 - step, "tokens_per_s": 12345.0, "mfu": 0.41}) + "\n")
            f.write(json.dumps({"step": 3, "val_loss": 2.5}) + "\n")
        time.sleep(1.5)
    shown = screen.getvalue()
    assert "3/10" in shown and "loss=2.000" in shown and "tok_s=12,345" in shown and "mfu=41.0%" in shown
    assert "val=2.500" in shown and "<" in shown  # tqdm's "elapsed<remaining"


def test_peak_flops_come_from_the_device_name():
    assert peak_tflops_of("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_of("NVIDIA H100 PCIe") == 756
    assert peak_tflops_of("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops_of("NVIDIA GeForce GTX 1080") is None


@pytest.mark.parametrize("overrides, model", [((), torch.nn.Linear(4, 4)), (("parallel.pp=2",), "llama")])
def test_samples_are_skipped_where_rank_0_does_not_hold_a_whole_llama(tmp_path, overrides, model):
    c = compose_config("model=test", f"run_dir={tmp_path}", "logger.wandb=false", *overrides)
    model = Llama(c.model) if model == "llama" else model
    logger = MetricsLogger(c, wandb_run_id="unused")
    logger.log_samples(0, model, val_loader=None, tokenizer_file=tmp_path / "no-tokenizer.json")
    assert not (tmp_path / "samples.jsonl").exists()


# ---------------------------------------------------------------- W&B failures never stop training

@pytest.mark.parametrize("env_mode, key, expected", [("offline", SECRET, "offline"), ("disabled", SECRET, "disabled"),
                                                     (None, SECRET, "online"), (None, None, "offline")])
def test_auto_mode_honours_wandb_mode_from_the_environment(monkeypatch, env_mode, key, expected):
    for name, value in (("WANDB_MODE", env_mode), ("WANDB_API_KEY", key)):
        monkeypatch.setenv(name, value) if value else monkeypatch.delenv(name, raising=False)
    assert wandb_mode(WandbMode.auto) == expected
    assert wandb_mode(WandbMode.offline) == "offline", "an explicit logger.mode wins"


def test_unknown_wandb_mode_in_the_environment_is_refused_before_launch(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "ofline")
    problems = validate_cluster(compose_config("logger.mode=auto"))
    assert problems == ["WANDB_MODE='ofline' in the environment (logger.mode=auto follows it): use one of online, "
                        "offline, disabled, or unset it"]
    assert validate_cluster(compose_config("logger.mode=offline")) == [], "an explicit logger.mode ignores it"
    with pytest.raises(ValueError, match="WANDB_MODE='ofline'.*online, offline, disabled"):
        wandb_mode(WandbMode.auto)


def test_unreachable_wandb_server_at_start_turns_the_run_offline_with_a_warning(tmp_path, caplog):
    c = compose_config("model=test", f"run_dir={tmp_path}", "logger.mode=auto", "logger.init_timeout=5")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="distlm.train.worker.metrics"):
        logger = MetricsLogger(c, wandb_run_id="unreachable-1")
    assert time.perf_counter() - started < 60, "logger.init_timeout bounds the wait for the server"
    logger.log(1, loss=2.5)
    logger.close()
    wandb.teardown()  # finish() returns before wandb's service has written everything; its shutdown flushes
    warning = caplog.text
    offline = list(tmp_path.glob("wandb/offline-run-*-unreachable-1/run-unreachable-1.wandb"))
    assert len(offline) == 1 and b"loss" in offline[0].read_bytes()
    assert f"W&B could not start online at {UNREACHABLE_WANDB} (CommError" in warning
    assert f"logs W&B offline to {offline[0].parent}; upload it later with `wandb sync {offline[0].parent}`" in warning
    assert read_metrics(tmp_path)[0]["loss"] == 2.5


def test_an_empty_wandb_mode_is_refused_before_launch(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "")
    assert validate_cluster(compose_config("logger.mode=offline")) == [
        "WANDB_MODE is set but empty in the environment: W&B refuses an empty mode, whatever logger.mode says; unset "
        "it or set one of online, offline, disabled"]
    assert validate_cluster(compose_config("logger.wandb=false")) == []


def test_when_wandb_cannot_start_at_all_the_warning_says_metrics_go_to_the_jsonl_only(tmp_path, caplog, monkeypatch):
    """WANDB_MODE set but empty where a worker runs: W&B refuses online and offline alike (a validation error);
    the warning must not promise an offline run that does not exist."""
    monkeypatch.setenv("WANDB_MODE", "")
    c = compose_config("model=test", f"run_dir={tmp_path}", "logger.mode=auto")
    with caplog.at_level(logging.WARNING, logger="distlm.train.worker.metrics"):
        logger = MetricsLogger(c, wandb_run_id="empty-mode-1")
    logger.log(1, loss=2.5)
    logger.close()
    assert logger.wandb is None and not list(tmp_path.glob("wandb/offline-run-*"))
    assert "ValidationError" in caplog.text and "nor offline" in caplog.text
    assert f"training goes on without W&B; metrics go to {tmp_path / 'metrics.jsonl'} only" in caplog.text
    assert "logs W&B offline" not in caplog.text and "wandb sync" not in caplog.text
    assert read_metrics(tmp_path)[0]["loss"] == 2.5


def test_wandb_process_dying_mid_run_stops_only_the_mirroring(tmp_path, caplog):
    c = compose_config("model=test", f"run_dir={tmp_path}", "logger.mode=offline")
    logger = MetricsLogger(c, wandb_run_id="dies-1")
    logger.log(1, loss=3.0)
    services = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("wandb-core")]
    assert services, "wandb runs its service as a child process"
    for p in services:
        p.kill()
    psutil.wait_procs(services, timeout=10)
    with caplog.at_level(logging.WARNING, logger="distlm.train.worker.metrics"):
        for step in (2, 3):
            logger.log(step, loss=3.0 - step / 10)
        logger.close()
    assert "W&B stopped working at step 2" in caplog.text and "training goes on" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_training_runs_to_the_end_when_the_wandb_server_is_unreachable(bible_shards, tmp_path, capfd):
    """Rank 0 in a Ray worker, a W&B key set and logger.mode=auto: the server at WANDB_BASE_URL never answers."""
    c = monitored_config(bible_shards, tmp_path, "logger.mode=auto", "logger.init_timeout=5", "logger.samples=0")
    train(c)
    assert [r["step"] for r in records_with(tmp_path, "loss")] == list(range(1, STEPS + 1))
    run_id = store.read_state(tmp_path / "checkpoints" / "step00000006").wandb_run_id
    assert [r.name.split("-", 3)[-1] for r in wandb_runs(tmp_path)] == [run_id], "metrics landed in W&B offline"
    time.sleep(2)  # the workers' last log lines reach the driver's output
    out = capfd.readouterr()
    assert f"W&B could not start online at {UNREACHABLE_WANDB} (CommError" in out.err + out.out
