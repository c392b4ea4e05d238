"""Full-state checkpoints: accelerate's ``save_state``/``load_state`` with hooks that keep only the
adapter (never the frozen model), plus the run's progress, written atomically. Under FSDP and
DeepSpeed, whose own formats hold the (sharded) model and optimizer state, accelerate saves those
as it does and the hooks add only the progress.

Layout: ``<output_dir>/checkpoints/step-00000004/`` holding accelerate's files (optimizer, RNG
states), ``adapter.safetensors`` (peft's state dict, fp32) and ``progress.json`` (steps done, the
continued file's steps, the losses so far). ``progress.json`` is read for the step count: folder
names are only labels.

Why not accelerate's ``automatic_checkpoint_naming``/``total_limit``: it writes in place (a crash
mid-save leaves a half checkpoint that "latest" would then pick) and numbers folders by save count,
not by step. Here each checkpoint is written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from .adapters import ADAPTER_NAME
from .distributed import shards_the_model
from .errors import TrainerError

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
ADAPTER_FILE = "adapter.safetensors"
OFFSETS_FILE = "offsets.safetensors"


@dataclass
class Progress:
    """Where a run stands: saved in every checkpoint and restored on resume."""

    #: optimizer steps done in this run (``--steps`` counts these)
    done: int = 0
    #: steps of the continued ``existing_lora`` file, added to every reported step number
    base: int = 0
    #: per-step losses of the steps done so far
    losses: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.base + self.done


def register_adapter_hooks(accelerator, progress: Progress, offsets=None) -> None:
    """Make ``save_state``/``load_state`` store the adapter, the trained full offsets (an
    :class:`~trainer.adapters.targets.Offsets`, if any) and the progress instead of the whole model."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            Path(output_dir, PROGRESS_FILE).write_text(json.dumps(asdict(progress)))
        if shards_the_model(accelerator):
            return  # FSDP/DeepSpeed write the model and optimizer state their own way
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            model = accelerator.unwrap_model(models[0], keep_torch_compile=False)
            state = {k: v.detach().float().contiguous().cpu()
                     for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
            save_file(state, os.path.join(output_dir, ADAPTER_FILE))
            if offsets is not None and offsets.params:
                save_file(offsets.state_dict(), os.path.join(output_dir, OFFSETS_FILE))
        weights.clear()  # nothing else of the model: its frozen weights are the base model's

    def load_hook(models, input_dir):
        saved = json.loads(Path(input_dir, PROGRESS_FILE).read_text())
        progress.done, progress.base, progress.losses = saved["done"], saved["base"], saved["losses"]
        if shards_the_model(accelerator):
            return  # FSDP/DeepSpeed restore the model from their own checkpoint
        from safetensors.torch import load_file

        model = accelerator.unwrap_model(models[0], keep_torch_compile=False)
        state = load_file(os.path.join(input_dir, ADAPTER_FILE))  # load_state_dict copies to the device
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
    """(steps done, folder) of every complete checkpoint, oldest first."""
    found = []
    for folder in checkpoints_dir(output_dir).glob("step-*"):
        progress_file = folder / PROGRESS_FILE
        if folder.is_dir() and progress_file.is_file():
            found.append((json.loads(progress_file.read_text())["done"], folder))
    return sorted(found)


def save_checkpoint(accelerator, output_dir: str | Path, progress: Progress, total_limit: int | None) -> Path:
    """Save the full state (every process takes part), then rename it into place and prune old ones."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{progress.done:08d}"
    tmp = root / f".tmp-step-{progress.done:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if total_limit is not None:
            for _, old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(spec: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder that ``--resume_from_checkpoint`` names (``latest`` or a path), or None.

    ``latest`` with no checkpoint yet starts from scratch (so the same command can be re-run after a
    preemption); an explicit path that is not a complete checkpoint is an error.
    """
    if spec is None:
        return None
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            logger.info("no checkpoint in %s yet: starting from scratch", checkpoints_dir(output_dir))
            return None
        return found[-1][1]
    path = Path(spec)
    if not (path / PROGRESS_FILE).is_file():
        raise TrainerError(f"--resume_from_checkpoint: {path} is not a complete checkpoint folder "
                           f"(expected {PROGRESS_FILE})")
    return path


def snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """A copy of the adapter weights on their device (to roll back to after a NaN/inf loss)."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: list[torch.nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, s in zip(params, saved):
        p.copy_(s)
