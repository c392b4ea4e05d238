"""Flux-style latent patches, shared by the families whose transformers take 2x2 latent patches as tokens
with (0, row, column) position ids (FLUX.1, Chroma). Not a family: a module families import."""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4]: one token per 2x2 patch, row-major, features (c, dy, dx)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``height`` x ``width``."""
    b, _, features = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, height, width)


def image_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """[rows*cols, 3] position ids of the image tokens: (0, row, column)."""
    grid = torch.zeros(rows, cols, 3, device=device)
    grid[..., 1] = torch.arange(rows, device=device)[:, None]
    grid[..., 2] = torch.arange(cols, device=device)[None, :]
    return grid.reshape(rows * cols, 3)
