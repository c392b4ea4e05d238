"""The run's output folder: checked before any work, locked for the run's lifetime, and never shared
with another run's results.

- :func:`check_writable` (before the model is loaded) and :func:`check_room` (once the adapter's size
  is known) turn a folder that cannot be written or is too full into one line at start-up, instead
  of a traceback after the whole run.
- :func:`run_lock` holds an OS lock (``flock``; ``msvcrt.locking`` on Windows) on
  ``<output_dir>/.lock`` while the run lives. The kernel drops it when the process ends in any way,
  a crash or SIGKILL included, so a lock is never stale; the empty file itself stays and means
  nothing unless a process holds it (removing it would let two runs lock two different files).
- :class:`RunFolder` moves an earlier run's files into ``earlier-runs/<time>/`` just before this run
  first writes, so a run that fails before writing (bad data, NaN at the first step) leaves the
  folder exactly as it was, and running the same command twice keeps both results.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import TrainerError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
EARLIER_RUNS = "earlier-runs"
#: what a run writes in its folder besides ``<output_name>.safetensors`` (see outputs.py, checkpoint.py)
RUN_FILES = ("result.json", "loss.json", "loss.png", "model_with_lora", "checkpoints", "logs", "samples")
_MIB = 1024 * 1024


class OutputWriteError(TrainerError):
    """A file of the run could not be written (a full disk, a folder made read-only mid-run)."""


def describe_os_error(e: OSError) -> str:
    """``cannot write <file>: <reason>``, one line."""
    where = f" {e.filename}" if e.filename else ""
    return f"cannot write{where}: {e.strerror or e}"


def check_writable(output_dir: str | Path) -> Path:
    """Create ``output_dir`` if needed and prove that a file can be written in it (an actual write:
    permission bits do not tell what root, ACLs or a read-only mount allow). Raises TrainerError."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise TrainerError(f"--output_dir: {path} is a file, not a folder; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainerError(f"--output_dir: cannot create {path}: {e.strerror or e}") from None
    probe = path / f".write-test-{os.getpid()}"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise TrainerError(f"--output_dir: cannot write in {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return path


def check_room(output_dir: str | Path, needed: int, what: str) -> None:
    """Raise TrainerError if the file system of ``output_dir`` has less than ``needed`` bytes free."""
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise TrainerError(f"--output_dir: {output_dir} has {free / _MIB:.1f} MiB free but this run will write "
                           f"about {needed / _MIB:.1f} MiB ({what}); free some space or choose another "
                           "--output_dir")


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold ``<output_dir>/.lock`` for the duration; raise TrainerError at once if another run holds it."""
    path = Path(output_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_lock(fd):
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            raise TrainerError(f"--output_dir: {output_dir} is in use by another run ({holder}); wait for it to "
                               "finish or choose another --output_dir")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     .encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def remove_if_unused(output_dir: str | Path) -> None:
    """Remove ``output_dir`` if it holds nothing but the lock file (a folder this run created and
    then wrote nothing into)."""
    path = Path(output_dir)
    with contextlib.suppress(OSError):
        if {p.name for p in path.iterdir()} <= {LOCK_FILE}:
            with contextlib.suppress(FileNotFoundError):
                (path / LOCK_FILE).unlink()
            path.rmdir()


class RunFolder:
    """``output_dir`` as this run's own: :meth:`claim` before the first write moves an earlier run's
    files aside (once). A resumed run claims nothing: the files there are its own."""

    def __init__(self, output_dir: str | Path, output_name: str, resuming: bool):
        self.path = Path(output_dir)
        self.output_name = output_name
        self.claimed = resuming

    def claim(self) -> Path | None:
        """Move the earlier run's files to ``earlier-runs/<time>/``; return that folder (None if none)."""
        if self.claimed:
            return None
        self.claimed = True
        names = {*RUN_FILES, f"{self.output_name}.safetensors"}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            lora = Path(json.loads((self.path / "result.json").read_text())["lora"])
            if lora.parent.resolve() == self.path.resolve():
                names.add(lora.name)  # the earlier run's adapter under its own --output_name
        present = sorted(p for p in (self.path / n for n in names) if os.path.lexists(p))
        if not present:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.lstat().st_mtime for p in present)))
        dest = self.path / EARLIER_RUNS / stamp
        for n in range(2, 1000):
            if not dest.exists():
                break
            dest = self.path / EARLIER_RUNS / f"{stamp}-{n}"
        dest.mkdir(parents=True)
        for p in present:
            os.replace(p, dest / p.name)
        logger.warning("%s held an earlier run's files (%s): moved them to %s", self.path,
                       ", ".join(p.name for p in present), dest)
        return dest


def estimate_output_bytes(*, adapter_numel: int, lora_dtype_bytes: int, optimizer: str, steps: int,
                          checkpointing_steps: int | None, checkpoints_total_limit: int | None,
                          preemptible: bool, merged_model_bytes: int = 0) -> tuple[int, str]:
    """Bytes the run will write into ``output_dir`` at most, and what they are (for the message)."""
    adapter = adapter_numel * lora_dtype_bytes + 256 * 1024  # + metadata (the config as JSON)
    slots = {"AdamW": 2, "Adam": 2, "RMSprop": 1, "SGD": 0}.get(optimizer, 2)  # fp32 states per weight
    checkpoint = adapter_numel * 4 * (1 + slots) + _MIB  # fp32 adapter + optimizer + RNG/progress
    count = 0
    if checkpointing_steps:
        count = steps // checkpointing_steps
        if checkpoints_total_limit:
            count = min(count, checkpoints_total_limit) + 1  # the newest is complete before the oldest goes
    count += 1 if preemptible else 0
    plots = 512 * 1024  # loss.png, loss.json, result.json
    parts = [f"adapter {adapter / _MIB:.1f} MiB"]
    if count:
        parts.append(f"{count} checkpoints of {checkpoint / _MIB:.1f} MiB")
    if merged_model_bytes:
        parts.append(f"merged model {merged_model_bytes / _MIB:.1f} MiB")
    return adapter + count * checkpoint + plots + merged_model_bytes, ", ".join(parts)
