"""Faults a user meets (issue 12): the run fails before training, and never loses, mixes or silently
replaces a result. One test (or a few) per item of the issue, numbered as there."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, make_dataset
from safetensors import safe_open
from safetensors.torch import save_file

from trainer import ConfigError, TrainerError, train_lora
from trainer.demo import build_demo_model

ROOT = Path(__file__).resolve().parents[1]
RESUME = dict(FAST, optimizer="AdamW", learning_rate=0.01, batch_size=2, steps=6)


class Usage:
    def __init__(self, free):
        self.free = free


def steps_of(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["ss_steps"])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: proves an error came before any expensive work."""
    import trainer.loop

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the fault was found")

    monkeypatch.setattr(trainer.loop, "load_model", refuse)


def _mount_tmpfs(path: Path, options: str) -> bool:
    """Mount a small tmpfs at ``path`` where this machine allows it (root in a container, say)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only_folder(tmp_path: Path):
    """A folder nobody may write in: a read-only tmpfs as root (root ignores permission bits), else
    permission bits."""
    folder = tmp_path / "read-only"
    if _mount_tmpfs(folder, "ro,size=1m"):
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    if os.name == "posix" and os.geteuid() == 0:
        pytest.fail("running as root without mount: cannot make a read-only folder")
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------- 1


def test_1_output_dir_that_is_a_file_fails_before_the_model_loads(tmp_path, no_model_load):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(TrainerError, match="is a file, not a folder"):
        train_lora("demo", make_dataset(), output_dir=str(a_file), **FAST)
    with pytest.raises(TrainerError, match="cannot create"):
        train_lora("demo", make_dataset(), output_dir=str(a_file / "sub"), **FAST)


def test_1_read_only_output_dir_fails_before_the_model_loads(tmp_path, no_model_load):
    with read_only_folder(tmp_path) as folder, pytest.raises(TrainerError, match="cannot (write in|create)"):
        train_lora("demo", make_dataset(), output_dir=str(folder / "out"), **FAST)


def test_1_full_disk_is_found_at_start_up(tmp_path, monkeypatch):
    """A disk without room for the adapter and its checkpoints: refused before training, in one line.
    A real 256 KiB tmpfs where this machine can mount one, else a file system reporting 64 KiB free."""
    import trainer.loop

    folder = tmp_path / "small"
    mounted = _mount_tmpfs(folder, "size=256k")
    if not mounted:
        folder.mkdir()
        monkeypatch.setattr("trainer.rundir.shutil.disk_usage", lambda p: Usage(free=1 << 16))
    trained = []
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: trained.append(1))
    try:
        with pytest.raises(TrainerError, match=r"MiB free but this run will write about .* checkpoints") as err:
            train_lora("demo", make_dataset(), output_dir=str(folder), checkpointing_steps=1, **FAST)
        assert "\n" not in str(err.value) and not trained
        assert not (folder / "lora.safetensors").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_1_a_failed_final_write_keeps_the_trained_adapter(tmp_path, monkeypatch):
    """ENOSPC when the adapter is written: one line, and the adapter is saved in the temp folder."""
    import trainer.loop

    out = tmp_path / "out"
    real = trainer.loop.save_adapter_file

    def full_disk(path, tensors, metadata):
        if Path(path).parent == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, tensors, metadata)

    monkeypatch.setattr(trainer.loop, "save_adapter_file", full_disk)
    with pytest.raises(TrainerError, match="No space left on device") as err:
        train_lora("demo", make_dataset(), output_dir=str(out), **FAST)
    message = str(err.value)
    assert "\n" not in message and str(out / "lora.safetensors") in message
    rescued = Path(message.split("saved to ")[1].split(" instead")[0])
    assert steps_of(rescued) == 2
    shutil.rmtree(rescued.parent)


def test_1_a_failed_checkpoint_write_stops_and_keeps_the_adapter(tmp_path, monkeypatch):
    import trainer.checkpoint

    real = trainer.checkpoint.write_json

    def fill_up(path, data):
        if Path(path).parent.name == ".tmp-step-00000002":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(trainer.checkpoint, "write_json", fill_up)
    with pytest.raises(TrainerError, match=r"checkpoint at step 2: cannot write .*No space left on device; "
                                           r"stopped \(the last complete checkpoint is .*step-00000001\)"):
        train_lora("demo", make_dataset(), output_dir=str(tmp_path), checkpointing_steps=1, **dict(FAST, steps=4))
    assert steps_of(tmp_path / "lora.safetensors") == 2  # what was trained is kept
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]  # no half one


def test_1_a_disk_that_fills_up_mid_run_loses_nothing(tmp_path, monkeypatch):
    """A real full disk (a 32 MiB tmpfs, filled by another writer after step 1): one line, the step-1
    checkpoint kept, the trained adapter saved in the temp folder. Needs a machine that can mount."""
    import trainer.loop

    folder = tmp_path / "disk"
    if not _mount_tmpfs(folder, "size=32m"):
        pytest.skip("mounting a tmpfs is not allowed here; the injected faults above cover the same paths")
    real, calls = trainer.loop.train_step, []

    def fill_after_step_1(*args):
        calls.append(1)
        if len(calls) == 2:
            with (folder / "filler").open("wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
        return real(*args)

    monkeypatch.setattr(trainer.loop, "train_step", fill_after_step_1)
    try:
        with pytest.raises(TrainerError, match="No space left on device") as err:
            train_lora("demo", make_dataset(), output_dir=str(folder), checkpointing_steps=1, **dict(FAST, steps=3))
        message = str(err.value)
        assert "\n" not in message and "step-00000001" in message
        rescued = Path(message.split("saved to ")[1].split(" instead")[0])
        assert steps_of(rescued) >= 1
        shutil.rmtree(rescued.parent)
        assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-00000001"]
        assert not list(folder.rglob("*.tmp"))  # no temporary left behind
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# ---------------------------------------------------------------------------------------------- 2


def test_2_latest_never_resumes_another_run(tmp_path, caplog):
    out = str(tmp_path)
    train_lora("demo", make_dataset(), output_dir=out, checkpointing_steps=2, **dict(FAST, steps=4, seed=0))
    with caplog.at_level(logging.WARNING):
        other = train_lora("demo", make_dataset(), output_dir=out, resume_from_checkpoint="latest",
                           **dict(FAST, steps=3, seed=1, rank=4))
    assert other.steps == 3 and other.loss["step"] == [1, 2, 3]  # trained from scratch
    fresh = train_lora("demo", make_dataset(), **dict(FAST, steps=3, seed=1, rank=4))
    for key, value in fresh.lora.items():
        torch.testing.assert_close(other.lora[key], value, rtol=0, atol=0)
    assert "belongs to another run (rank 8 there, 4 now; seed 0 there, 1 now)" in caplog.text
    assert "starting from scratch" in caplog.text
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_seed"] == "1" and f.metadata()["ss_steps"] == "3"


def test_2_explicit_checkpoint_of_another_run(tmp_path):
    out = str(tmp_path)
    train_lora("demo", make_dataset(), output_dir=out, checkpointing_steps=2, **dict(FAST, steps=2))
    ckpt = str(tmp_path / "checkpoints" / "step-00000002")
    with pytest.raises(TrainerError, match=r"checkpoint of another run: learning_rate 0.0005 there, 0.001 now"):
        train_lora("demo", make_dataset(), output_dir=out, resume_from_checkpoint=ckpt,
                   **dict(FAST, steps=3, learning_rate=0.001))
    # only steps/logging/checkpointing changed: the same run, resumed
    res = train_lora("demo", make_dataset(), output_dir=out, resume_from_checkpoint=ckpt,
                     **dict(FAST, steps=3, log_every=2))
    assert res.loss["step"] == [1, 2, 3]


def test_2_identity_is_every_parameter_that_changes_the_result():
    from trainer.config import TrainConfig

    identity = TrainConfig().identity()
    assert {"seed", "rank", "alpha", "learning_rate", "model", "latents", "algorithm", "batch_size"} <= set(identity)
    assert not {"steps", "output_dir", "output_name", "log_every", "checkpointing_steps",
                "checkpoints_total_limit", "resume_from_checkpoint"} & set(identity)


# ---------------------------------------------------------------------------------------------- 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_lora("demo", make_dataset(rows=6), output_dir=str(tmp_path_factory.mktemp("whole")), **RESUME)


@pytest.mark.parametrize("damage", ["adapter", "optimizer", "progress"])
def test_3_latest_falls_back_past_a_corrupt_checkpoint(tmp_path, uninterrupted, damage, caplog):
    ds = make_dataset(rows=6)
    train_lora("demo", ds, output_dir=str(tmp_path), checkpointing_steps=2, **dict(RESUME, steps=4))
    newest = tmp_path / "checkpoints" / "step-00000004"
    if damage == "progress":
        (newest / "progress.json").write_text("{garbage")
    else:
        file = newest / ("adapter.safetensors" if damage == "adapter" else "optimizer.bin")
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        resumed = train_lora("demo", ds, output_dir=str(tmp_path), resume_from_checkpoint="latest", **RESUME)
    assert f"skipping checkpoint {newest}" in caplog.text
    assert resumed.loss["step"] == [1, 2, 3, 4, 5, 6]
    for key, value in uninterrupted.lora.items():  # equal to a run never interrupted
        torch.testing.assert_close(resumed.lora[key], value, rtol=0, atol=0)
    assert resumed.loss["loss"] == uninterrupted.loss["loss"]


# ---------------------------------------------------------------------------------------------- 4


def test_4_nan_at_the_first_step_leaves_the_earlier_lora_alone(tmp_path):
    train_lora("demo", make_dataset(), output_dir=str(tmp_path), **FAST)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    exploding = make_dataset(rows=2).map(lambda row: {**row, "latents": [[[1e25] * 16] * 16] * 4})
    with pytest.raises(TrainerError, match="at step 1; stopped, nothing was trained, so no file was written"):
        train_lora("demo", exploding, output_dir=str(tmp_path), **dict(FAST, batch_size=1))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before and not (tmp_path / "earlier-runs").exists()


def test_4_a_second_run_into_the_folder_moves_the_first_aside(tmp_path, caplog):
    first = train_lora("demo", make_dataset(), output_dir=str(tmp_path), checkpointing_steps=2, **FAST)
    first_bytes = (tmp_path / "lora.safetensors").read_bytes()
    with caplog.at_level(logging.WARNING):
        second = train_lora("demo", make_dataset(), output_dir=str(tmp_path), **dict(FAST, seed=5))
    (aside,) = (tmp_path / "earlier-runs").iterdir()
    assert f"moved them to {aside}" in caplog.text
    assert (aside / "lora.safetensors").read_bytes() == first_bytes
    assert {p.name for p in aside.iterdir()} == {"lora.safetensors", "loss.json", "loss.png", "result.json",
                                                "checkpoints"}
    assert not (tmp_path / "checkpoints").exists()  # never mixed with the new run's
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == second.steps
    assert first.steps == second.steps == 2


def test_4_a_run_into_a_folder_in_use_is_refused_at_once(tmp_path, no_model_load):
    from trainer.rundir import run_lock

    with run_lock(tmp_path), pytest.raises(TrainerError, match=rf"{tmp_path} is in use by another run \(pid "):
        train_lora("demo", make_dataset(), output_dir=str(tmp_path), **FAST)


def test_4_the_lock_is_released_on_any_exit_and_never_stale(tmp_path):
    from trainer.rundir import run_lock

    with pytest.raises(TrainerError):  # a run that fails releases it
        train_lora("demo", make_dataset(channels=3), output_dir=str(tmp_path), **FAST)
    with run_lock(tmp_path):
        pass
    # a process killed while it holds the lock (SIGKILL: no clean-up at all) leaves no stale lock
    code = ("import sys, time; from trainer.rundir import run_lock\n"
            f"with run_lock({str(tmp_path)!r}):\n print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(TrainerError, match="in use by another run"), run_lock(tmp_path):
        pass
    holder.kill()
    holder.wait()
    with run_lock(tmp_path):
        pass


# ---------------------------------------------------------------------------------------------- 5


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_5_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        train_lora("demo", make_dataset(), output_dir=str(tmp_path), checkpointing_steps=2, **FAST)
    finally:
        os.umask(previous)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]
    assert len(files) >= 8 and {p.name for p in files} >= {"lora.safetensors", "adapter.safetensors", "result.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


# ---------------------------------------------------------------------------------------------- 6


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "a\\b", ""])
def test_6_output_name_is_a_plain_file_name(name):
    from trainer.config import TrainConfig

    with pytest.raises(ConfigError, match="--output_name: expected a plain file name"):
        TrainConfig(output_name=name)
    assert TrainConfig(output_name="my.style-v2").output_name == "my.style-v2"


# ---------------------------------------------------------------------------------------------- 7


@pytest.mark.parametrize("form", ["save_to_disk", "parquet", "in-memory"])
def test_7_an_empty_dataset_says_so_naming_the_path(tmp_path, form):
    from trainer.data import TrainingData, open_dataset
    from trainer.models import get_family

    empty = make_dataset(rows=1).select([])
    path = tmp_path / "empty"
    if form == "save_to_disk":
        empty.save_to_disk(str(path))
    elif form == "parquet":
        path = tmp_path / "empty.parquet"
        empty.to_parquet(str(path))
    named = f"{path} " if form != "in-memory" else ""
    with pytest.raises(TrainerError, match=f"--latents: the dataset {named}has no rows"):
        if form == "in-memory":
            TrainingData(empty, None, get_family("sd"), build_demo_model())
        else:
            open_dataset(str(path), "--latents")


# ---------------------------------------------------------------------------------------------- 8


def test_8_oft_alpha_0_means_no_constraint():
    res = train_lora("demo", make_dataset(), algorithm="OFT", rank=4, alpha=0, learning_rate=1e-2, **FAST)
    alphas = {float(t) for k, t in res.lora.items() if k.endswith(".alpha")}
    assert alphas == {0.0}
    with pytest.raises(ConfigError, match="--alpha: 0 would scale the LoRA update to nothing"):
        train_lora("demo", make_dataset(), alpha=0, **FAST)


# ---------------------------------------------------------------------------------------------- 9


def test_9_the_library_call_leaves_signals_to_its_caller(monkeypatch, tmp_path):
    import trainer.loop

    real = trainer.loop.train_step

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in a notebook, during the first step
        time.sleep(0.1)
        return real(*args)

    monkeypatch.setattr(trainer.loop, "train_step", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train_lora("demo", make_dataset(), **dict(FAST, steps=4))
    assert signal.getsignal(signal.SIGINT) is handler
    stopped = train_lora("demo", make_dataset(), handle_signals=True, output_dir=str(tmp_path),
                         **dict(FAST, steps=4))
    assert stopped.stopped == "preempted" and stopped.steps == 1
    assert (tmp_path / "checkpoints" / "step-00000001").is_dir()  # the signal's checkpoint
    assert signal.getsignal(signal.SIGINT) is handler


# ---------------------------------------------------------------------------------------------- 10


def test_10_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--output_dir", str(tmp_path / "o")],
                            cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.5)  # importing torch and diffusers, or loading the model
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    # (torch may log its own INFO statistics at exit after it)
    assert "train.py: interrupted before training started; nothing was written" in stderr.splitlines()


# ---------------------------------------------------------------------------------------------- 11


def test_11_the_readme_launch_command_prints_one_line_for_a_bad_value(tmp_path):
    """The README's command, word for word, with a bad value: our line alone (no launcher warning, no
    CalledProcessError traceback), exit code 1 (the launcher's for any failure)."""
    readme = (ROOT / "README.md").read_text()
    command = "accelerate launch -q --config_file launch_configs/single_gpu.yaml train.py"
    assert command in readme
    result = subprocess.run([*command.split(), "--rank", "0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1
    assert (result.stdout + result.stderr).strip() == "train.py: error: --rank: expected an integer in 1..128, got '0'"


# ---------------------------------------------------------------------------------------------- 12


def _attention_modules(model):
    return {name: module for name, module in model.named_modules()
            if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}


def test_12_lycoris_oft_is_continued_with_lycoris_limit(tmp_path, caplog):
    """A diag-OFT file made by LyCORIS with constraint c: LyCORIS clips each layer's skew norm at
    c x out_features, ComfyUI at c. Continuing it keeps LyCORIS's meaning."""
    from test_algorithms import output, reference_merge

    constraint, g = 1e-3, torch.Generator().manual_seed(0)
    lora, lycoris_view = {}, {}
    for name, module in _attention_modules(build_demo_model()).items():
        out = module.weight.shape[0]
        blocks = torch.randn(out // 4, 4, 4, generator=g)
        q_norm = (blocks - blocks.transpose(1, 2)).norm()
        blocks *= 0.5 * constraint * out / q_norm  # within LyCORIS's limit, far above ComfyUI's reading
        key = "lora_unet_" + name.replace(".", "_")
        lora.update({f"{key}.oft_blocks": blocks, f"{key}.alpha": torch.tensor(constraint)})
        lycoris_view.update({f"{key}.oft_blocks": blocks, f"{key}.alpha": torch.tensor(constraint * out)})
    path = tmp_path / "lycoris_oft.safetensors"
    save_file(lora, path, metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(
        {"algo": "diag-oft", "constraint": str(constraint)}), "ss_steps": "100"})
    with caplog.at_level(logging.INFO):
        more = train_lora("demo", make_dataset(), existing_lora=str(path), learning_rate=1e-7,
                          **dict(FAST, steps=1, optimizer="SGD"))
    assert "written by LyCORIS" in caplog.text and more.steps == 101
    base = output(build_demo_model())
    lycoris, comfy = output(reference_merge(lycoris_view)) - base, output(reference_merge(lora)) - base
    assert comfy.norm() < 0.1 * lycoris.norm()  # the other reading loses over 90% of the change
    torch.testing.assert_close(output(more.model_with_lora) - base, lycoris, atol=1e-5, rtol=1e-3)


def test_12_lokr_decompose_both_is_continued(tmp_path):
    """LyCORIS decompose_both: w1 = w1_a @ w1_b and w2 = w2_a @ w2_b. Continued as it is."""
    from test_algorithms import output, reference_merge

    g, lora = torch.Generator().manual_seed(0), {}
    for name, module in _attention_modules(build_demo_model()).items():
        out, inp = module.weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        shapes = {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (out // 4, 1), "lokr_w2_b": (1, inp // 4)}
        lora.update({f"{key}.{k}": 0.3 * torch.randn(shape, generator=g) for k, shape in shapes.items()})
        lora[f"{key}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "lokr_both.safetensors"
    save_file(lora, path, metadata={"ss_network_module": "lycoris.kohya",
                                    "ss_network_args": json.dumps({"algo": "lokr", "decompose_both": "True"})})
    more = train_lora("demo", make_dataset(), existing_lora=str(path), learning_rate=1e-7,
                      output_dir=str(tmp_path / "out"), **dict(FAST, steps=1, optimizer="SGD"))
    assert set(more.lora) == set(lora)  # written back with the file's factors
    torch.testing.assert_close(output(more.model_with_lora), output(reference_merge(lora)), atol=1e-4, rtol=0)
    assert sum(p.numel() for p in more.model_with_lora.parameters() if p.requires_grad) == sum(
        t.numel() for k, t in lora.items() if not k.endswith(".alpha"))  # every factor trained


def test_12_a_refusal_names_the_file_the_module_and_the_reason(tmp_path):
    lora = {}
    for name, module in _attention_modules(build_demo_model()).items():
        key = "lora_unet_" + name.replace(".", "_")
        lora[f"{key}.oft_blocks"] = torch.zeros(module.weight.shape[0] // 4, 4, 4)
        lora[f"{key}.rescale"] = torch.ones(module.weight.shape[0], 1)
    save_file(lora, tmp_path / "rescaled_oft.safetensors")
    with pytest.raises(TrainerError, match=r"--existing_lora: rescaled_oft.safetensors, module "
                                           r"down_blocks\.\S+: it is a rescaled OFT .* cannot continue"):
        train_lora("demo", make_dataset(), existing_lora=str(tmp_path / "rescaled_oft.safetensors"), **FAST)
