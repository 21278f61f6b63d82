"""Seeing sinks: offline circuitsvis views (:mod:`~tl_sinks.viz.views`) and matplotlib figures
(:mod:`~tl_sinks.viz.figures`). Functions here take results and tensors; nothing in tl_sinks'
analysis imports this package."""

from tl_sinks.viz.figures import (
    figure_to_html,
    plot_intervention_sweep,
    plot_massive_activations,
    plot_sink_heatmap,
    plot_training_curves,
    plot_value_aggregation,
)
from tl_sinks.viz.views import OfflineView, circuitsvis_bundle, show_attention, show_neuron_activations, show_tokens

__all__ = [
    "OfflineView",
    "circuitsvis_bundle",
    "figure_to_html",
    "plot_intervention_sweep",
    "plot_massive_activations",
    "plot_sink_heatmap",
    "plot_training_curves",
    "plot_value_aggregation",
    "show_attention",
    "show_neuron_activations",
    "show_tokens",
]
