"""Compression passes. Each module defines one or more `Pass` subclasses, registered by name."""

from onnxcomp.passes.base import (
    REWRITTEN,
    SKIPPED,
    Context,
    LayerRecord,
    Pass,
    PassConfig,
    PassResult,
    get_pass,
    option,
    registered_passes,
)

__all__ = [
    "REWRITTEN",
    "SKIPPED",
    "Context",
    "LayerRecord",
    "Pass",
    "PassConfig",
    "PassResult",
    "get_pass",
    "option",
    "registered_passes",
]
