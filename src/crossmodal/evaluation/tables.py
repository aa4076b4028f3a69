"""The comparison and robustness tables of an evaluation, as printed and logged.

    from crossmodal.evaluation.tables import comparison_table
    print(comparison_table(metrics))        # metrics: what ``evaluate_all`` returns (metrics.json)
"""

from __future__ import annotations


def interval_text(metrics: dict, versus: str) -> str:
    """" (95% CI +1.2 to +8.3 points, 612 test rows)" for the gain of the best fusion head over ``versus``
    (``over_unimodal`` or ``over_linear_probe`` of ``metrics["fusion_gain_interval"]``); "" without one."""
    block = (metrics.get("fusion_gain_interval") or {}).get(versus) or {}
    low, high = block.get("ci_low"), block.get("ci_high")
    if low is None or high is None:
        return ""
    level = round(100 * block.get("confidence", 0.95))
    return f" ({level}% CI {100 * low:+.1f} to {100 * high:+.1f} points, {block['n_rows']} test rows)"


def robustness_table(metrics: dict) -> str:
    """Markdown table: each head's test macro-F1 with both modalities, without text and without image."""

    def f1(block):
        return None if not block else block.get("macro_f1")

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["| head | kind | macro-F1 full | without text | without image |", "|---|---|---:|---:|---:|"]
    for name, m in metrics["heads"].items():
        kind = "fusion" if m.get("modality") == "fusion" else "unimodal"
        cells = [fmt(f1(m.get("test"))), fmt(f1(m.get("missing_text"))), fmt(f1(m.get("missing_image")))]
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(metrics: dict) -> str:
    """Fixed-width table of test metrics, best test macro-F1 first, and the fusion-gain line.

    ``family`` (traditional / baseline / frozen / ensemble / finetuned) and ``kind`` (fusion / unimodal) put baselines and deep heads,
    unimodal and fused, side by side; ``ECE-cal`` is the test ECE after temperature scaling.
    """

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    heads = metrics["heads"]
    def test_f1(name):
        f1 = heads[name]["test"]["macro_f1"]
        return -1.0 if f1 is None else f1

    rows = sorted(heads, key=test_f1, reverse=True)  # stable: ties keep the registry order

    def label(name):  # a traditional baseline says which features and projection it used
        variant = heads[name].get("variant")
        return f"{name} [{variant}]" if variant else name

    width = max([len("head")] + [len(label(n)) for n in rows])
    header = (f"{'head':<{width}}  {'family':<11}  {'kind':<8}  {'accuracy':>8}  {'macro-F1':>8}  {'AUC-ROC':>8}  "
              f"{'ECE':>8}  {'ECE-cal':>8}")
    lines = [header]
    lines.append("-" * len(lines[0]))
    for n in rows:
        t = heads[n]["test"]
        kind = "fusion" if heads[n]["modality"] == "fusion" else "unimodal"
        family = heads[n].get("family", "frozen")
        cells = [fmt(t["accuracy"]), fmt(t["macro_f1"]), fmt(t["roc_auc"]), fmt(t.get("ece")),
                 fmt(heads[n].get("ece_calibrated"))]
        lines.append(f"{label(n):<{width}}  {family:<11}  {kind:<8}  " + "  ".join(f"{c:>8}" for c in cells))
    fusion, unimodal, gain = metrics.get("best_fusion"), metrics.get("best_unimodal"), metrics.get("fusion_gain_macro_f1")
    if fusion and unimodal and gain is not None:
        verb = "beats" if gain >= 0 else "trails"
        points = f"{100 * gain:+.1f}"
        lines.append(f"best fusion {fusion} {verb} best unimodal {unimodal} by {points} macro-F1 points (test)"
                     + interval_text(metrics, "over_unimodal"))
    else:
        lines.append("fusion gain: n/a (needs at least one fusion head and one unimodal head with test rows)")
    probe_gain = metrics.get("fusion_gain_over_linear_probe")
    if fusion and probe_gain is not None:
        verb = "beats" if probe_gain >= 0 else "trails"
        lines.append(f"best fusion {fusion} {verb} linear_probe by {100 * probe_gain:+.1f} macro-F1 points (test)"
                     + interval_text(metrics, "over_linear_probe"))
    return "\n".join(lines)
