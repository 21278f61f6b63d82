"""tl_sinks: why attention sinks form, measured on TransformerLens models.

The causal chain of Li et al. ("The Structural Origin of Attention Sink: Variance Discrepancy,
Super Neurons, and Dimension Disparity"), one module per stage:

1. :mod:`tl_sinks.aggregation` - value aggregation: the first token's attention output is one
   value vector, later tokens average many, so the first token's output spread stands out.
2. :mod:`tl_sinks.super_neurons` - a few MLP neurons fire hugely on the first token and write,
   through channel-sparse down-projection rows, into a few residual dims.
3. :mod:`tl_sinks.disparity` - those dims become massive activations (dimension disparity).
4. :mod:`tl_sinks.sinks` - keys align with that direction and most heads attend to token 0.

:func:`scan` measures all four over a corpus in one forward pass per batch.

The names below are imported on first use (``import tl_sinks`` itself loads neither torch nor
pandas), so a command line or a test that needs one stage does not pay for the rest.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module defining it; imported on first access (PEP 562).
_EXPORTS: dict[str, str] = {
    "DimensionDisparity": "tl_sinks.disparity",
    "ModelInfo": "tl_sinks._compat",
    "ModelNotAvailableError": "tl_sinks.errors",
    "NonFiniteActivationError": "tl_sinks.errors",
    "ResultFileError": "tl_sinks.results",
    "ScanResult": "tl_sinks.scan",
    "SinkResult": "tl_sinks.results",
    "SinkScores": "tl_sinks.sinks",
    "SuperNeurons": "tl_sinks.super_neurons",
    "UnsupportedModelError": "tl_sinks.errors",
    "ValueAggregation": "tl_sinks.aggregation",
    "WeightSuperNeurons": "tl_sinks.super_neurons",
    "builtin_prompts": "tl_sinks.scan",
    "compute_dimension_disparity": "tl_sinks.disparity",
    "compute_sink_scores": "tl_sinks.sinks",
    "compute_value_aggregation": "tl_sinks.aggregation",
    "describe_processing": "tl_sinks._compat",
    "find_super_neurons": "tl_sinks.super_neurons",
    "find_super_neurons_by_weights": "tl_sinks.super_neurons",
    "inspect_model": "tl_sinks._compat",
    "load_model": "tl_sinks.loading",
    "load_result": "tl_sinks.results",
    "scan": "tl_sinks.scan",
}

__all__ = [
    "DimensionDisparity",
    "ModelInfo",
    "ModelNotAvailableError",
    "NonFiniteActivationError",
    "ResultFileError",
    "ScanResult",
    "SinkResult",
    "SinkScores",
    "SuperNeurons",
    "UnsupportedModelError",
    "ValueAggregation",
    "WeightSuperNeurons",
    "__version__",
    "builtin_prompts",
    "compute_dimension_disparity",
    "compute_sink_scores",
    "compute_value_aggregation",
    "describe_processing",
    "find_super_neurons",
    "find_super_neurons_by_weights",
    "inspect_model",
    "load_model",
    "load_result",
    "scan",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tl_sinks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps ``tl_sinks.scan`` the function when the submodule ``tl_sinks.scan`` is imported.

    Importing a submodule sets it as an attribute of its package. Eager ``from tl_sinks.scan
    import scan`` in this file used to rebind the name right after; lazily, the submodule may be
    imported first (``from tl_sinks.scan import ScanResult``), so the export is put in its place.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from tl_sinks._compat import ModelInfo, describe_processing, inspect_model
    from tl_sinks.aggregation import ValueAggregation, compute_value_aggregation
    from tl_sinks.disparity import DimensionDisparity, compute_dimension_disparity
    from tl_sinks.errors import ModelNotAvailableError, NonFiniteActivationError, UnsupportedModelError
    from tl_sinks.loading import load_model
    from tl_sinks.results import ResultFileError, SinkResult, load_result
    from tl_sinks.scan import ScanResult, builtin_prompts, scan
    from tl_sinks.sinks import SinkScores, compute_sink_scores
    from tl_sinks.super_neurons import (
        SuperNeurons,
        WeightSuperNeurons,
        find_super_neurons,
        find_super_neurons_by_weights,
    )
