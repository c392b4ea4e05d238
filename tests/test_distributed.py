"""Distributed runs on CPU (gloo), launched the way users launch them: the result does not depend on
how the global batch is split over processes, machines and accumulation steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_dataset
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch_configs"
# fp32 + SGD compare to float tolerance; 6 rows with a global batch of 4: epochs are cut and reshuffled
RUN = dict(training_dtype="fp32", lora_dtype="fp32", optimizer="SGD", learning_rate=0.05, steps=3,
           gradient_checkpointing=False, log_every=1, seed=11)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launch_args: list[str], out: Path, latents: Path, script: Path = ROOT / "train.py",
                   **params) -> list[str]:
    flags = [x for k, v in {**RUN, **params}.items() for x in (f"--{k}", str(v))]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(script), *flags,
            "--latents", str(latents), "--output_dir", str(out)]


def cpu_processes(n: int) -> list[str]:
    return ["--config_file", str(CONFIGS / "cpu.yaml"), "--num_processes", str(n),
            "--main_process_port", str(free_port())]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "latents"
    make_dataset(rows=6, seed=3).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, latents):
    """The run to match: 1 process x batch 4."""
    from trainer import train_lora

    out = tmp_path_factory.mktemp("reference")
    res = train_lora("demo", str(latents), output_dir=str(out), batch_size=4, **RUN)
    return load_file(str(res.lora_path)), res.loss["loss"]


def max_relative_difference(out: Path, reference) -> float:
    lora, losses = reference
    got = load_file(str(out / "lora.safetensors"))
    assert set(got) == set(lora)
    logged = json.loads((out / "loss.json").read_text())["loss"]
    assert logged == pytest.approx(losses, rel=1e-5)  # the logged loss is the mean over all processes
    return max(((got[k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item() for k, v in lora.items())


def test_accumulation_equals_one_process_batch_4(tmp_path, latents, reference):
    """1 process x batch 2 x 2 accumulation steps."""
    proc = subprocess.run(launch_command(cpu_processes(1), tmp_path, latents, batch_size=2,
                                         grad_accumulation_steps=2), capture_output=True, text=True, timeout=240,
                          env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    difference = max_relative_difference(tmp_path, reference)
    print(f"max relative difference to 1 process x batch 4: {difference:.2e}")
    assert difference < 1e-5


def test_two_processes_equal_one_process(tmp_path, latents, reference):
    """2 processes x batch 2; only the main process writes files and prints the summary."""
    proc = subprocess.run(launch_command(cpu_processes(2), tmp_path, latents, batch_size=2), capture_output=True,
                          text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    difference = max_relative_difference(tmp_path, reference)
    print(f"max relative difference to 1 process x batch 4: {difference:.2e}")
    assert difference < 1e-5
    assert proc.stdout.count("trained 3 steps") == 1


def test_two_machines_over_loopback_equal_one_process(tmp_path, latents, reference):
    """Two "machines" (--num_machines 2, --machine_rank 0/1) of one process each, over 127.0.0.1."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        args = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "static",
                "--mixed_precision", "no"]
        procs.append(subprocess.Popen(launch_command(args, tmp_path, latents, batch_size=2), env=ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    difference = max_relative_difference(tmp_path, reference)
    print(f"max relative difference to 1 process x batch 4: {difference:.2e}")
    assert difference < 1e-5


# the main rank failing in the default run, the other rank with -m slow (the default run stays near 5 minutes)
@pytest.mark.parametrize("fail_rank", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_failing_rank_ends_every_rank(tmp_path, latents, fail_rank):
    started = time.time()
    proc = subprocess.run(launch_command(cpu_processes(2), tmp_path, latents, script=Path(__file__).parent /
                                         "failing_rank.py", batch_size=2, steps=50),
                          capture_output=True, text=True, timeout=180, env={**ENV, "FAIL_RANK": str(fail_rank)})
    assert proc.returncode != 0
    assert f"injected failure on rank {fail_rank}" in proc.stderr
    assert time.time() - started < 120
    assert not (tmp_path / "lora.safetensors").exists()


def test_every_launch_config_loads_with_accelerates_own_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu": "NO", "cpu": "MULTI_GPU", "multi_gpu": "MULTI_GPU", "multi_node": "MULTI_GPU",
                "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}
    for name, kind in expected.items():
        config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert config.distributed_type.value == kind, name
    assert load_config_from_file(str(CONFIGS / "multi_node.yaml")).num_machines == 2
    slurm = (CONFIGS / "slurm.sbatch").read_text()
    assert "srun" in slurm and "accelerate launch" in slurm and "--machine_rank \\$SLURM_NODEID" in slurm


def test_sigterm_stops_every_rank_together_with_a_checkpoint(tmp_path, latents):
    """Preemption under the launcher: torchrun passes SIGTERM on to every rank; they agree on the step,
    save one full checkpoint and the adapter, and a resumed run finishes from there."""
    import signal

    from safetensors import safe_open

    out = tmp_path / "out"
    cmd = launch_command(cpu_processes(2), out, latents, batch_size=1, steps=100000, checkpointing_steps=5)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step-00000005").exists() and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        steps = int(f.metadata()["ss_steps"])
    assert steps >= 5, err[-2000:]
    saved = json.loads((out / "checkpoints" / f"step-{steps:08d}" / "progress.json").read_text())
    assert saved["done"] == steps and len(saved["losses"]) == steps
    resumed = subprocess.run(launch_command(cpu_processes(2), out, latents, batch_size=1, steps=steps + 2,
                                            resume_from_checkpoint="latest"),
                             capture_output=True, text=True, timeout=240, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "result.json").read_text())["steps"] == steps + 2
