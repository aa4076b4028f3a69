"""Missing modalities in evaluation: the attribution summary by hand, and the robustness and attribution figures
of the tiny run."""

from __future__ import annotations

import numpy as np
import pytest

from crossmodal.evaluation.metrics import attribution_summary
from crossmodal.evaluation.tables import robustness_table


def test_attribution_summary_by_hand():
    y = np.array([0, 0, 1])
    full = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    no_image = np.array([[0.5, 0.5], [0.6, 0.4], [0.4, 0.6]])
    no_text = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    gates = np.array([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    out = attribution_summary(y, full, ["a", "b"], no_image, no_text, gates)
    a, b = out["per_class"]["a"], out["per_class"]["b"]
    assert a["n"] == 2 and b["n"] == 1
    assert a["image"] == pytest.approx((0.4 + 0.0) / 2) and a["text"] == pytest.approx((0.1 + 0.3) / 2)
    assert b["image"] == pytest.approx(0.2) and b["text"] == pytest.approx(0.3)
    assert a["gate_image"] == pytest.approx(0.3) and b["gate_text"] == pytest.approx(0.4)
    assert out["overall"]["n"] == 3
    assert attribution_summary(y, full, ["a", "b"], None, None) is None


def test_evaluation_reports_robustness_and_attribution(tiny_run):
    metrics = tiny_run["metrics"]
    labels = metrics["labels"]
    for name, m in metrics["heads"].items():
        for block in ("missing_text", "missing_image"):
            assert set(m[block]) == set(m["test"]) and m[block]["n"] == m["test"]["n"], (name, block)
        attribution = m["attribution"]
        assert set(attribution["per_class"]) == set(labels)
        assert {"image", "text"} <= set(attribution["overall"])
        assert ("gate_image" in attribution["overall"]) == (name == "gated")
    # A unimodal head loses nothing when the other modality goes, and everything it knows when its own goes.
    text_only = metrics["heads"]["text_only"]
    assert text_only["missing_image"]["macro_f1"] == pytest.approx(text_only["test"]["macro_f1"])
    assert text_only["attribution"]["overall"]["image"] == pytest.approx(0.0, abs=1e-6)
    table = (tiny_run["reports"] / "robustness.md").read_text()
    assert table.strip() == robustness_table(metrics)
    assert all(f"| {name} |" in table for name in metrics["heads"])
    assert "without text" in table and "without image" in table
