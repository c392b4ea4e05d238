"""ComfyUI's own input types for the library call: a LATENT and a CONDITIONING list, as the Train
LoRA node takes them.

- LATENT: ``{"samples": [N, C, H, W]}``, raw VAE latents. ComfyUI's model scales them with its latent
  format before training (``comfy/latent_formats.py``: ``(latent - shift) * scale``; SD 1.x/2.x
  0.18215, SDXL 0.13025, SD3 (1.5305, shift 0.0609), Flux (0.3611, shift 0.1159); an all-zero
  latent is left alone), so they become exactly the pre-scaled rows of a latents dataset.
- CONDITIONING: ``[[cond [1, L, D], {"pooled_output": [1, D], ...}], ...]``, one entry for every latent
  or one per latent. ``cond`` becomes ``prompt_embeds``, ``pooled_output`` ``pooled_prompt_embeds``;
  SDXL's size entries (``width``/``height``, ``crop_w``/``crop_h``, ``target_width``/``target_height``
  in pixels, as CLIPTextEncodeSDXL writes them) become ``original_size``/``crop_coords``/``target_size``,
  with ComfyUI's defaults where absent (768 x 768, no crop), so the run sees what the node's model sees.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import TrainerError


def is_latent(value: Any) -> bool:
    """Whether ``value`` is a ComfyUI LATENT (a dict holding a ``samples`` tensor)."""
    return isinstance(value, dict) and isinstance(value.get("samples"), torch.Tensor)


def is_conditioning(value: Any) -> bool:
    """Whether ``value`` is a ComfyUI CONDITIONING list (``[[tensor, dict], ...]``)."""
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], torch.Tensor)
                    and isinstance(e[1], dict) for e in value))


def latents_dataset(latent: dict, family_name: str):
    """A latents dataset (``latents`` column, scaled as the model expects) from a LATENT dict."""
    import datasets

    from .models import get_family
    from .models.base import scale_latents

    samples = latent["samples"]
    family = get_family(family_name)
    if family.latent_ndim == 3 and samples.ndim == 5 and samples.shape[2] == 1:
        samples = samples[:, :, 0]  # an image model with a video VAE's latents (Qwen-Image): one frame
    if samples.ndim != family.latent_ndim + 1:
        layout = "[N, C, T, H, W]" if family.latent_ndim == 4 else "[N, C, H, W]"
        raise TrainerError(f"--latents: LATENT samples must be {layout} for {family.name}, got shape "
                           f"{tuple(samples.shape)}")
    scale, shift = family.encoding.latent_scale
    samples = samples.detach().float().cpu()
    # per-channel constants (Wan's latents_mean / latents_std) must match the channels
    if not isinstance(scale, (int, float)) and len(scale) != samples.shape[1]:
        raise TrainerError(f"--latents: LATENT samples have {samples.shape[1]} channels; {family.name}'s "
                           f"latent normalisation is known for {len(scale)} channels")
    if torch.count_nonzero(samples) > 0:  # ComfyUI does not shift an empty latent
        samples = scale_latents(samples, scale, shift)
    return datasets.Dataset.from_dict({"latents": samples.numpy()}).with_format("numpy")


def conditioning_columns(conditioning: list, family, num_latents: int) -> dict[str, torch.Tensor]:
    """The conditioning columns (``prompt_embeds`` [n, L, D], ``pooled_prompt_embeds`` [n, D], the family's
    extra columns such as SDXL's sizes [n, 2]) of a CONDITIONING list, n = 1 or one row per latent."""
    if len(conditioning) not in (1, num_latents):
        raise TrainerError(f"--positive has {len(conditioning)} CONDITIONING entries but --latents has "
                           f"{num_latents} latents: give 1 entry (used for every latent) or one per latent")
    columns: dict[str, list[torch.Tensor]] = {"prompt_embeds": []}
    for i, (cond, extra) in enumerate(conditioning):
        if cond.ndim == 3 and cond.shape[0] == 1:
            cond = cond[0]
        if cond.ndim != 2:
            raise TrainerError(f"--positive: CONDITIONING entry {i} holds a tensor of shape {tuple(cond.shape)}; "
                               "expected [1, tokens, features]")
        columns["prompt_embeds"].append(cond.float())
        if "pooled_prompt_embeds" in family.conditioning:
            pooled = extra.get("pooled_output")
            if not isinstance(pooled, torch.Tensor):
                raise TrainerError(f"--positive: CONDITIONING entry {i} has no pooled_output, which {family.name} "
                                   "needs")
            columns.setdefault("pooled_prompt_embeds", []).append(pooled.float().reshape(-1))
        for column, value in family.comfyui_extra_columns(extra).items():
            columns.setdefault(column, []).append(value)
    tables = {}
    for name, rows in columns.items():
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) > 1:
            raise TrainerError(f"--positive: CONDITIONING entries hold {name} of different shapes "
                               f"({', '.join(map(str, sorted(shapes)))}); encode them to one length")
        tables[name] = torch.stack(rows)
    return tables
