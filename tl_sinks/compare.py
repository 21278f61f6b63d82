"""Two scans side by side: how the headline numbers of the causal chain moved.

For example the float checkpoint against its Q8_0 GGUF export, a model before and after an
intervention, or two training checkpoints::

    a = tl_sinks.scan(tl_sinks.load_model("default"))
    b = tl_sinks.scan(tl_sinks.load_model("default-q8_0.gguf"))
    compare_scans(a, b, names=("float", "Q8_0"))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

# (stage, ScanResult.summary() key), in the chain's order.
HEADLINE: tuple[tuple[str, str], ...] = (
    ("sinks", "sink_rate_pos0"),
    ("sinks", "mean_received_pos0"),
    ("sinks", "ratio_to_uniform_pos0"),
    ("sinks", "n_sink_heads_pos0"),
    ("aggregation", "var_ratio_first_rest_median"),
    ("aggregation", "share_heads_var_first_gt_rest"),
    ("super_neurons", "n_super_neurons"),
    ("super_neurons", "chain_super_neurons"),
    ("super_neurons", "top_super_neuron"),
    ("super_neurons", "top_super_neuron_peak"),
    ("super_neurons", "top_super_neuron_dims"),
    ("disparity", "massive_dim_pos0"),
    ("disparity", "massive_dim_layer"),
    ("disparity", "massive_dim_value"),
    ("disparity", "massive_dim_ratio_to_median"),
    ("disparity", "disparity_pos0_resid"),
    ("disparity", "disparity_pos0_attn_in"),
    ("disparity", "super_neuron_writes_massive_dim"),
)


def _headline(result: Any) -> dict[str, Any]:
    out = dict(result.summary())
    sn = getattr(result, "super_neurons", None)
    if sn is not None:
        out["chain_super_neurons"] = list(sn.chain["label"])
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare_scans(a: Any, b: Any, *, names: Sequence[str] = ("a", "b")) -> pd.DataFrame:
    """The headline chain numbers of two :class:`~tl_sinks.scan.ScanResult` s side by side.

    Args:
        a: The reference scan.
        b: The scan compared with it.
        names: Column names for ``a`` and ``b``.

    Returns:
        One row per finding both scans or either one report (stage order: sinks, aggregation,
        super neurons, disparity), columns ``stage``, ``finding``, ``names[0]``, ``names[1]``,
        ``change`` (``b - a`` for numbers, else ``None``), ``rel_change`` (``change / |a|``,
        ``None`` when ``a`` is 0 or not a number) and ``same`` (equal values; for numbers,
        ``change == 0``).
    """
    if len(names) != 2 or names[0] == names[1] or set(names) & {"stage", "finding", "change", "rel_change", "same"}:
        raise ValueError(f"names must be two distinct column names other than the fixed ones, got {names!r}")
    ha, hb = _headline(a), _headline(b)
    rows = []
    for stage, key in HEADLINE:
        if key not in ha and key not in hb:
            continue
        va, vb = ha.get(key), hb.get(key)
        numeric = _is_number(va) and _is_number(vb)
        change = float(vb) - float(va) if numeric else None
        rel = change / abs(float(va)) if numeric and va != 0 else None
        rows.append(
            {
                "stage": stage,
                "finding": key,
                names[0]: va,
                names[1]: vb,
                "change": change,
                "rel_change": rel,
                "same": bool(change == 0) if numeric else va == vb,
            }
        )
    return pd.DataFrame(rows, columns=["stage", "finding", names[0], names[1], "change", "rel_change", "same"])
