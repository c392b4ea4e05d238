"""The training run: set up, train, write outputs. :func:`train` reads top to bottom."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from . import checkpoint, comfy_inputs
from .adapters import adapter_layers, attach_adapter, export_adapter, get_algorithm
from .adapters.targets import Offsets, base_modules, offset_parameters, resolve_targets
from .checkpoint import Progress
from .config import TrainConfig
from .data import StepBatchSampler, TrainingData, build_dataloader, fitted_batch_size, open_dataset
from .distributed import cpu_only_multiprocess, full_parameters
from .errors import TrainerError
from .losses import get_loss
from .models import load_model
from .objectives import ObjectiveOptions, weighted_loss
from .optim import build_optimizer
from .outputs import plot_loss, save_adapter_file, save_merged_model, write_json

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


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
    #: why the run ended early ("preempted"), or None when it ran all its steps
    stopped: str | None = None


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`setup`."""

    cfg: TrainConfig
    loaded: Any  # models.LoadedModel
    data: TrainingData
    algorithm: Any  # adapters.Algorithm
    params: list[torch.nn.Parameter]
    rank: int
    alpha: float
    progress: Progress
    #: the node's full offsets (``diff``/``diff_b``) trained in this run, written beside the adapter
    offsets: Offsets
    #: ``--file_layout comfyui``: ranks of the parts of each fused adapter written (file metadata)
    fused_ranks: dict[str, list[int]] | None = None


def train(cfg: TrainConfig, model: Any = None, latents: Any = None, positive: Any = None,
          write_outputs: bool = True) -> TrainResult:
    """Train an adapter as ``cfg`` says. ``model``/``latents``/``positive`` override the paths in
    ``cfg`` with in-memory objects (a diffusers model or pipeline, a ``datasets.Dataset``)."""
    started = time.perf_counter()
    accelerator = _make_accelerator(cfg)
    run = setup(cfg, accelerator, model, latents, positive)
    batch_size = fitted_batch_size(cfg.batch_size, run.data.buckets, accelerator.num_processes)
    if batch_size != cfg.batch_size:  # the files' metadata record the batch size trained with
        cfg = run.cfg = dataclasses.replace(cfg, batch_size=batch_size)
    family, progress = run.loaded.family, run.progress
    objective = family.make_objective(run.loaded, ObjectiveOptions.from_config(cfg))
    loss_fn = get_loss(cfg.loss_function)
    optimizer = build_optimizer(cfg.optimizer, run.params, cfg.learning_rate)
    checkpoint.register_adapter_hooks(accelerator, progress, run.offsets)
    denoiser, optimizer = accelerator.prepare(run.loaded.denoiser, optimizer)
    resume = checkpoint.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("resumed from %s at step %d of %d", resume, progress.done, cfg.steps)

    sampler = StepBatchSampler(run.data.buckets, cfg.batch_size, accelerator.num_processes,
                               cfg.grad_accumulation_steps, cfg.seed, start_step=progress.done,
                               end_step=max(cfg.steps, progress.done))
    loader = accelerator.prepare(build_dataloader(run.data, sampler, cfg.seed, cfg.num_workers))
    history = LossHistory(cfg.steps, progress, accelerator.device)
    good = checkpoint.snapshot(run.params)  # the adapter to fall back to after a NaN/inf loss
    bar = tqdm(total=cfg.steps, initial=progress.done, desc="training", disable=not accelerator.is_main_process)
    micro_loss = torch.zeros((), device=accelerator.device)
    stopped, failure, train_started, first_step = None, None, time.perf_counter(), progress.done
    if cfg.report_to != "none":
        accelerator.init_trackers("lora-trainer", config=cfg.to_dict())
    with stop_signals() as stop:
        try:
            for batch in loader:
                with accelerator.accumulate(denoiser):
                    loss = train_step(denoiser, family, objective, loss_fn, batch)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro_loss += loss.detach()
                if not accelerator.sync_gradients:
                    continue
                history.record(micro_loss / cfg.grad_accumulation_steps)
                micro_loss.zero_()
                bar.update(1)
                at_log_step = progress.done % cfg.log_every == 0 or progress.done == cfg.steps
                if at_log_step:
                    good = log_step(accelerator, run, history, bar, good)
                if cfg.checkpointing_steps and progress.done % cfg.checkpointing_steps == 0:
                    history.pull(accelerator)
                    checkpoint.save_checkpoint(accelerator, cfg.output_dir, progress, cfg.checkpoints_total_limit)
                if should_stop(accelerator, stop, at_log_step):
                    stopped = "preempted"
                    break
            history.pull(accelerator)
        except NonFiniteLoss as e:
            failure = e  # the adapter is back at the last good step: write it, then report
        bar.close()
        train_seconds = time.perf_counter() - train_started
        if stopped:
            logger.warning("stop signal received: saving a checkpoint and the adapter at step %d", progress.total)
            checkpoint.save_checkpoint(accelerator, cfg.output_dir, progress, cfg.checkpoints_total_limit)

    samples_per_second = (progress.done - first_step) * sampler.global_batch / max(train_seconds, 1e-9)
    result = finish(accelerator, run, denoiser, write_outputs, samples_per_second, time.perf_counter() - started)
    if failure is not None:
        raise failure
    result.stopped = stopped
    return result


def setup(cfg: TrainConfig, accelerator: Accelerator, model: Any, latents: Any, positive: Any) -> Run:
    """Load the model and data, attach the adapter (fresh or from ``existing_lora``)."""
    # open the dataset first: a wrong path fails in a second, not after loading a large model
    node_latent = comfy_inputs.is_latent(latents)  # ComfyUI's LATENT: scaled by the family's format
    dataset = None if node_latent else open_dataset(cfg.latents if latents is None else latents, "--latents")
    loaded = load_model(cfg.model if model is None else model, cfg.model_family, cfg.prediction_type,
                        cfg.model_config)
    family, denoiser = loaded.family, loaded.denoiser
    if node_latent:
        dataset = comfy_inputs.latents_dataset(latents, family.name)
    if comfy_inputs.is_conditioning(positive):
        positive = comfy_inputs.conditioning_columns(positive, family, len(dataset))
    data = TrainingData(dataset, cfg.positive if positive is None else positive, family, denoiser)
    targets, train_offsets = resolve_targets(cfg.target_modules, family.default_targets, denoiser)
    attach = dict(rank=cfg.rank, alpha=float(cfg.rank) if cfg.alpha is None else cfg.alpha, targets=targets)
    algorithm_name, existing, progress = cfg.algorithm, None, Progress()
    if cfg.existing_lora is not None:
        from .adapters.formats import read_existing_adapter

        existing = read_existing_adapter(cfg.existing_lora, denoiser, family)
        attach = existing.attach_arguments()
        algorithm_name = existing.algorithm
        _report_overrides(cfg, algorithm_name, attach)
        progress.base = existing.steps
    algorithm = get_algorithm(algorithm_name)
    params = attach_adapter(denoiser, algorithm, seed=cfg.seed, **attach)
    offsets = _train_offsets(denoiser, train_offsets, existing.deltas if existing is not None else {})
    params += offsets.parameters()
    if existing is not None:
        _apply_offsets(denoiser, existing.deltas)
        layers = adapter_layers(denoiser)
        for name, tensors in existing.modules.items():
            algorithm.import_layer(layers[name], tensors)
        logger.info("continuing %s (%s %s, %d modules, %d steps done)", cfg.existing_lora, existing.source_format,
                    algorithm_name, len(existing.modules), existing.steps)
    run = Run(cfg, loaded, data, algorithm, params, attach["rank"], attach["alpha"], progress, offsets)
    _check_file_layout(run, denoiser)
    if cfg.training_dtype == "bf16":
        _cast_frozen(denoiser, torch.bfloat16)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    return run


def _train_offsets(model: torch.nn.Module, node: bool, file_offsets: dict[str, dict]) -> Offsets:
    """Make the node's full offsets trainable: every one under ``--target_modules node``, and those of a
    continued file (it decides what is trained, as it decides the adapter's modules). Called before the
    file's offsets are added, so what is written is always "base model + offset"."""
    trained = {module: set(keys) for module, keys in file_offsets.items()}
    if node:
        for module, keys in offset_parameters(model).items():
            trained.setdefault(module, set()).update(keys)
    return Offsets.train(model, trained)


def _check_file_layout(run: Run, model: torch.nn.Module) -> None:
    """Before training: refuse what ``--file_layout comfyui`` cannot write, and say where ComfyUI's loader
    will not reproduce an OFT file."""
    if run.cfg.file_layout == "comfyui":
        comfyui_state(model, run, torch.float32)  # raises for a layer ComfyUI's layout cannot hold
    elif run.algorithm.name == "OFT":
        from .adapters.comfyui import warn_oft_on_swapped_layers

        try:
            names = run.loaded.family.comfyui_names(model)
        except TrainerError:
            return  # a family whose ComfyUI names are not known: nothing to compare with
        warn_oft_on_swapped_layers(names, list(adapter_layers(model)))


def _report_overrides(cfg: TrainConfig, algorithm: str, attach: dict) -> None:
    """A continued file decides algorithm, rank and alpha; say so where the flags differ."""
    for name, value in (("algorithm", algorithm), ("rank", attach["rank"]), ("alpha", attach["alpha"])):
        flag = getattr(cfg, name)
        if flag is not None and flag != value:
            logger.warning("--existing_lora: the file has %s=%s; using it instead of --%s %s", name, value, name, flag)


@torch.no_grad()
def _apply_offsets(model: torch.nn.Module, deltas: dict[str, dict[str, torch.Tensor]]) -> None:
    """Add a continued file's full offsets (ComfyUI's ``diff``/``diff_b`` on norms and biases) to the
    frozen weights, so training continues from the model the file describes."""
    modules = base_modules(model)  # an adapted layer's bias lives on its base layer
    for name, offsets in deltas.items():
        module = modules[name]
        for key, attr in (("diff", "weight"), ("diff_b", "bias")):
            if key in offsets:
                param = getattr(module, attr)
                param.add_(offsets[key].to(param.dtype).reshape(param.shape))


def train_step(model, family, objective, loss_fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Noise the batch, run the denoiser, return the loss (a 0-dim tensor on the device)."""
    latents, noise = batch["latents"], batch["noise"]
    t = objective.timesteps(batch["u"], latents)
    noisy = objective.add_noise(latents, noise, t)
    prediction = family.forward(model, noisy, t, batch, **objective.model_inputs)
    prediction, target = objective.loss_pair(latents, noise, noisy, prediction, t)
    return weighted_loss(loss_fn, prediction, target, objective.loss_weights(t))


class LossHistory:
    """Per-step losses kept on the device and read back only when logged (one host sync per log)."""

    def __init__(self, steps: int, progress: Progress, device: torch.device):
        self.buffer = torch.zeros(max(steps, progress.done), device=device)
        self.progress = progress

    def record(self, loss: torch.Tensor) -> None:
        self.buffer[self.progress.done] = loss
        self.progress.done += 1

    def pull(self, accelerator: Accelerator) -> list[float]:
        """Average the unread steps over processes, bring them to the host, append to the progress."""
        losses = self.progress.losses
        if len(losses) >= self.progress.done:
            return []
        window = accelerator.reduce(self.buffer[len(losses):self.progress.done].clone(), reduction="mean")
        new = window.tolist()  # note: this is a device-to-host sync point
        losses.extend(new)
        return new


def log_step(accelerator, run: Run, history: LossHistory, bar, good: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pull the losses since the last log; stop on a NaN/inf (rolling back to ``good``), else return a new
    snapshot of the adapter as the last good state."""
    progress = run.progress
    first = len(progress.losses)
    new = history.pull(accelerator)
    for offset, value in enumerate(new):
        if not math.isfinite(value):
            checkpoint.restore(run.params, good)
            bad_step = progress.base + first + offset + 1
            del progress.losses[first:]
            progress.done = first
            raise NonFiniteLoss(f"the loss became {value} at step {bad_step}; stopped, the adapter of step "
                                f"{progress.total} is kept (lower learning_rate, or check the data)")
    bar.set_postfix(loss=f"{new[-1]:.4f}")
    accelerator.log({"loss": new[-1]}, step=progress.total)
    return checkpoint.snapshot(run.params)


class NonFiniteLoss(TrainerError):
    """The loss became NaN or inf; the adapter was rolled back to the last finite step."""


@contextmanager
def stop_signals():
    """Turn SIGTERM/SIGINT (cluster preemption, Ctrl-C) into a flag the loop checks between steps."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def should_stop(accelerator: Accelerator, stop: threading.Event, at_log_step: bool) -> bool:
    """Whether every process should stop now. One process alone: the local flag, no sync. Several: they
    must agree, which is a collective, so it is checked at log steps only."""
    if accelerator.num_processes == 1:
        return stop.is_set()
    if not at_log_step:
        return False
    if stop.is_set():
        accelerator.set_trigger()
    return accelerator.check_trigger()


def finish(accelerator, run: Run, denoiser, write_outputs: bool, samples_per_second: float,
           wall_seconds: float) -> TrainResult:
    cfg, progress = run.cfg, run.progress
    model = accelerator.unwrap_model(denoiser, keep_torch_compile=False)
    model.eval()
    dtype = _DTYPES[cfg.lora_dtype]
    with full_parameters(accelerator, denoiser):
        lora = export_lora(model, run, dtype)
    loss_map = {"loss": list(progress.losses), "step": list(range(progress.base + 1, progress.total + 1))}
    result = TrainResult(model, lora, loss_map, progress.total)
    if write_outputs and accelerator.is_main_process:
        result.lora_path = write_run_outputs(run, model, lora, loss_map, samples_per_second, wall_seconds)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def export_lora(model, run: Run, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: the adapter, then the full offsets (ComfyUI reads them under the same names)."""
    if run.cfg.file_layout == "comfyui":
        return comfyui_state(model, run, dtype)
    family = run.loaded.family
    lora = export_adapter(model, run.algorithm, family.file_tensors, dtype)
    for key, tensor in family.offset_tensors(model, run.offsets.export()).items():
        lora[key] = tensor.to(dtype).contiguous()
    return lora


def comfyui_state(model, run: Run, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The adapter and offsets in the Train LoRA node's own layout (:mod:`trainer.adapters.comfyui`)."""
    from .adapters.comfyui import to_comfyui

    modules = {name: {k: t.detach().to("cpu", torch.float32) for k, t in run.algorithm.export_layer(layer).items()}
               for name, layer in adapter_layers(model).items()}
    names = run.loaded.family.comfyui_names(model)
    rows = {name: module.weight.shape[0] for name, module in base_modules(model).items() if name in names
            and isinstance(getattr(module, "weight", None), torch.Tensor)}
    state, run.fused_ranks = to_comfyui(modules, run.offsets.export(), run.algorithm.name, names, rows)
    return {k: t.to(torch.float32 if k.endswith(".alpha") else dtype).contiguous() for k, t in state.items()}


def write_run_outputs(run: Run, model, lora, loss_map, samples_per_second, wall_seconds) -> Path:
    cfg, family, algorithm, steps = run.cfg, run.loaded.family, run.algorithm, run.progress.total
    out = Path(cfg.output_dir)
    lora_path = out / f"{cfg.output_name}.safetensors"
    if cfg.file_layout == "comfyui":  # the node reads the step count from the file name only
        from .adapters.comfyui import file_name

        lora_path = out / file_name(cfg.output_name, steps)
    metadata = {
        "ss_steps": str(steps),
        "ss_network_dim": str(run.rank),
        "ss_network_alpha": str(run.alpha),
        "ss_network_module": algorithm.network_module,
        "ss_network_args": json.dumps(algorithm.network_args(run.rank, run.alpha)),
        "ss_base_model_version": family.base_model_version(model),
        "ss_sd_model_name": Path(run.loaded.source).name,
        "ss_seed": str(cfg.seed),
        "ss_learning_rate": str(cfg.learning_rate),
        "trainer_algorithm": algorithm.name,
        "trainer_family": family.name,
        "trainer_config": cfg.to_json(),
        **family.file_metadata(lora, run.rank, run.alpha),
    }
    if cfg.file_layout == "comfyui":  # alpha / rank lives in the weights; every alpha tensor is 1
        from .adapters.comfyui import FUSED_RANKS

        metadata.update({"ss_network_alpha": "1.0", "trainer_file_layout": "comfyui",
                         FUSED_RANKS: json.dumps(run.fused_ranks)})
    save_adapter_file(lora_path, lora, metadata)
    write_json(out / "loss.json", loss_map)
    plot_loss(out / "loss.png", loss_map["step"], loss_map["loss"],
              f"{cfg.output_name}: {algorithm.name} rank {run.rank}, {family.name}")
    if cfg.save_merged_model:
        save_merged_model(model, run.loaded.source, run.loaded.kind, run.loaded.extra.get("subfolder"), out)
    write_json(out / "result.json", {
        "steps": steps,
        "lora": str(lora_path),
        "final_loss": loss_map["loss"][-1] if loss_map["loss"] else None,
        "samples_per_second": samples_per_second,
        "wall_seconds": wall_seconds,
    })
    return lora_path


def _cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen weights once (the adapter's trainable fp32 masters are left alone). Norm weights
    and biases (1-D, a tiny share of the bytes) stay fp32: an adapted layer whose output comes out in
    fp32 (LoHa/LoKr/OFT on a conv) feeds a GroupNorm, which on the CPU takes fp32 or bf16 input with
    fp32 parameters but not fp32 input with bf16 parameters."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.ndim >= 2:
            p.data = p.data.to(dtype)


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    wanted = list(available) if cfg.report_to == "all" else [cfg.report_to] if cfg.report_to in available else []
    missing = [name for name in wanted if not available[name]]
    if missing:
        raise TrainerError(f"--report_to {cfg.report_to}: {', '.join(missing)} is not installed "
                           f"(pip install {' '.join(missing)})")
    if PartialState._shared_state and PartialState().num_processes == 1:
        # a library caller may train several times in one process with different precisions;
        # accelerate keeps its state process-wide, so start each single-process run afresh
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return Accelerator(
        cpu=cpu_only_multiprocess(),
        gradient_accumulation_steps=cfg.grad_accumulation_steps,
        mixed_precision="bf16" if cfg.training_dtype == "bf16" else "no",
        dynamo_backend="inductor" if cfg.compile else "no",
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
