"""Test helper: a diffusers UNet as an original (LDM) single-file checkpoint, to test the trainer's
single-file loading without a download. The trainer itself only reads that layout
(``trainer.models.unet_names.ldm_to_diffusers_names``), so the writing direction lives here."""

from __future__ import annotations

import torch

from trainer.models.unet_names import ldm_to_diffusers_names


def diffusers_to_ldm_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``unet``'s state dict under original SD checkpoint keys (``model.diffusion_model.<LDM name>``),
    as a single-file checkpoint holds it. Raises ValueError for a tensor with no LDM name."""
    to_ldm = {v: k for k, v in ldm_to_diffusers_names(unet.config).items()}
    state, missing = {}, []
    for key, tensor in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        if module not in to_ldm:
            missing.append(key)
            continue
        state[f"model.diffusion_model.{to_ldm[module]}.{param}"] = tensor
    if missing:
        raise ValueError(f"no LDM name for {len(missing)} UNet tensors: {', '.join(missing[:10])}")
    return state
