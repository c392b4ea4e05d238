"""What a run leaves in ``output_dir``: the adapter file, loss.json, loss.png, result.json and,
on request, model_with_lora/. Every file is written to a temporary name and renamed into place, so
an interrupted write never leaves a truncated file behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def save_adapter_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors adapter file atomically; metadata values must be strings."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(path: str | Path, steps: list[int], losses: list[float], title: str,
              eval_steps: list[int] | None = None, eval_losses: list[float] | None = None) -> None:
    """loss.png: the raw per-step loss and its smoothed curve against the optimizer step, and the
    held-out loss at the steps it was taken when given."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="smoothed (EMA 0.9)")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, color="tab:orange", linewidth=2, marker="o", markersize=4,
                label="held-out (fixed noise and timesteps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def save_merged_model(model: torch.nn.Module, source: str, kind: str, subfolder: str | None,
                      out_dir: str | Path) -> Path:
    """Write the base model with the adapter merged into its weights, as a diffusers folder.

    A pipeline folder source gives a whole pipeline folder (the other components copied); any
    other source gives the denoiser folder alone. The in-memory ``model`` is left untouched.
    """
    import copy

    out_dir = Path(out_dir)
    final = out_dir / "model_with_lora"
    tmp = out_dir / ".model_with_lora.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged = copy.deepcopy(model)
    merged.fuse_lora()  # diffusers' PeftAdapterMixin: merge the adapter into the base weights
    merged.unload_lora()  # ...and drop the peft layers, keeping the merged weights
    if kind == "pipeline":
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(subfolder))
        merged.save_pretrained(tmp / subfolder)
    else:
        merged.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
