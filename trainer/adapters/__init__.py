"""Adapters: attach a trainable adapter with peft, and turn it into the file format other tools read.

One module per algorithm registers an :class:`~trainer.adapters.base.Algorithm`; attaching,
exporting and importing go through that interface, so the loop never special-cases an algorithm.
"""

from . import (  # noqa: F401  (register the algorithms)
           loha,
           lokr,
           lora,
           oft,
)
from .base import (
           ADAPTER_NAME,
           ALGORITHMS,
           Algorithm,
           adapter_layers,
           attach_adapter,
           export_adapter,
           get_algorithm,
)

__all__ = ["ADAPTER_NAME", "ALGORITHMS", "Algorithm", "adapter_layers", "attach_adapter", "export_adapter",
           "get_algorithm"]
