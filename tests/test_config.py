"""Parameters: the node's names, defaults and ranges; YAML + flags; one-line errors before any work."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import TrainConfig, parse_args
from trainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit  # the whole file: parsing only, no training run

NODE_DEFAULTS = dict(batch_size=1, grad_accumulation_steps=1, steps=16, learning_rate=0.0005, rank=8,
                     optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="bf16", lora_dtype="bf16",
                     algorithm="LoRA", gradient_checkpointing=True, existing_lora=None)


def test_defaults_are_the_nodes():
    cfg = parse_args([])
    assert {k: getattr(cfg, k) for k in NODE_DEFAULTS} == NODE_DEFAULTS


def test_flags_are_typed():
    cfg = parse_args(["--batch_size", "4", "--learning_rate", "1e-4", "--gradient_checkpointing", "false",
                      "--seed", str(2**64 - 1), "--optimizer", "sgd", "--existing_lora", "None"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.gradient_checkpointing) == (4, 1e-4, False)
    assert cfg.seed == 2**64 - 1 and cfg.optimizer == "SGD" and cfg.existing_lora is None


def test_yaml_then_flags_override(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("rank: 16\nsteps: 3\ngradient_checkpointing: false\nlearning_rate: 0.001\n")
    cfg = parse_args(["--config", str(file), "--steps", "5"])
    assert (cfg.rank, cfg.steps, cfg.gradient_checkpointing, cfg.learning_rate) == (16, 5, False, 0.001)


@pytest.mark.parametrize("argv, names", [
    (["--batch_size", "0"], "--batch_size"),
    (["--batch_size", "10001"], "--batch_size"),
    (["--grad_accumulation_steps", "1025"], "--grad_accumulation_steps"),
    (["--steps", "2.5"], "--steps"),
    (["--learning_rate", "2"], "--learning_rate"),
    (["--learning_rate", "nan"], "--learning_rate"),
    (["--rank", "129"], "--rank"),
    (["--rank", "eight"], "--rank"),
    (["--optimizer", "Adafactor"], "--optimizer"),
    (["--loss_function", "KL"], "--loss_function"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--training_dtype", "fp16"], "--training_dtype"),
    (["--algorithm", "DoRA"], "--algorithm"),
    (["--gradient_checkpointing", "maybe"], "--gradient_checkpointing"),
    (["--no_such_flag", "1"], "--no_such_flag"),
])
def test_bad_flag_values(argv, names):
    with pytest.raises(ConfigError, match=names):
        parse_args(argv)


def test_bad_yaml(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("rnak: 4\n")
    with pytest.raises(ConfigError, match="rnak"):
        parse_args(["--config", str(file)])
    file.write_text("steps: [1, 2]\n")
    with pytest.raises(ConfigError, match="--steps"):
        parse_args(["--config", str(file)])
    with pytest.raises(ConfigError, match="--config"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_library_rejects_unknown_parameter():
    with pytest.raises(ConfigError, match="learning_rte"):
        TrainConfig.from_mapping({"learning_rte": 1e-3})


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--rank", "0", "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rank" in lines[0] and "1..128" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_help_lists_every_parameter_with_default_and_range():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for name in TrainConfig.ORDER:
        assert f"--{name}" in text
    assert "default: 16; an integer in 1..100000" in text  # steps
    assert "one of AdamW, Adam, SGD, RMSprop" in text


def test_example_config_parses():
    cfg = parse_args(["--config", str(ROOT / "configs" / "example.yaml")])
    assert cfg.steps == 32 and cfg.alpha == 8.0


def test_missing_tracker_is_a_clear_error(monkeypatch):
    import accelerate.utils

    from trainer import TrainerError, train_lora

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(TrainerError, match="tensorboard is not installed"):
        train_lora(report_to="tensorboard", steps=1)


def test_choices_are_the_registries():
    """config.py lists the choices without importing torch (``--help`` stays instant); this ties each list
    to the registry that implements it, so a new optimizer, loss, algorithm or family cannot be offered
    without being implemented, or implemented without being offered."""
    from trainer.adapters import ALGORITHMS
    from trainer.losses import LOSSES
    from trainer.models import FAMILIES
    from trainer.models.precision import DTYPES, WEIGHT_DTYPES
    from trainer.optim import OPTIMIZERS

    choices = {f.name: f.metadata["choices"] for f in TrainConfig.parameters()}
    assert set(choices["optimizer"]) == set(OPTIMIZERS)
    assert set(choices["loss_function"]) == set(LOSSES)
    assert set(choices["algorithm"]) == set(ALGORITHMS)
    assert set(choices["model_family"]) == {"auto", *FAMILIES}
    assert tuple(choices["weight_dtype"]) == WEIGHT_DTYPES
    assert set(choices["training_dtype"]) <= set(DTYPES) and set(choices["lora_dtype"]) <= set(DTYPES)


def test_sections_hold_every_parameter_once_and_read_flat():
    """Each parameter lives in one section; ``cfg.<name>``, ``to_dict()`` and ``identity()`` read it by its
    flat name, as the YAML keys, the flags, checkpoints and the LoRA file's metadata do."""
    cfg = TrainConfig(rank=4, steps=3, sample_prompts=["a cat"])
    assert cfg.adapter.rank == cfg.rank == 4 and cfg.optimization.steps == cfg.steps == 3
    names = [f.name for cls in TrainConfig.SECTIONS.values() for f in dataclasses.fields(cls)]
    assert sorted(names) == sorted(TrainConfig.ORDER) and len(set(names)) == len(names)
    flat = cfg.to_dict()
    assert list(flat) == list(TrainConfig.ORDER) and flat["rank"] == 4 and flat["sample_prompts"] == ["a cat"]
    assert TrainConfig(**flat) == cfg  # a flat dict (e.g. a LoRA file's trainer_config) reads back
    assert set(cfg.identity()) == {f.name for f in TrainConfig.parameters() if f.metadata["identity"]}
    assert "steps" not in cfg.identity() and cfg.identity()["rank"] == 4
    changed = dataclasses.replace(cfg, batch_size=2)
    assert (changed.batch_size, changed.rank, cfg.batch_size) == (2, 4, 1)


def test_nested_yaml_is_accepted(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("adapter:\n  rank: 16\n  algorithm: loha\nsteps: 3\n")
    cfg = parse_args(["--config", str(file), "--rank", "4"])
    assert (cfg.rank, cfg.algorithm, cfg.steps) == (4, "LoHa", 3)
    file.write_text("adapter:\n  rnak: 16\n")
    with pytest.raises(ConfigError, match="adapter.rnak"):
        parse_args(["--config", str(file)])
    file.write_text("adapter: 16\n")
    with pytest.raises(ConfigError, match="adapter: expected a mapping"):
        parse_args(["--config", str(file)])


def test_sections_are_frozen_and_checked():
    from trainer.config import AdapterArgs

    with pytest.raises(ConfigError, match="--rank"):
        AdapterArgs(rank=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().adapter.rank = 4  # type: ignore[misc]
