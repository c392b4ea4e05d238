"""What a run leaves in ``output_dir``: the adapter file, loss.json, loss.png, result.json and,
on request, model_with_lora/. Every file is written to a temporary name and renamed into place, so
an interrupted write never leaves a truncated file behind."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success make it durable and rename it
    onto ``path``, else remove it. The one way this project writes a file.

    The temporary file is created with mode 0666 masked by the umask (0644 under umask 022), as
    ``open()`` would create ``path`` itself; ``tempfile.mkstemp`` would make it 0600, unreadable for
    another account (a ComfyUI service, a shared models folder). It is flushed to disk (fsync) before
    the rename, and the rename is flushed too, so a power cut leaves the old file or the new one
    (``durable=False`` skips both, for caches that can be made again).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path)
    mode = tmp.stat().st_mode & 0o777  # what the umask gives a new file here
    try:
        yield tmp
        # some writers replace the file with their own 0600 temporary (safetensors >= 0.6 does)
        os.chmod(tmp, mode)
        if durable:
            _fsync(tmp, os.O_RDWR)  # Windows flushes only a file open for writing
        os.replace(tmp, path)
        if durable:
            _fsync_folder(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        failed = write_failure(e, path)
        if failed is None or failed is e and e.filename not in (None, str(tmp)):
            raise
        raise OSError(failed.errno, failed.strerror, str(path)) from e  # name the file, not its temporary


def write_failure(error: BaseException, path: str | Path) -> OSError | None:
    """The OSError that ``error``, raised while writing ``path``, stands for, or None if it is not a
    failed write. Writers report a full disk in their own ways: safetensors as a SafetensorError
    ending in ``(os error 28)``, ``torch.save`` as a RuntimeError about stream positions."""
    if isinstance(error, OSError):
        return error
    if not isinstance(error, Exception):
        return None  # KeyboardInterrupt, SystemExit
    found = re.search(r"os error (\d+)", str(error))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(path))
    if isinstance(error, RuntimeError) and _nearly_full(Path(path)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def _nearly_full(path: Path) -> bool:
    folder = next((p for p in (path, *path.parents) if p.is_dir()), None)
    try:
        return folder is not None and shutil.disk_usage(folder).free < 1024 * 1024
    except OSError:
        return False


def _new_file(path: Path) -> Path:
    """Create an empty, unused temporary file beside ``path`` (mode 0666 less the umask)."""
    for attempt in itertools.count():
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{attempt}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue  # left by a crashed run with our pid, or another thread: take the next name


def umask_modes(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode the umask gives a new file there (folders keep
    theirs), for trees written by other libraries' writers (``save_pretrained``, ``save_state``),
    some of which leave 0600 files."""
    folder = Path(folder)
    probe = _new_file(folder / "mode")
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):  # a file another account owns keeps its mode
                os.chmod(path, mode)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows cannot open a folder, and needs not)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder: best effort
        _fsync(folder, os.O_RDONLY)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def save_adapter_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (an adapter, a checkpoint's adapter state) atomically; metadata values must
    be strings."""
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
    umask_modes(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
