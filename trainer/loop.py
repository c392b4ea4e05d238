"""The training run: set up, train, write outputs. :func:`train` reads top to bottom."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from . import checkpoint, comfy_inputs
from .adapters import Algorithm, adapter_layers, attach_adapter, export_adapter, get_algorithm
from .adapters.targets import Offsets, base_modules, offset_parameters, resolve_targets
from .checkpoint import Progress
from .compat import reset_single_process_state, unwrap
from .config import TrainConfig
from .data import StepBatchSampler, TrainingData, build_dataloader, fitted_batch_size, open_dataset
from .distributed import cpu_only_multiprocess, full_parameters
from .errors import TrainerError
from .evaluation import HeldOutLoss, hold_out, open_eval_set
from .losses import get_loss
from .models import LoadedModel, load_model
from .models.precision import DTYPES, is_plain
from .objectives import weighted_loss
from .optim import build_optimizer
from .outputs import plot_loss, save_adapter_file, save_merged_model, write_failure, write_json
from .rundir import (
    OutputWriteError,
    RunFolder,
    check_room,
    check_writable,
    describe_os_error,
    estimate_output_bytes,
    remove_if_unused,
    run_lock,
)
from .sampling import PromptSampler, build_sampler, most_common_frames, most_common_size, parse_size, read_prompts
from .streaming import StreamData, StreamingBatches, open_stream, streaming_loader
from .watch import Watch, check_config

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
    #: why the run ended early ("preempted"), or None when it ran all its steps
    stopped: str | None = None


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`setup`."""

    cfg: TrainConfig
    loaded: LoadedModel
    data: TrainingData | StreamData
    algorithm: Algorithm
    params: list[torch.nn.Parameter]
    rank: int
    alpha: float
    progress: Progress
    #: the node's full offsets (``diff``/``diff_b``) trained in this run, written beside the adapter
    offsets: Offsets
    #: ``--file_layout comfyui``: ranks of the parts of each fused adapter written (file metadata)
    fused_ranks: dict[str, list[int]] | None = None
    #: output_dir as this run's own, set once resuming is decided
    folder: RunFolder | None = None
    #: sample images while training, or None
    sampler: PromptSampler | None = None
    #: the held-out rows (evaluation.HeldOutLoss), or None
    held_out: HeldOutLoss | None = None


def train(cfg: TrainConfig, model: Any = None, latents: Any = None, positive: Any = None,
          write_outputs: bool = True, handle_signals: bool = False) -> TrainResult:
    """Train an adapter as ``cfg`` says. ``model``/``latents``/``positive`` override the paths in
    ``cfg`` with in-memory objects (a diffusers model or pipeline, a ``datasets.Dataset``).
    ``handle_signals``: turn SIGTERM/SIGINT into "checkpoint and stop" (the command line does; a library
    caller keeps its own handlers unless it asks)."""
    accelerator = _make_accelerator(cfg)
    # anything written into output_dir: the outputs, checkpoints, or the checkpoint a signal asks for
    writes = write_outputs or cfg.checkpointing_steps is not None or handle_signals
    created = writes and accelerator.is_main_process and not Path(cfg.output_dir).exists()
    try:
        with ExitStack() as stack:
            if writes and accelerator.is_main_process:
                # before the model is loaded: a folder that cannot be written fails now, not after the run
                check_writable(cfg.output_dir)
                stack.enter_context(run_lock(cfg.output_dir))
            return _train(cfg, accelerator, model, latents, positive, write_outputs, handle_signals, writes)
    except BaseException:
        if created:
            remove_if_unused(cfg.output_dir)  # a run that failed before writing leaves no trace
        raise


def _train(cfg: TrainConfig, accelerator: Accelerator, model: Any, latents: Any, positive: Any,
           write_outputs: bool, handle_signals: bool, writes: bool) -> TrainResult:
    started = time.perf_counter()
    run = setup(cfg, accelerator, model, latents, positive)
    if not cfg.streaming:  # a stream's length is unknown: its batch size is taken as given
        batch_size = fitted_batch_size(cfg.batch_size, run.data.buckets, accelerator.num_processes)
        if batch_size != cfg.batch_size:  # the files' metadata record the batch size trained with
            cfg = run.cfg = dataclasses.replace(cfg, batch_size=batch_size)
    if writes and accelerator.is_main_process:  # the adapter's size is known now
        check_room(cfg.output_dir, *_output_bytes(cfg, run, handle_signals))
    trainer = Trainer(run, accelerator)
    with stop_signals(handle_signals) as stop:
        trainer.fit(stop)
    return trainer.finish(write_outputs, time.perf_counter() - started)


class Trainer:
    """One run after :func:`setup`: the prepared model, optimizer and data, and the run's state. The one
    owner of that state: the progress (steps done, losses: changed here and by a checkpoint's load),
    the last good adapter, why the run stopped and the failure to report.

    ``fit`` runs the steps (``step`` each, then ``log`` / ``checkpoint`` / ``should_stop`` when due),
    ``finish`` writes the outputs."""

    def __init__(self, run: Run, accelerator: Accelerator):
        cfg, family = run.cfg, run.loaded.family
        self.run, self.cfg, self.accelerator, self.family = run, cfg, accelerator, family
        self.progress = progress = run.progress
        progress.identity = checkpoint.run_identity(cfg, accelerator.num_processes)
        self.objective = family.make_objective(run.loaded, cfg.objective_options)
        self.loss_fn = get_loss(cfg.loss_function)
        optimizer = build_optimizer(cfg.optimizer, run.params, cfg.learning_rate)
        checkpoint.register_adapter_hooks(accelerator, progress, run.offsets)
        self.denoiser, self.optimizer = accelerator.prepare(run.loaded.denoiser, optimizer)
        stream = streaming_batches(cfg, run.data, accelerator) if cfg.streaming else None  # before load_state
        resume = checkpoint.resume(accelerator, cfg.resume_from_checkpoint, cfg.output_dir, progress, run.params,
                                   self.optimizer)
        if resume is not None:
            logger.info("resumed from %s at step %d of %d", resume, progress.done, cfg.steps)
        # the folder is this run's from its first write on; a resumed run's own files stay where they are
        run.folder = RunFolder(cfg.output_dir, cfg.output_name, resuming=resume is not None and _inside(
            resume, checkpoint.checkpoints_dir(cfg.output_dir)))
        self.loader = build_loader(cfg, run.data, accelerator, progress, stream)
        # per-step losses stay on the device until logged (one host sync per log), indexed by progress.done
        self.losses = torch.zeros(max(cfg.steps, progress.done), device=accelerator.device)
        eval_objective = family.make_objective(run.loaded, replace(cfg.objective_options,
                                                                   timestep_sampling="uniform"))
        self.watch = Watch(accelerator, progress, cfg.steps, run.sampler, cfg.sample_every, run.held_out,
                           cfg.eval_every, self.denoiser,
                           lambda batch: train_step(self.denoiser, family, eval_objective, self.loss_fn, batch))
        self.good = checkpoint.snapshot(run.params)  # the adapter to fall back to after a NaN/inf loss
        self.first_step = progress.done
        self.train_seconds = 0.0
        #: why the run ended early ("preempted"), and the error to raise once the outputs are written
        self.stopped: str | None = None
        self.failure: TrainerError | None = None

    def fit(self, stop: threading.Event) -> None:
        """Train until the steps are done, a stop signal, a NaN/inf loss or a failed checkpoint write."""
        cfg, accelerator, progress = self.cfg, self.accelerator, self.progress
        bar = tqdm(total=cfg.steps, initial=progress.done, desc="training", disable=not accelerator.is_main_process)
        micro_loss = torch.zeros((), device=accelerator.device)
        if cfg.report_to != "none" or self.run.sampler is not None:
            self.claim()  # trackers write under output_dir/logs, samples under output_dir/samples
        if cfg.report_to != "none":
            accelerator.init_trackers("lora-trainer", config=_tracker_config(cfg))
        started = time.perf_counter()
        try:
            self.watch.start()
            for batch in self.loader:
                micro_loss += self.step(batch)
                if not accelerator.sync_gradients:
                    continue
                self.losses[progress.done] = micro_loss / cfg.grad_accumulation_steps
                micro_loss.zero_()
                progress.advance()
                bar.update(1)
                at_log_step = progress.done % cfg.log_every == 0 or progress.done == cfg.steps
                if at_log_step:
                    bar.set_postfix(loss=f"{self.log():.4f}")
                self.watch.step()
                if cfg.checkpointing_steps and progress.done % cfg.checkpointing_steps == 0:
                    self.checkpoint()
                if self.should_stop(stop, at_log_step):
                    self.stopped = "preempted"
                    break
            self.pull_losses()
            if not self.stopped:
                self.watch.end()
        except NonFiniteLoss as e:
            self.failure = e  # the adapter is back at the last good step: write it, then report
        except OutputWriteError as e:
            self.failure = _keep_training_result(accelerator, e)
        bar.close()
        self.train_seconds = time.perf_counter() - started - self.watch.seconds
        if self.stopped:
            logger.warning("stop signal received: saving a checkpoint and the adapter at step %d", progress.total)
            try:
                self.checkpoint()
            except OutputWriteError as e:
                self.failure = _keep_training_result(accelerator, e)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch: forward, backward and (at the end of an accumulation) the optimizer step.
        Returns the detached loss (on the device: no sync)."""
        with self.accelerator.accumulate(self.denoiser):
            loss = train_step(self.denoiser, self.family, self.objective, self.loss_fn, batch)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def pull_losses(self) -> list[float]:
        """Average the unread steps' losses over processes, bring them to the host, add them to the progress."""
        progress = self.progress
        if len(progress.losses) >= progress.done:
            return []
        window = self.accelerator.reduce(self.losses[len(progress.losses):progress.done].clone(), reduction="mean")
        new = window.tolist()  # note: this is a device-to-host sync point
        progress.add_losses(new)
        return new

    def log(self) -> float:
        """Read the losses since the last log; stop on a NaN/inf (rolling the adapter back to the last good
        snapshot), else take a new snapshot as the last good state. Returns the latest loss."""
        progress = self.progress
        first = len(progress.losses)
        new = self.pull_losses()
        for offset, value in enumerate(new):
            if not math.isfinite(value):
                checkpoint.restore(self.run.params, self.good)
                bad_step = progress.base + first + offset + 1
                progress.roll_back(first)
                kept = (f"the adapter of step {progress.total} is kept" if progress.done else
                        "nothing was trained, so no file was written")
                raise NonFiniteLoss(f"the loss became {value} at step {bad_step}; stopped, {kept} (lower "
                                    "learning_rate, or check the data)")
        self.accelerator.log({"loss": new[-1]}, step=progress.total)
        self.good = checkpoint.snapshot(self.run.params)
        return new[-1]

    def claim(self) -> None:
        """Before this run's first write into output_dir: move an earlier run's files aside (main process)."""
        if self.accelerator.is_main_process:
            self.run.folder.claim()

    def checkpoint(self) -> None:
        """A full-state checkpoint; a failed write (a full disk) becomes :class:`OutputWriteError`."""
        cfg, progress = self.cfg, self.progress
        self.pull_losses()
        self.claim()
        try:
            checkpoint.save_checkpoint(self.accelerator, cfg.output_dir, progress, cfg.checkpoints_total_limit)
        except OSError as e:
            last = checkpoint.complete_checkpoints(cfg.output_dir)
            kept = f"the last complete checkpoint is {last[-1][1]}" if last else "no complete checkpoint"
            raise OutputWriteError(f"checkpoint at step {progress.total}: {describe_os_error(e)}; stopped "
                                   f"({kept})") from None

    def should_stop(self, stop: threading.Event, at_log_step: bool) -> bool:
        """Whether every process should stop now. One process alone: the local flag, no sync. Several: they
        must agree, which is a collective, so it is checked at log steps only."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return stop.is_set()
        if not at_log_step:
            return False
        if stop.is_set():
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def finish(self, write_outputs: bool, wall_seconds: float) -> TrainResult:
        """Export the adapter and write the outputs (a run that trained nothing writes nothing); then raise
        the failure that ended the run, if any, or return the result."""
        cfg, progress, accelerator = self.cfg, self.progress, self.accelerator
        global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accumulation_steps
        samples_per_second = (progress.done - self.first_step) * global_batch / max(self.train_seconds, 1e-9)
        write = write_outputs and progress.done > 0  # after a NaN/inf at the first step the folder stays as it was
        try:
            result = self.export(write, samples_per_second, wall_seconds)
        except OutputWriteError as e:
            if self.failure is None:
                raise
            raise OutputWriteError(f"{self.failure}; then {e}") from None  # both, in one line
        if self.failure is not None:
            raise self.failure
        result.stopped = self.stopped
        return result

    def export(self, write: bool, samples_per_second: float, wall_seconds: float) -> TrainResult:
        """The adapter as its file holds it and the loss map; with ``write``, the files too (main process)."""
        run, progress, accelerator = self.run, self.progress, self.accelerator
        model = unwrap(accelerator, self.denoiser)
        model.eval()
        with full_parameters(accelerator, self.denoiser):
            lora = export_lora(model, run, DTYPES[self.cfg.lora_dtype])
        loss_map = {"loss": list(progress.losses), "step": list(range(progress.base + 1, progress.total + 1))}
        if run.held_out is not None:
            loss_map.update(eval_loss=list(progress.eval_losses), eval_step=list(progress.eval_steps))
        result = TrainResult(model, lora, loss_map, progress.total)
        if write and accelerator.is_main_process:
            self.claim()
            result.lora_path = write_run_outputs(run, model, lora, loss_map, samples_per_second, wall_seconds,
                                                 self.watch.seconds)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return result


def _keep_training_result(accelerator: Accelerator, error: OutputWriteError) -> OutputWriteError:
    """A checkpoint write failed: with one process, stop and still write the adapter (returned error
    raised after it); with several, end now, since the others wait inside save_state (the launcher
    ends them all) and the last complete checkpoint keeps the run."""
    if accelerator.num_processes > 1:
        raise error
    return error


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().parent == folder.resolve()


def _output_bytes(cfg: TrainConfig, run: Run, preemptible: bool) -> tuple[int, str]:
    """What the run will write at most (adapter, checkpoints, merged model), for the room check."""
    merged = 0
    if cfg.save_merged_model:
        merged = sum(p.numel() * p.element_size() for p in run.loaded.denoiser.parameters())
        if run.loaded.kind == "pipeline":  # the pipeline's other components are copied
            merged += sum(f.stat().st_size for f in Path(run.loaded.source).rglob("*") if f.is_file())
    return estimate_output_bytes(
        adapter_numel=sum(p.numel() for p in run.params), lora_dtype_bytes=DTYPES[cfg.lora_dtype].itemsize,
        optimizer=cfg.optimizer, steps=cfg.steps, checkpointing_steps=cfg.checkpointing_steps,
        checkpoints_total_limit=cfg.checkpoints_total_limit, preemptible=preemptible, merged_model_bytes=merged)


def build_loader(cfg: TrainConfig, data, accelerator: Accelerator, progress: Progress,
                 stream: StreamingBatches | None):
    """This process's micro-batches for the steps still to run (from ``progress.done``)."""
    end = max(cfg.steps, progress.done)
    if stream is not None:
        stream.start_step, stream.end_step = progress.done, end
        return streaming_loader(stream, accelerator.device)
    sampler = StepBatchSampler(data.buckets, cfg.batch_size, accelerator.num_processes, cfg.grad_accumulation_steps,
                               cfg.seed, start_step=progress.done, end_step=end)
    return accelerator.prepare(build_dataloader(data, sampler, cfg.seed, cfg.num_workers))


def streaming_batches(cfg: TrainConfig, data, accelerator: Accelerator) -> StreamingBatches:
    """--streaming: this process's part of the stream, its position saved in every checkpoint."""
    if cfg.num_workers:
        raise TrainerError("--num_workers: --streaming reads the stream in the training process; use 0")
    stream = StreamingBatches(data, cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                              cfg.grad_accumulation_steps, cfg.seed, cfg.shuffle_buffer, 0, cfg.steps)
    stream.register(accelerator)
    return stream


def setup(cfg: TrainConfig, accelerator: Accelerator, model: Any, latents: Any, positive: Any) -> Run:
    """Load the model and data, attach the adapter (fresh or from ``existing_lora``)."""
    if cfg.save_merged_model and cfg.weight_dtype != "default":
        raise TrainerError(f"--save_merged_model merges into the base weights, which --weight_dtype "
                           f"{cfg.weight_dtype} stores at reduced precision; use --weight_dtype default")
    # open the datasets and read the prompts first: a wrong path fails in a second, not after loading a
    # large model
    check_config(cfg.watching)
    node_latent = comfy_inputs.is_latent(latents)  # ComfyUI's LATENT: scaled by the family's format
    if node_latent and cfg.streaming:
        raise TrainerError("--streaming reads --latents from files; a LATENT dict is already in memory")
    source = cfg.latents if latents is None else latents
    dataset = None if node_latent else open_stream(source) if cfg.streaming else open_dataset(source, "--latents")
    eval_dataset = open_dataset(cfg.eval_latents, "--eval_latents") if cfg.eval_latents is not None else None
    prompts = read_prompts(cfg.sample_prompts) if cfg.sample_prompts is not None else None
    sample_size = parse_size(cfg.sample_size)
    loaded = load_model(cfg.model if model is None else model, cfg.model_family, cfg.prediction_type,
                        cfg.model_config, dtype=DTYPES[cfg.training_dtype], weight_dtype=cfg.weight_dtype)
    data, held_out = _training_data(cfg, loaded, dataset, eval_dataset, latents if node_latent else None,
                                    cfg.positive if positive is None else positive)
    run = _attach(cfg, loaded, data)
    run.held_out = held_out
    denoiser = loaded.denoiser
    _check_file_layout(run, denoiser)
    if cfg.training_dtype == "bf16":
        _cast_frozen(denoiser, torch.bfloat16)
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    if prompts is not None:
        sample_size = sample_size or most_common_size(data, loaded.vae_scale_factor)
        # the default clip length comes from the data only where a video prompt has none of its own
        from_data = loaded.family.latent_ndim == 4 and cfg.sample_frames is None and any(
            p.frames is None for p in prompts)
        run.sampler = build_sampler(cfg.watching, cfg.output_dir, cfg.training_dtype, loaded, model, prompts,
                                    sample_size, accelerator, most_common_frames(data) if from_data else 1)
    return run


def _training_data(cfg: TrainConfig, loaded: LoadedModel, dataset: Any, eval_dataset: Any, node_latent: Any,
                   positive: Any) -> tuple[TrainingData | StreamData, HeldOutLoss | None]:
    """The training rows with their conditioning, and the held-out rows, once the family is known (it
    scales the node's LATENT and reads the node's CONDITIONING)."""
    family, denoiser = loaded.family, loaded.denoiser
    if node_latent is not None:
        dataset = comfy_inputs.latents_dataset(node_latent, family.name)
    if comfy_inputs.is_conditioning(positive):
        positive = comfy_inputs.conditioning_columns(positive, family, len(dataset))
    data = (StreamData if cfg.streaming else TrainingData)(dataset, positive, family, denoiser)
    held_out = None
    if eval_dataset is not None:
        eval_data = open_eval_set(eval_dataset, positive, family, denoiser)
        held_out = HeldOutLoss(eval_data, list(range(eval_data.num_rows)))
    elif cfg.eval_fraction:
        held_out = HeldOutLoss(data, hold_out(data, cfg.eval_fraction, cfg.seed))
    return data, held_out


def _attach(cfg: TrainConfig, loaded: LoadedModel, data: TrainingData | StreamData) -> Run:
    """Attach the adapter: fresh as the flags say, or continuing ``--existing_lora`` (the file then decides
    the algorithm, rank, alpha and the steps already done)."""
    family, denoiser = loaded.family, loaded.denoiser
    targets, train_offsets = resolve_targets(cfg.target_modules, family.default_targets, denoiser,
                                             family.all_targets_leave_out, cfg.algorithm,
                                             get_algorithm(cfg.algorithm).layer_types)
    attach = dict(rank=cfg.rank, alpha=float(cfg.rank) if cfg.alpha is None else cfg.alpha, targets=targets)
    algorithm_name, existing = cfg.algorithm, None
    if cfg.existing_lora is not None:
        from .adapters.formats import read_existing_adapter

        existing = read_existing_adapter(cfg.existing_lora, denoiser, family)
        attach = existing.attach_arguments()
        algorithm_name = existing.algorithm
        _report_overrides(cfg, algorithm_name, attach)
    algorithm = get_algorithm(algorithm_name)
    params = attach_adapter(denoiser, algorithm, seed=cfg.seed, **attach)
    offsets = _train_offsets(denoiser, train_offsets, existing.deltas if existing is not None else {})
    params += offsets.parameters()
    if existing is not None:
        _apply_offsets(denoiser, existing.deltas)
        layers = adapter_layers(denoiser)
        for name, tensors in existing.modules.items():
            try:
                algorithm.import_layer(layers[name], tensors)
            except TrainerError as e:  # the algorithm says why; the user needs the file and the module too
                raise TrainerError(f"--existing_lora: {Path(cfg.existing_lora).name}, module {name}: {e}") from None
        # a layer may have taken factors of the file's making (LoKr decompose_both): collect them all
        params = [p for p in denoiser.parameters() if p.requires_grad]
        logger.info("continuing %s (%s %s, %d modules, %d steps done)", cfg.existing_lora, existing.source_format,
                    algorithm_name, len(existing.modules), existing.steps)
    progress = Progress(base=existing.steps if existing is not None else 0)  # a continued file's steps count on
    return Run(cfg, loaded, data, algorithm, params, attach["rank"], attach["alpha"], progress, offsets)


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
    will not reproduce an OFT file (or does not read the family's default layout at all)."""
    family = run.loaded.family
    if run.cfg.file_layout == "comfyui":
        comfyui_state(model, run, torch.float32)  # raises for a layer ComfyUI's layout cannot hold
        return
    if not family.comfyui_reads_default_layout:
        logger.info("the %s file is written in diffusers' layout, which ComfyUI's LoRA loader does not read for "
                    "this model; --file_layout comfyui writes the file ComfyUI reads", family.name)
    if run.algorithm.name == "OFT":
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
                # summed in fp32: a bias stored in fp8 (--weight_dtype) has no in-place add
                param.copy_((param.float() + offsets[key].float().reshape(param.shape)).to(param.dtype))


def train_step(model, family, objective, loss_fn, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Noise the batch, run the denoiser, return the loss (a 0-dim tensor on the device)."""
    latents, noise = batch["latents"], batch["noise"]
    t = objective.timesteps(batch["u"], latents)
    noisy = objective.add_noise(latents, noise, t)
    prediction = family.forward(model, noisy, t, batch, **objective.model_inputs)
    prediction, target = objective.loss_pair(latents, noise, noisy, prediction, t)
    return weighted_loss(loss_fn, prediction, target, objective.loss_weights(t))


class NonFiniteLoss(TrainerError):
    """The loss became NaN or inf; the adapter was rolled back to the last finite step."""


@contextmanager
def stop_signals(enabled: bool):
    """Turn SIGTERM/SIGINT (cluster preemption, Ctrl-C) into a flag the loop checks between steps, if
    ``enabled``; otherwise the caller's handlers stay (Ctrl-C in a notebook raises KeyboardInterrupt)."""
    stop = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def write_run_outputs(run: Run, model, lora, loss_map, samples_per_second, wall_seconds,
                      watch_seconds: float = 0.0) -> Path:
    """The adapter first (what matters most), then loss.json, loss.png, result.json, model_with_lora/.
    A failed write raises :class:`OutputWriteError` saying what was kept: the adapter, else a copy in
    the temp folder (another file system, as a rule) and the last checkpoint."""
    cfg, algorithm, steps = run.cfg, run.algorithm, run.progress.total
    out = Path(cfg.output_dir)
    lora_path = out / f"{cfg.output_name}.safetensors"
    if cfg.file_layout == "comfyui":  # the node reads the step count from the file name only
        from .adapters.comfyui import file_name

        lora_path = out / file_name(cfg.output_name, steps)
    metadata = adapter_metadata(run, model, lora)
    try:
        save_adapter_file(lora_path, lora, metadata)
    except OSError as e:
        raise OutputWriteError(f"{describe_os_error(e)}; {_rescue(run, lora, metadata)}") from None
    try:
        write_json(out / "loss.json", loss_map)
        plot_loss(out / "loss.png", loss_map["step"], loss_map["loss"],
                  f"{cfg.output_name}: {algorithm.name} rank {run.rank}, {run.loaded.family.name}",
                  loss_map.get("eval_step"), loss_map.get("eval_loss"))
        if cfg.save_merged_model:
            save_merged_model(model, run.loaded.source, run.loaded.kind, run.loaded.extra.get("subfolder"), out)
        write_json(out / "result.json", {
            "steps": steps,
            "lora": str(lora_path),
            "final_loss": loss_map["loss"][-1] if loss_map["loss"] else None,
            "samples_per_second": samples_per_second,
            "wall_seconds": wall_seconds,
            # time spent sampling images and computing the held-out loss (part of wall_seconds)
            "watch_seconds": watch_seconds,
        })
    except Exception as e:
        failed = write_failure(e, out)  # save_pretrained and savefig may report a full disk otherwise
        if failed is None:
            raise
        raise OutputWriteError(f"{describe_os_error(failed)}; the trained adapter itself was written: "
                               f"{lora_path}") from None
    return lora_path


def adapter_metadata(run: Run, model, lora: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata of the adapter file (section 3 of the SPEC)."""
    cfg, family, algorithm = run.cfg, run.loaded.family, run.algorithm
    metadata = {
        "ss_steps": str(run.progress.total),
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
    return metadata


def _rescue(run: Run, lora, metadata) -> str:
    """Save the adapter where it can still go, after its write into output_dir failed; say where."""
    kept = []
    rescue = Path(tempfile.gettempdir()) / f"lora-trainer-{os.getpid()}" / f"{run.cfg.output_name}.safetensors"
    try:
        save_adapter_file(rescue, lora, metadata)
        kept.append(f"the trained adapter was saved to {rescue} instead")
    except OSError:
        kept.append("the adapter could not be saved anywhere")
    last = checkpoint.complete_checkpoints(run.cfg.output_dir)
    if last:
        kept.append(f"the last checkpoint ({last[-1][1]}, step {run.progress.base + last[-1][0]}) is kept: free "
                    "space and run again with --resume_from_checkpoint latest")
    return "; ".join(kept)


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config for the trackers: lists (prompts given in the YAML file) as one string each, since
    TensorBoard's hyperparameters take only scalars and strings."""
    return {k: "\n".join(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()}


def _cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen weights once: a model handed over as an object is cast here (one read from a file
    is already in the training dtype); the adapter's trainable fp32 masters, fp8-stored and quantized
    weights of ``--weight_dtype`` are left alone. Norm weights and biases (1-D, a tiny share of the bytes) stay
    fp32: an adapted layer whose output comes out in fp32 (LoHa/LoKr/OFT on a conv) feeds a GroupNorm,
    which on the CPU takes fp32 or bf16 input with fp32 parameters but not fp32 input with bf16
    parameters."""
    for p in model.parameters():
        if p.requires_grad or not is_plain(p):
            continue
        if p.ndim >= 2 and p.dtype in (torch.float32, torch.float16):
            p.data = p.data.to(dtype)
        elif p.ndim < 2 and p.dtype in (torch.bfloat16, torch.float16):  # read in the training dtype
            p.data = p.data.float()


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    wanted = list(available) if cfg.report_to == "all" else [cfg.report_to] if cfg.report_to in available else []
    missing = [name for name in wanted if not available[name]]
    if missing:
        raise TrainerError(f"--report_to {cfg.report_to}: {', '.join(missing)} is not installed "
                           f"(pip install {' '.join(missing)})")
    # a library caller may train several times in one process with different precisions; accelerate
    # keeps its state process-wide, so start each single-process run afresh
    reset_single_process_state()
    return Accelerator(
        cpu=cpu_only_multiprocess(),
        gradient_accumulation_steps=cfg.grad_accumulation_steps,
        mixed_precision="bf16" if cfg.training_dtype == "bf16" else "no",
        dynamo_backend="inductor" if cfg.compile else "no",
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir,
                                            logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
