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
"""

from tl_sinks._compat import ModelInfo, describe_processing, inspect_model
from tl_sinks.aggregation import ValueAggregation, compute_value_aggregation
from tl_sinks.disparity import DimensionDisparity, compute_dimension_disparity
from tl_sinks.errors import NonFiniteActivationError, UnsupportedModelError
from tl_sinks.loading import ModelNotAvailableError, load_model
from tl_sinks.results import ResultFileError, SinkResult, load_result
from tl_sinks.scan import ScanResult, builtin_prompts, scan
from tl_sinks.sinks import SinkScores, compute_sink_scores
from tl_sinks.super_neurons import (
    SuperNeurons,
    WeightSuperNeurons,
    find_super_neurons,
    find_super_neurons_by_weights,
)

__version__ = "0.1.0"

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
