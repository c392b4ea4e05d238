"""Adapters: attach a trainable adapter with peft, and turn it into the file format other tools read.

One module per algorithm registers an :class:`~trainer.adapters.base.Algorithm`; attaching,
exporting and importing go through that interface, so the loop never special-cases an algorithm.
"""

from .base import ADAPTER_NAME, ALGORITHMS, Algorithm, adapter_layers, attach_adapter, export_adapter, get_algorithm
from . import lora  # noqa: F401  (registers the algorithm)
from . import loha, lokr, oft  # noqa: F401  (register the algorithms)

__all__ = ["ADAPTER_NAME", "ALGORITHMS", "Algorithm", "adapter_layers", "attach_adapter", "export_adapter",
           "get_algorithm"]
