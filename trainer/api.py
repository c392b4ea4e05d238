"""The library call: the same run as ``train.py``, with the node's outputs returned in memory."""

from __future__ import annotations

from typing import Any

from .config import TrainConfig
from .loop import TrainResult, train


def train_lora(model: Any = "demo", latents: Any = "demo", positive: Any = None, *,
               write_outputs: bool | None = None, handle_signals: bool = False, **params: Any) -> TrainResult:
    """Train an adapter and return ``model_with_lora``, ``lora``, ``loss`` and ``steps``.

    ``model`` is a path (see ``--model``), a diffusers model or pipeline; ``latents`` a path, a
    ``datasets.Dataset`` or ComfyUI's LATENT (``{"samples": [N, C, H, W]}``, raw VAE latents, scaled
    with the family's latent format as ComfyUI does); ``positive`` a path, dataset, tensor, dict of
    tensors or ComfyUI's CONDITIONING (``[[cond, {"pooled_output": ...}], ...]``, 1 entry or one per
    latent): the node's own inputs. ``params`` are
    the parameters of ``train.py --help``. Files are written only when ``output_dir`` is given
    (or ``write_outputs=True``). Signal handlers are the caller's: Ctrl-C raises KeyboardInterrupt as
    usual; ``handle_signals=True`` makes SIGTERM/SIGINT save a checkpoint and return early instead (as
    ``train.py`` does, ``result.stopped == "preempted"``). Raises :class:`~trainer.ConfigError` for a bad parameter and
    :class:`~trainer.TrainerError` for bad input.
    """
    paths = {k: v for k, v in (("model", model), ("latents", latents), ("positive", positive))
             if v is None or isinstance(v, str)}
    cfg = TrainConfig.from_mapping({**paths, **params})
    if write_outputs is None:
        write_outputs = "output_dir" in params
    objects = {k: v for k, v in (("model", model), ("latents", latents), ("positive", positive))
               if k not in paths}
    return train(cfg, write_outputs=write_outputs, handle_signals=handle_signals, **objects)
