"""compare_scans: two scans' headline chain numbers side by side."""

from __future__ import annotations

import pandas as pd
import pytest

import tl_sinks
from tl_sinks.compare import HEADLINE, compare_scans

PROMPTS = ["The cat sat on the mat.", "A dog ran in the park today.", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def scans(planted_llama):
    full = tl_sinks.scan(planted_llama, PROMPTS, progress=False)
    sinks_only = tl_sinks.scan(planted_llama, PROMPTS[:2], stages=["sinks"], progress=False)
    return full, sinks_only


def test_a_scan_against_itself_is_unchanged(scans):
    full, _ = scans
    df = compare_scans(full, full, names=("float", "Q8_0"))
    assert list(df.columns) == ["stage", "finding", "float", "Q8_0", "change", "rel_change", "same"]
    assert df["same"].all()
    assert df["stage"].drop_duplicates().tolist() == ["sinks", "aggregation", "super_neurons", "disparity"]
    assert df["finding"].tolist() == [k for _, k in HEADLINE if k in set(df["finding"])]
    numbers = df.dropna(subset=["change"])
    assert (numbers["change"] == 0).all() and "sink_rate_pos0" in set(numbers["finding"])
    row = df.set_index("finding").loc["sink_rate_pos0"]
    assert row["float"] == full.summary()["sink_rate_pos0"]


def test_changes_and_missing_stages(scans):
    full, sinks_only = scans
    df = compare_scans(full, sinks_only).set_index("finding")
    a, b = full.summary()["sink_rate_pos0"], sinks_only.summary()["sink_rate_pos0"]
    assert df.loc["sink_rate_pos0", "change"] == pytest.approx(b - a)
    if a:
        assert df.loc["sink_rate_pos0", "rel_change"] == pytest.approx((b - a) / abs(a))
    # Stages b did not run: a's value, None for b, no change, not the same.
    row = df.loc["n_super_neurons"]
    assert pd.isna(row["b"]) and pd.isna(row["change"]) and not row["same"]


def test_bad_names(scans):
    with pytest.raises(ValueError, match="names"):
        compare_scans(*scans, names=("x", "x"))
    with pytest.raises(ValueError, match="names"):
        compare_scans(*scans, names=("change", "b"))
