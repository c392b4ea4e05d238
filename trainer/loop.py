"""The training run: set up, train, write outputs. :func:`train` reads top to bottom."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from .adapters import attach_adapter, export_adapter, get_algorithm
from .config import TrainConfig
from .data import StepBatchSampler, TrainingData, build_dataloader
from .errors import TrainerError
from .losses import get_loss
from .models import load_model
from .optim import build_optimizer
from .outputs import plot_loss, save_adapter_file, save_merged_model, write_json

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """The node's four outputs, plus where the files went."""

    #: the denoiser with the trained adapter active (peft layers in place)
    model_with_lora: torch.nn.Module
    #: the adapter tensors exactly as saved (kohya/LyCORIS names, ``lora_dtype``)
    lora: dict[str, torch.Tensor]
    #: the node's LOSS_MAP: ``{"loss": [...], "step": [...]}``, one entry per optimizer step
    loss: dict[str, list]
    #: total steps, including those of a continued LoRA
    steps: int
    #: path of the written adapter file, or None when nothing was written
    lora_path: Path | None = None


def train(cfg: TrainConfig, model: Any = None, latents: Any = None, positive: Any = None,
          write_outputs: bool = True) -> TrainResult:
    """Train an adapter as ``cfg`` says. ``model``/``latents``/``positive`` override the paths in
    ``cfg`` with in-memory objects (a diffusers model or pipeline, a ``datasets.Dataset``)."""
    started = time.perf_counter()
    accelerator = _make_accelerator(cfg)
    loaded = load_model(cfg.model if model is None else model, cfg.model_family, cfg.prediction_type,
                        cfg.model_config)
    family, denoiser = loaded.family, loaded.denoiser
    data = TrainingData(cfg.latents if latents is None else latents,
                        cfg.positive if positive is None else positive, family, denoiser)

    algorithm = get_algorithm(cfg.algorithm)
    targets = cfg.target_modules.split(",") if cfg.target_modules else list(family.default_targets)
    params = attach_adapter(denoiser, algorithm, cfg.rank, cfg.alpha, [t.strip() for t in targets], cfg.seed)
    if cfg.training_dtype == "bf16":
        _cast_frozen(denoiser, torch.bfloat16)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()

    objective = family.make_objective(loaded.scheduler_config, loaded.prediction_type, cfg.objective)
    loss_fn = get_loss(cfg.loss_function)
    optimizer = build_optimizer(cfg.optimizer, params, cfg.learning_rate)
    sampler = StepBatchSampler(data.num_rows, cfg.batch_size, accelerator.num_processes,
                               cfg.grad_accumulation_steps, cfg.seed, start_step=0, end_step=cfg.steps)
    loader = build_dataloader(data, sampler, cfg.seed, cfg.num_workers)
    denoiser, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)

    history = LossHistory(cfg.steps, accelerator.device)
    progress = tqdm(total=cfg.steps, desc="training", disable=not accelerator.is_main_process)
    step, micro_loss = 0, torch.zeros((), device=accelerator.device)
    train_started = time.perf_counter()
    for batch in loader:
        with accelerator.accumulate(denoiser):
            loss = train_step(denoiser, family, objective, loss_fn, batch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro_loss += loss.detach()
        if not accelerator.sync_gradients:
            continue
        history.record(step, micro_loss / cfg.grad_accumulation_steps)
        micro_loss.zero_()
        step += 1
        progress.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_step(accelerator, history, progress, step, params)
    progress.close()
    train_seconds = time.perf_counter() - train_started

    unwrapped = accelerator.unwrap_model(denoiser)
    unwrapped.eval()
    lora = export_adapter(unwrapped, algorithm, family.kohya_prefix, _DTYPES[cfg.lora_dtype])
    loss_map = {"loss": history.losses, "step": list(range(1, step + 1))}
    result = TrainResult(unwrapped, lora, loss_map, step)
    if write_outputs and accelerator.is_main_process:
        samples = step * sampler.global_batch
        result.lora_path = write_run_outputs(cfg, loaded, family, algorithm, unwrapped, lora, loss_map, step,
                                             samples / train_seconds, time.perf_counter() - started)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def train_step(model, family, objective, loss_fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Noise the batch, run the denoiser, return the loss (a 0-dim tensor on the device)."""
    latents, noise = batch["latents"], batch["noise"]
    t = objective.timesteps(batch["u"])
    noisy = objective.add_noise(latents, noise, t)
    cond = {name: batch[name] for name in family.conditioning}
    prediction = family.forward(model, noisy, t, cond)
    return loss_fn(*objective.loss_pair(latents, noise, noisy, prediction, t))


class LossHistory:
    """Per-step losses kept on the device and read back only when logged (one host sync per log)."""

    def __init__(self, steps: int, device: torch.device):
        self.buffer = torch.zeros(steps, device=device)
        self.losses: list[float] = []

    def record(self, step_index: int, loss: torch.Tensor) -> None:
        self.buffer[step_index] = loss

    def pull(self, accelerator: Accelerator, upto: int) -> list[float]:
        """Average the unread steps over processes and bring them to the host."""
        window = accelerator.reduce(self.buffer[len(self.losses):upto].clone(), reduction="mean")
        new = window.tolist()  # note: this is a device-to-host sync point
        self.losses.extend(new)
        return new


def log_step(accelerator, history: LossHistory, progress, step: int, params) -> None:
    first = len(history.losses) + 1
    new = history.pull(accelerator, step)
    for offset, value in enumerate(new):
        if not math.isfinite(value):
            raise TrainerError(f"the loss became {value} at step {first + offset}; stopping "
                               "(lower learning_rate, or check the data)")
    progress.set_postfix(loss=f"{new[-1]:.4f}")
    accelerator.log({"loss": new[-1]}, step=step)


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen weights once (the adapter's trainable fp32 masters are left alone)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    if PartialState._shared_state and PartialState().num_processes == 1:
        # a library caller may train several times in one process with different precisions;
        # accelerate keeps its state process-wide, so start each single-process run afresh
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=cfg.grad_accumulation_steps,
        mixed_precision="bf16" if cfg.training_dtype == "bf16" else "no",
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )


def write_run_outputs(cfg, loaded, family, algorithm, model, lora, loss_map, steps, samples_per_second,
                      wall_seconds) -> Path:
    out = Path(cfg.output_dir)
    lora_path = out / f"{cfg.output_name}.safetensors"
    metadata = {
        "ss_steps": str(steps),
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_module": algorithm.network_module,
        "ss_network_args": json.dumps(algorithm.network_args(cfg.rank, cfg.alpha)),
        "ss_base_model_version": family.base_model_version(model),
        "ss_sd_model_name": Path(loaded.source).name,
        "ss_seed": str(cfg.seed),
        "ss_learning_rate": str(cfg.learning_rate),
        "trainer_algorithm": algorithm.name,
        "trainer_family": family.name,
        "trainer_config": cfg.to_json(),
    }
    save_adapter_file(lora_path, lora, metadata)
    write_json(out / "loss.json", loss_map)
    plot_loss(out / "loss.png", loss_map["step"], loss_map["loss"],
              f"{cfg.output_name}: {algorithm.name} rank {cfg.rank}, {family.name}")
    if cfg.save_merged_model:
        save_merged_model(model, loaded.source, loaded.kind, loaded.extra.get("subfolder"), out)
    write_json(out / "result.json", {
        "steps": steps,
        "lora": str(lora_path),
        "final_loss": loss_map["loss"][-1] if loss_map["loss"] else None,
        "samples_per_second": samples_per_second,
        "wall_seconds": wall_seconds,
    })
    return lora_path
