"""Full-state checkpoints: accelerate's ``save_state``/``load_state`` with hooks that keep only the
adapter (never the frozen model), plus the run's progress, written atomically. Under FSDP and
DeepSpeed, whose own formats hold the (sharded) model and optimizer state, accelerate saves those
as it does and the hooks add only the progress.

Layout: ``<output_dir>/checkpoints/step-00000004/`` holding accelerate's files (optimizer, RNG
states), ``adapter.safetensors`` (peft's state dict, fp32) and ``progress.json`` (steps done, the
continued file's steps, the losses so far). ``progress.json`` is read for the step count: folder
names are only labels.

Each checkpoint records the run's identity (the parameters that change the result, see
``identity`` in config.py, and the number of processes). ``--resume_from_checkpoint`` continues only a
checkpoint of the same run: ``latest`` skips other runs' checkpoints (and starts fresh, with a warning,
when none is left) and falls back past checkpoints that cannot be loaded, naming them; an explicit path
of another run is an error naming the parameters that differ.

Why not accelerate's ``automatic_checkpoint_naming``/``total_limit``: it writes in place (a crash
mid-save leaves a half checkpoint that "latest" would then pick) and numbers folders by save count,
not by step. Here each checkpoint is written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from .adapters import ADAPTER_NAME
from .compat import unwrap
from .distributed import shards_the_model
from .errors import TrainerError
from .outputs import save_adapter_file, umask_modes, write_failure, write_json

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
ADAPTER_FILE = "adapter.safetensors"
OFFSETS_FILE = "offsets.safetensors"


@dataclass
class Progress:
    """Where a run stands: saved in every checkpoint and restored on resume. Its values change only
    through the methods below (the loop's :class:`~trainer.loop.Trainer`, the held-out loss of
    :class:`~trainer.watch.Watch` and a checkpoint's load call them)."""

    #: optimizer steps done in this run (``--steps`` counts these)
    done: int = 0
    #: steps of the continued ``existing_lora`` file, added to every reported step number
    base: int = 0
    #: per-step losses of the steps done so far
    losses: list[float] = field(default_factory=list)
    #: what makes this run this run (:func:`run_identity`); a checkpoint resumes only the same run
    identity: dict[str, Any] = field(default_factory=dict)
    #: held-out losses so far and the (total) steps they were taken at
    eval_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.base + self.done

    def advance(self) -> None:
        """One optimizer step done (its loss is added later, when it is read back: :meth:`add_losses`)."""
        self.done += 1

    def add_losses(self, losses: list[float]) -> None:
        self.losses.extend(losses)

    def roll_back(self, done: int) -> None:
        """Forget the steps after ``done`` (their losses too): the adapter went back to that step."""
        del self.losses[done:]
        self.done = done

    def add_eval(self, step: int, loss: float) -> None:
        self.eval_steps.append(step)
        self.eval_losses.append(loss)

    def load(self, saved: dict[str, Any]) -> None:
        """Take the values of a saved progress (a checkpoint's ``progress.json``, or :func:`asdict` of one);
        the identity stays this run's."""
        self.done, self.base, self.losses = saved["done"], saved["base"], list(saved["losses"])
        self.eval_losses, self.eval_steps = list(saved.get("eval_losses", [])), list(saved.get("eval_steps", []))


def register_adapter_hooks(accelerator, progress: Progress, offsets=None) -> None:
    """Make ``save_state``/``load_state`` store the adapter, the trained full offsets (an
    :class:`~trainer.adapters.targets.Offsets`, if any) and the progress instead of the whole model."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            write_json(Path(output_dir, PROGRESS_FILE), asdict(progress))
        if shards_the_model(accelerator):
            return  # FSDP/DeepSpeed write the model and optimizer state their own way
        if accelerator.is_main_process:
            model = unwrap(accelerator, models[0])
            state = {k: v.detach().float().contiguous().cpu()
                     for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
            save_adapter_file(Path(output_dir, ADAPTER_FILE), state)
            if offsets is not None and offsets.params:
                save_adapter_file(Path(output_dir, OFFSETS_FILE), offsets.state_dict())
        weights.clear()  # nothing else of the model: its frozen weights are the base model's

    def load_hook(models, input_dir):
        progress.load(json.loads(Path(input_dir, PROGRESS_FILE).read_text()))
        if shards_the_model(accelerator):
            return  # FSDP/DeepSpeed restore the model from their own checkpoint
        from safetensors.torch import load_file

        model = unwrap(accelerator, models[0])
        state = load_file(str(Path(input_dir, ADAPTER_FILE)))  # load_state_dict copies to the device
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise TrainerError(f"--resume_from_checkpoint: {input_dir} holds an adapter for other modules "
                               f"({result.unexpected_keys[:3]}...)")
        if offsets is not None and offsets.params:
            offsets.load_state_dict(load_file(os.path.join(input_dir, OFFSETS_FILE)))
        models.clear()  # the adapter is loaded; accelerate must not look for a full model file

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(steps done, folder) of every complete checkpoint whose progress can be read, oldest first."""
    return sorted((saved["done"], folder) for folder, saved in _scan(output_dir) if saved is not None)


def _scan(output_dir: str | Path) -> list[tuple[Path, dict | None]]:
    """(folder, its progress or None when unreadable) of every checkpoint folder with a progress file."""
    found = []
    for folder in sorted(checkpoints_dir(output_dir).glob("step-*")):
        if folder.is_dir() and (folder / PROGRESS_FILE).is_file():
            try:
                found.append((folder, read_progress(folder)))
            except TrainerError:
                found.append((folder, None))
    return found


def read_progress(folder: Path) -> dict:
    """The checkpoint's progress.json; TrainerError if missing or garbage."""
    try:
        saved = json.loads((folder / PROGRESS_FILE).read_text())
        if isinstance(saved, dict) and isinstance(saved.get("done"), int) and isinstance(saved.get("losses"), list):
            return saved
        problem = "not a progress record"
    except FileNotFoundError:
        raise TrainerError(f"--resume_from_checkpoint: {folder} is not a complete checkpoint folder "
                           f"(expected {PROGRESS_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = str(e)
    raise TrainerError(f"--resume_from_checkpoint: {folder / PROGRESS_FILE} is unreadable ({problem})")


def run_identity(cfg, num_processes: int) -> dict[str, Any]:
    """The values that make two runs the same run: the identity parameters of ``cfg`` (a TrainConfig)
    and the number of processes (the sampler's data order depends on it), as JSON would store them."""
    return json.loads(json.dumps({**cfg.identity(), "num_processes": num_processes}))


def identity_differences(saved: dict | None, current: dict[str, Any]) -> list[str]:
    """``name: <there> here <now>`` for each identity value that differs. A parameter added to the
    trainer after the checkpoint was written counts as its default there."""
    from .config import TrainConfig

    if not saved:
        return ["it records no run identity (written by an older version of this trainer)"]
    defaults = {f.name: f.default for f in TrainConfig.parameters()}
    differ = []
    for name, value in current.items():
        old = saved.get(name, defaults.get(name, "(not recorded)"))
        if old != value:
            differ.append(f"{name} {old} there, {value} now")
    return differ


def save_checkpoint(accelerator, output_dir: str | Path, progress: Progress, total_limit: int | None) -> Path:
    """Save the full state (every process takes part), then rename it into place and prune old ones."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{progress.done:08d}"
    tmp = root / f".tmp-step-{progress.done:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a half checkpoint only takes the space a retry needs
        failed = write_failure(e, tmp)
        if failed is None or failed is e:
            raise
        raise failed from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        umask_modes(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if total_limit is not None:
            for _, old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, spec: str | None, output_dir: str | Path, progress: Progress,
           params: list[torch.nn.Parameter], optimizer) -> Path | None:
    """Load the checkpoint ``--resume_from_checkpoint`` names (``latest`` or a path) into the prepared
    model, optimizer and ``progress``; return its folder, or None to start fresh.

    ``latest`` takes the newest checkpoint of this run (same ``progress.identity``) that loads: other
    runs' checkpoints are skipped with a warning naming what differs, broken ones with a warning
    naming them; with none left the run starts from scratch (so the same command can be re-run after
    a preemption). An explicit path must be a loadable checkpoint of this run, else TrainerError.
    """
    if spec is None:
        return None
    if spec != "latest":
        path = Path(spec)
        differ = identity_differences(read_progress(path).get("identity"), progress.identity)
        if differ:
            raise TrainerError(f"--resume_from_checkpoint: {path} is a checkpoint of another run: "
                               f"{'; '.join(differ)}")
        problem = _try_load(accelerator, path, progress, params, optimizer)
        if problem:
            raise TrainerError(f"--resume_from_checkpoint: cannot load {path}: {problem}")
        return path
    mine = []
    for folder, saved in _scan(output_dir):
        if saved is None:
            logger.warning("skipping checkpoint %s: its %s is unreadable", folder, PROGRESS_FILE)
            continue
        differ = identity_differences(saved.get("identity"), progress.identity)
        if differ:
            logger.warning("skipping checkpoint %s: it belongs to another run (%s)", folder, "; ".join(differ))
            continue
        mine.append((saved["done"], folder))
    for _, folder in sorted(mine, reverse=True):
        problem = _try_load(accelerator, folder, progress, params, optimizer)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint %s: it cannot be loaded (%s); trying an older one", folder, problem)
    logger.warning("no checkpoint of this run in %s: starting from scratch", checkpoints_dir(output_dir))
    return None


def _try_load(accelerator, folder: Path, progress: Progress, params, optimizer) -> str | None:
    """Load ``folder`` on every process; on a failure anywhere put everything back as it was and
    return the reason (every process agrees, so all resume the same checkpoint or none)."""
    sharded = shards_the_model(accelerator)
    # FSDP/DeepSpeed hold sharded state whose copy takes collectives: no rollback there (below)
    before = None if sharded else (snapshot(params), copy.deepcopy(optimizer.state_dict()), asdict(progress),
                                   _rng_states())
    problem = None
    try:
        accelerator.load_state(str(folder))
    except Exception as e:  # torch.load, safetensors, pickle and json raise many types for a broken file
        problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if sharded:
            raise TrainerError(f"--resume_from_checkpoint: cannot load {folder} ({problem}); under FSDP/DeepSpeed "
                               "a partly loaded state cannot be rolled back: move that checkpoint away and "
                               "run again") from None
    failed = torch.tensor(float(problem is not None), device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item() == 0:
        return None
    weights, optimizer_state, saved_progress, rng = before
    restore(params, weights)
    optimizer.load_state_dict(optimizer_state)
    progress.load(saved_progress)
    _set_rng_states(rng)
    return problem or "it failed to load on another process"


def _rng_states() -> tuple:
    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _set_rng_states(states: tuple) -> None:
    import numpy as np

    cpu, cuda, numpy_state, python_state = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """A copy of the adapter weights on their device (to roll back to after a NaN/inf loss)."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, s in zip(params, saved):
        p.copy_(s)
