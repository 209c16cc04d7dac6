"""Config composition and validation: bad values fail on the driver, naming the key, before any worker."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from distlm.config import ConfigError, compose_config, raise_if
from distlm.train.driver.launch import train
from distlm.validation import validate_train

DISTLM = [sys.executable, "-m", "distlm.cli"]


def test_defaults_compose_into_typed_config():
    c = compose_config()
    assert c.model.vocab_size == c.data.tokenizer.vocab_size
    assert c.model.max_seq_len == c.data.seq_len
    assert Path(c.run_dir).is_absolute() and Path(c.data.dir).is_absolute()
    assert c.export.checkpoint_dir == str(Path(c.run_dir) / "checkpoints")
    assert c.global_batch_size == c.trainer.micro_batch_size * c.trainer.grad_accum * c.cluster.num_workers


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        compose_config("trainer.max_steps=many")


def test_unknown_enum_value_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"trainer.precision.*fp32.*bf16"):
        compose_config("trainer.precision=fp8")


def test_heads_not_divisible_by_kv_heads_says_what_is_valid(tmp_path):
    c = compose_config("model.n_heads=4", "model.n_kv_heads=3", f"data.dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"model.n_heads=4 must be divisible by model.n_kv_heads=3 .*\[1, 2, 4\]"):
        raise_if(validate_train(c))


def test_missing_data_fails_before_any_worker_starts(tmp_path):
    c = compose_config(f"data.dir={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}")
    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match=r"data.dir: no preprocessed data at .*nowhere.*distlm preprocess"):
        train(c)
    assert not ray.is_initialized(), "validation must fail before Ray starts"
    assert not (tmp_path / "run").exists()


def test_cli_prints_composed_config_and_rejects_bad_values(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    shown = subprocess.run([*DISTLM, "train", "--cfg", "job", "model.dim=96"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, check=True)
    assert "dim: 96" in shown.stdout and "zero_stage: 1" in shown.stdout
    bad = subprocess.run([*DISTLM, "train", "model.n_kv_heads=3", f"data.dir={tmp_path}"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert "model.n_kv_heads=3" in bad.stdout + bad.stderr
    # The usage lists exactly the commands the CLI dispatches (those its refusal of an unknown one names).
    usage = subprocess.run([*DISTLM, "--help"], capture_output=True, text=True, env=env, check=True)
    listed = re.findall(r"^    distlm ([a-z-]+) ", usage.stdout, flags=re.M)
    unknown = subprocess.run([*DISTLM, "trian"], capture_output=True, text=True, env=env)
    assert unknown.returncode == 2 and "distlm: unknown command 'trian'; choose from: " in unknown.stderr
    dispatched = unknown.stderr.split("choose from: ")[1].strip().split(", ")
    assert sorted(listed) == sorted(dispatched)


def test_each_command_explains_itself_and_a_typo_gets_did_you_mean(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    helps = {}
    for command in ("train", "preprocess", "plan"):
        shown = subprocess.run([*DISTLM, command, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path,
                               check=True).stdout
        helps[command] = shown
        assert shown.startswith(f"distlm {command}: ") and "minhash_perms" not in shown   # not the config dump
        assert len(re.findall(rf"^  distlm {command} ", shown, flags=re.M)) == 2   # two examples
        assert f"distlm {command} --cfg job" in shown   # the whole config, one flag away
    assert re.search(r"^  trainer.max_steps +300$", helps["train"], flags=re.M)   # a key with its default
    assert re.search(r"^  data.seq_len +128$", helps["preprocess"], flags=re.M)
    assert len(set(helps.values())) == 3

    typo = subprocess.run([*DISTLM, "train", "trainer.max_stepz=3"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert typo.returncode == 2 and "did you mean trainer.max_steps?" in typo.stderr and "+" not in typo.stderr
    group = subprocess.run([*DISTLM, "plan", "model=7bb"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert group.returncode == 2 and "did you mean model=7b?" in group.stderr   # Hydra alone exits 1


def test_a_run_refused_by_validation_leaves_run_dir_as_it_was(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    fresh, earlier = tmp_path / "fresh", tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "train.log").write_text("an earlier run's log\n")
    for run_dir in (fresh, earlier):
        refused = subprocess.run([*DISTLM, "train", f"data.dir={tmp_path / 'nowhere'}", f"run_dir={run_dir}"],
                                 capture_output=True, text=True, env=env, cwd=tmp_path)
        assert refused.returncode == 2 and "no preprocessed data" in refused.stdout + refused.stderr
    assert not fresh.exists()
    assert [p.name for p in earlier.iterdir()] == ["train.log"]
    assert (earlier / "train.log").read_text() == "an earlier run's log\n"


def test_the_models_vocabulary_is_the_datas_tokenizer(tmp_path):
    """model.vocab_size follows the data: a given tokenizer.json before preprocessing, the manifest after it;
    a value set on the command line still wins."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["In the beginning God created the heaven and the earth."] * 20,
                                  trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    assert size != compose_config().data.tokenizer.vocab_size
    given = [f"data.tokenizer.path={tmp_path / 'tokenizer.json'}", f"data.dir={tmp_path / 'not-yet'}"]
    assert compose_config("model=7b", *given).model.vocab_size == size
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text('{"tokenizer": {"vocab_size": 50257}}')
    assert compose_config("model=7b", f"data.dir={tmp_path / 'data'}").model.vocab_size == 50257
    assert compose_config("model=7b", f"data.dir={tmp_path / 'data'}", "model.vocab_size=64000").model.vocab_size == 64000
    trained = compose_config().data.tokenizer.vocab_size  # the size a tokenizer to be trained is asked for
    assert compose_config("model=7b", f"data.dir={tmp_path / 'none'}").model.vocab_size == trained
