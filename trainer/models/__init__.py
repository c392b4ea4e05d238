"""Model families: how to load a denoiser, feed it, noise its latents and what it should predict.

Each family is one module that registers a :class:`ModelFamily`; the training loop only talks to
that interface, so adding a family never touches the loop.
"""

from . import flux, sd, sd3, sdxl  # noqa: F401  (register the families)
from .base import FAMILIES, LoadedModel, ModelFamily, get_family, register_family
from .loading import load_model

__all__ = ["FAMILIES", "LoadedModel", "ModelFamily", "get_family", "load_model", "register_family"]
