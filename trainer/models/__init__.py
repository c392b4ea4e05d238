"""Model families: how to load a denoiser, feed it, noise its latents and what it should predict.

Each family is one package ``trainer/models/<name>/`` that registers a :class:`ModelFamily`
(:mod:`trainer.models.base`); the loop, ``lora-prepare``, sampling and the file layouts only talk
to that interface, and the registry finds the packages by itself, so adding a family is one new
package. Shared pieces live in plain modules next to :mod:`base` (``mmdit``, ``unet_names``), never
in another family.

Importing this package is cheap (no torch): ``--help`` lists the families from the folder names
(:func:`family_names`); everything else is imported on first use.
"""

from __future__ import annotations

import pkgutil

__all__ = ["FAMILIES", "LoadedModel", "ModelFamily", "families", "family_names", "get_family", "load_model",
           "register_family"]


def family_names() -> tuple[str, ...]:
    """The families' names, sorted: every subpackage of ``trainer.models`` is one family. Reads the
    folder listing only (imports no family), so ``--model_family``'s choices cost nothing."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg))


def __getattr__(name: str):
    # the rest imports torch and the families: only when asked for (PEP 562)
    if name == "load_model":
        from .loading import load_model

        return load_model
    if name == "FAMILIES":
        from .base import families

        return families()
    if name in ("LoadedModel", "ModelFamily", "families", "get_family", "register_family"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
