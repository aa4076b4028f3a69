"""The run's report: one self-contained HTML page a team reads to decide whether to trust the new champion.

    import json
    from crossmodal.evaluation.report import build_report
    run = "work/runs/20261201T120000Z-abcd1234"
    build_report(f"{run}/validated", f"{run}/models", f"{run}/reports", f"{run}/reports/report.html",
                 summary=json.load(open("reports/summary.json")))

Sections: **data** (rows in / kept / quarantined by reason with thumbnails of the quarantined images, class
balance per split, the duplicate, leakage and other warnings, the failed expectations), **comparison** (a sortable
table of every head and the fusion gain), **per head** (confusion matrix, ROC curves, reliability diagram,
robustness with a modality removed, per-class F1; the registered head open), **attribution** (test examples of the
registered head: the most confident mistakes and correct rows across the confidence range, with the drop of the
predicted class's probability when the image or the text is removed) and **the gate** (the decision, the scores, the
paired interval and p-value when the summary has them).

Self-contained: no CDN, no font, script or image fetched from anywhere. Figures are the run's own PNGs
(``reports/plots``, the ones logged to MLflow) as data URIs, drawn afresh as inline SVG when a PNG is missing;
thumbnails are JPEG data URIs of at most ``THUMB_PX`` pixels, and only of files inside the data root (a manifest
may point anywhere; the report is mailed around). Every text from the data (ids, captions, labels, reasons) is
escaped by the template: a caption ``<script>`` renders as text. The one script is inline and sorts the table.
"""

from __future__ import annotations

import base64
import io
import json
import re
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.artifacts import (
    HEAD_FILE,
    LABELS_FILE,
    METRICS_FILE,
    PLOTS_DIR,
    PREDICTIONS_FILE,
    QUARANTINE_FILE,
    VALIDATED_FILE,
    VALIDATION_FILE,
    WEIGHTS_FILE,
)
from crossmodal.errors import ReportError
from crossmodal.evaluation.tables import interval_text
from crossmodal.files import write_bytes

THUMB_PX = 96  # longest side of a thumbnail
THUMB_MAX_BYTES = 50 << 20  # files larger than this are not opened for a thumbnail
THUMB_MAX_PIXELS = 64_000_000  # nor images larger than this (decompression bombs)
GALLERY_MISTAKES = 12  # the most confident mistakes of the registered head
GALLERY_CORRECT = 12  # correct test rows, spread over the confidence range
QUARANTINE_SHOWN = 24  # quarantined rows listed (with thumbnails); the rest are counted
CAPTION_CHARS = 280  # a caption is cut here in the page (the full text is in the tables)
FIGURES = (("confusion", "confusion matrix"), ("roc", "ROC curves (one-vs-rest)"), ("reliability", "reliability"))
TEMPLATE = "report.html.j2"


# ----------------------------------------------------------------------------- reading the run
def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ReportError(f"{path} not found: the report needs the {what}; run the pipeline (`crossmodal run`) first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ReportError(f"{path} is not readable JSON ({err}); re-run the stage that writes it") from None


def _read_quarantine(path: Path):
    import pandas as pd

    if not path.is_file():
        return pd.DataFrame(columns=["id", "image", "text", "label", "reason"])
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="replace")


def _read_validated(path: Path):
    from crossmodal.data.validated import read_validated

    return read_validated(path, ("id", "image", "text", "label", "split"), ReportError)


def _load_heads(models_dir: Path, names: list[str]) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    """head.json and predictions.npz of each head (empty where a file is gone)."""
    meta, pred = {}, {}
    for name in names:
        head_file = models_dir / name / HEAD_FILE
        meta[name] = json.loads(head_file.read_text()) if head_file.is_file() else {}
        npz = models_dir / name / PREDICTIONS_FILE
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as z:
                pred[name] = {k: z[k] for k in z.files}
        else:
            pred[name] = {}
    return meta, pred


# ----------------------------------------------------------------------------- images
def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def thumbnail_data_uri(image: str | Path | None, root: str | Path | None, size: int = THUMB_PX
                       ) -> tuple[str | None, str | None]:
    """``(data URI of a JPEG at most size x size, None)`` or ``(None, why not)``.

    ``image`` is resolved against ``root`` when relative, and refused unless the real file (symlinks followed) lies
    inside ``root``: whatever a manifest names, only the data set's own images end up in the page.
    """
    from PIL import Image, ImageOps

    if image is None or not str(image).strip():
        return None, "no image"
    if root is None:
        return None, "no data root known: thumbnails are only made of files under it"
    root_real = Path(root).resolve()
    given = Path(str(image))
    try:
        real = (given if given.is_absolute() else root_real / given).resolve()
    except (OSError, RuntimeError, ValueError) as err:
        return None, f"image path not resolvable ({err})"
    if not _inside(real, root_real):
        return None, "image outside the data root: not shown"
    if not real.is_file():
        return None, "image file not found"
    if real.stat().st_size > THUMB_MAX_BYTES:
        return None, "image file too large for a thumbnail"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: the pixel limit below decides
            with Image.open(real) as img:
                if img.width * img.height > THUMB_MAX_PIXELS:
                    return None, f"image too large for a thumbnail ({img.width}x{img.height})"
                img.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at a reduced scale, much faster
                img = ImageOps.exif_transpose(img)
                img.thumbnail((size, size))
                if img.mode != "RGB":
                    img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA") else img.convert("RGB")
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=75, optimize=True)
    except Exception as err:  # any undecodable file: Pillow raises many types
        return None, f"image does not decode ({type(err).__name__})"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


# ----------------------------------------------------------------------------- figures
def _svg_inline(svg: str, prefix: str) -> str:
    """matplotlib's SVG file as an element for an HTML page: no XML prolog, no metadata (it names remote
    vocabularies), ids prefixed so two figures' clip paths never collide."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)

    def tag(match: re.Match) -> str:
        # Only inside tags: a text node (a label from the manifest) may spell id="..." too. Attribute values and
        # texts have < and > escaped, so a tag is exactly one <...> span.
        t = re.sub(r'\sxmlns(:\w+)?="[^"]*"', "", match.group(0))  # HTML puts inline <svg> in the SVG namespace
        t = re.sub(r'(\s)id="', rf'\1id="{prefix}-', t)
        t = t.replace("url(#", f"url(#{prefix}-")
        return t.replace('href="#', f'href="#{prefix}-')

    return re.sub(r"<[^>]*>", tag, svg)


def _draw_svg(kind: str, head: str, y: np.ndarray, proba: np.ndarray, labels: list[str], temperature: float,
              prefix: str) -> str:
    import matplotlib

    from crossmodal.evaluation.calibration import apply_temperature
    from crossmodal.evaluation.plots import plot_confusion, plot_reliability, plot_roc

    matplotlib.use("Agg")
    with tempfile.TemporaryDirectory() as tmp, matplotlib.rc_context({"svg.fonttype": "none",
                                                                       "svg.hashsalt": prefix}):
        path = Path(tmp) / f"{kind}.svg"
        if kind == "confusion":
            plot_confusion(y, proba, labels, f"{head}: test confusion matrix", path)
        elif kind == "roc":
            plot_roc(y, proba, labels, f"{head}: test ROC", path)
        else:
            plot_reliability(y, proba, apply_temperature(proba, temperature), temperature,
                             f"{head}: test reliability", path)
        return _svg_inline(path.read_text(encoding="utf-8"), prefix)


def _figures(head: str, index: int, reports_dir: Path, pred: dict[str, np.ndarray], labels: list[str],
             temperature: float) -> list[dict[str, Any]]:
    from markupsafe import Markup

    out = []
    for kind, title in FIGURES:
        png = reports_dir / PLOTS_DIR / f"{head}_{kind}.png"
        fig: dict[str, Any] = {"title": title, "png": None, "svg": None, "error": None}
        if png.is_file():
            fig["png"] = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        elif "test_proba" in pred:
            try:
                # matplotlib escapes every text it writes into the SVG (labels come from the manifest)
                fig["svg"] = Markup(_draw_svg(kind, head, pred["test_y"].astype(np.int64),
                                              pred["test_proba"].astype(np.float64), labels, temperature,
                                              f"h{index}-{kind}"))
            except Exception as err:  # a label matplotlib cannot typeset must not take the report down
                fig["error"] = f"not drawn: {type(err).__name__}: {err}"
        else:
            fig["error"] = "no test predictions for this head"
        out.append(fig)
    return out


# ----------------------------------------------------------------------------- sections
def _is_leakage(warning: str) -> bool:
    w = warning.lower()
    return any(k in w for k in ("more than one split", "leak", "duplicate", "identical"))


def _data_section(validation: dict, quarantine, root: Path | None, labels: list[str]) -> dict[str, Any]:
    rows_in = int(validation.get("rows_in", 0))
    splits = validation.get("split_counts") or {}
    classes = list(labels) or sorted({c for counts in splits.values() for c in counts})
    split_names = [s for s in ("train", "val", "test") if s in splits] + [s for s in splits
                                                                      if s not in ("train", "val", "test")]
    peak = max([int(v) for counts in splits.values() for v in counts.values()] or [1]) or 1
    balance = []
    for c in classes:
        cells = [{"n": int(splits[s].get(c, 0)), "width": round(100 * int(splits[s].get(c, 0)) / peak, 1)}
                 for s in split_names]
        balance.append({"label": c, "cells": cells, "total": sum(x["n"] for x in cells)})
    totals = [sum(int(v) for v in splits[s].values()) for s in split_names]

    shown = []
    for rec in quarantine.head(QUARANTINE_SHOWN).to_dict("records"):
        uri, why = thumbnail_data_uri(rec.get("image") or None, root)
        shown.append({"id": rec.get("id", ""), "image": rec.get("image", ""), "text": rec.get("text", ""),
                      "label": rec.get("label", ""), "reason": rec.get("reason", ""), "thumb": uri,
                      "no_thumb": why})
    warnings_list = [str(w) for w in validation.get("warnings") or []]
    failed = [e for e in validation.get("expectations") or [] if not e.get("success", True)]
    return {
        "rows_in": rows_in, "kept": int(validation.get("rows_kept", 0)),
        "quarantined": int(validation.get("rows_quarantined", 0)),
        "fraction": validation.get("quarantine_fraction"),
        "max_fraction": validation.get("max_quarantine_fraction"),
        "missing_image": validation.get("rows_missing_image"), "missing_text": validation.get("rows_missing_text"),
        "reasons": sorted((validation.get("quarantine_reasons") or {}).items(), key=lambda kv: (-kv[1], kv[0])),
        "quarantine_rows": shown, "quarantine_more": max(0, len(quarantine) - len(shown)),
        "splits": split_names, "balance": balance, "split_totals": totals,
        "split_source": validation.get("split_source"),
        "leakage": [f"{n} rows quarantined as {reason} (the first row of each id is kept)"
                    for reason, n in (validation.get("quarantine_reasons") or {}).items() if "duplicate" in reason]
                   + [w for w in warnings_list if _is_leakage(w)],
        "warnings": [w for w in warnings_list if not _is_leakage(w)],
        "failed_expectations": [{"name": e.get("expectation"), "kwargs": json.dumps(e.get("kwargs") or {})[:200],
                                 "count": e.get("unexpected_count"), "ids": (e.get("failing_ids") or [])[:5]}
                                for e in failed],
        "label_variants": validation.get("label_variants") or [],
        "manifest": validation.get("manifest"), "data_hash": validation.get("data_hash"),
    }


def _kind(modality: str | None) -> str:
    return "fusion" if modality == "fusion" else f"{modality or 'unknown'} only"


def _comparison(metrics: dict, meta: dict[str, dict]) -> dict[str, Any]:
    heads = metrics["heads"]
    registered = metrics.get("registered_head") or metrics.get("best_head")
    rows = []
    for name, m in heads.items():
        test = m.get("test") or {}
        rows.append({"name": name, "family": m.get("family", "frozen"), "kind": _kind(m.get("modality")),
                     "registered": name == registered, "variant": m.get("variant"),
                     "cells": [test.get("accuracy"), test.get("macro_f1"), test.get("roc_auc"), m.get("ece"),
                                m.get("ece_calibrated"), m.get("temperature"),
                                (m.get("val") or {}).get("macro_f1"), meta.get(name, {}).get("train_seconds")]})
    rows.sort(key=lambda r: -1.0 if r["cells"][1] is None else -r["cells"][1])

    def test_f1(name: str | None) -> float | None:
        return ((heads.get(name) or {}).get("test") or {}).get("macro_f1") if name else None

    gains = []
    fusion, unimodal = metrics.get("best_fusion"), metrics.get("best_unimodal")
    if fusion and unimodal and metrics.get("fusion_gain_macro_f1") is not None:
        gains.append({"what": f"best fusion {fusion} vs best unimodal {unimodal}",
                      "gain": metrics["fusion_gain_macro_f1"], "interval": interval_text(metrics, "over_unimodal")})
    compared = set()
    for baseline, what in (("linear_probe", "the linear_probe baseline"),
                           (metrics.get("best_traditional"), "the best traditional baseline")):
        if fusion and baseline and baseline in heads and baseline not in compared \
                and test_f1(fusion) is not None and test_f1(baseline) is not None:
            compared.add(baseline)
            gains.append({"what": f"best fusion {fusion} vs {what} {baseline}",
                          "gain": test_f1(fusion) - test_f1(baseline),
                          "interval": interval_text(metrics, "over_linear_probe") if baseline == "linear_probe" else ""})
    return {"rows": rows, "gains": gains, "registered": registered, "best_unimodal": unimodal,
            "best_traditional": metrics.get("best_traditional"), "selection": metrics.get("selection_metric")}


def _per_head(metrics: dict, meta: dict[str, dict], pred: dict[str, dict], reports_dir: Path,
              labels: list[str]) -> list[dict[str, Any]]:
    registered = metrics.get("registered_head") or metrics.get("best_head")
    out = []
    for index, (name, m) in enumerate(metrics["heads"].items()):
        full = m.get("test") or {}
        robustness = []
        for title, block in (("both modalities", full), ("without text", m.get("missing_text")),
                             ("without image", m.get("missing_image"))):
            block = block or {}
            f1, base = block.get("macro_f1"), full.get("macro_f1")
            robustness.append({"title": title, "available": bool(block), "accuracy": block.get("accuracy"),
                               "macro_f1": f1, "roc_auc": block.get("roc_auc"), "ece": block.get("ece"),
                               "drop": None if f1 is None or base is None or block is full else f1 - base})
        per_class = []
        for label in labels:
            rec = (m.get("per_class") or {}).get(str(label)) or {}
            f1 = rec.get("f1-score")
            per_class.append({"label": label, "precision": rec.get("precision"), "recall": rec.get("recall"),
                              "f1": f1, "width": 0 if f1 is None else round(100 * f1, 1),
                              "support": None if rec.get("support") is None else int(rec["support"])})
        info = meta.get(name, {})
        attribution = (m.get("attribution") or {}).get("overall")
        out.append({"name": name, "open": name == registered, "registered": name == registered,
                    "family": m.get("family", "frozen"), "kind": _kind(m.get("modality")),
                    "epochs": info.get("epochs_run"), "best_epoch": info.get("best_epoch"),
                    "seconds": info.get("train_seconds"), "temperature": m.get("temperature"),
                    "macro_f1": full.get("macro_f1"), "n_test": full.get("n"),
                    "figures": _figures(name, index, reports_dir, pred.get(name, {}), labels,
                                        m.get("temperature") or 1.0),
                    "robustness": robustness, "per_class": per_class, "attribution": attribution})
    return sorted(out, key=lambda h: not h["registered"])  # the registered head first, the rest as evaluated


def _removed_probabilities(head: str, family: str | None, models_dir: Path, pred: dict[str, np.ndarray], frame,
                           features: dict | None) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """The registered head's test probabilities without the image and without the text: from predictions.npz, or
    recomputed from the run's frozen features (a head trained before predictions.npz held them)."""
    if "test_proba_missing_image" in pred and "test_proba_missing_text" in pred:
        return pred["test_proba_missing_image"], pred["test_proba_missing_text"], None
    if family not in ("frozen", "baseline", "ensemble") or not (models_dir / head / WEIGHTS_FILE).is_file():
        return None, None, (f"{head}'s predictions lack the test rows with a modality removed, and only a "
                            "frozen-feature head can be run again on the features")
    paths = [(features or {}).get(k) for k in ("image_path", "text_path")]
    if not all(paths) or not all(Path(p).is_file() for p in paths):
        return None, None, (f"{head}'s predictions lack the test rows with a modality removed, and the run's "
                            "feature files were not given (or are gone) to recompute them")
    try:
        from crossmodal.heads.files import load_head
        from crossmodal.heads.inference import predict_proba, without

        image, text = (np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)
        row_of = {str(i): k for k, i in enumerate(frame["id"].astype(str))}
        rows = np.array([row_of[str(i)] for i in pred["test_ids"]], dtype=np.int64)
        model = load_head(models_dir / head)
        ti, tt = np.asarray(image[rows], dtype=np.float32), np.asarray(text[rows], dtype=np.float32)
        return predict_proba(model, without(ti), tt), predict_proba(model, ti, without(tt)), None
    except Exception as err:  # stale features, a head that no longer loads: say so instead of failing
        return None, None, f"could not recompute {head} with a modality removed ({type(err).__name__}: {err})"


def _attribution(metrics: dict, models_dir: Path, pred: dict[str, dict], frame, labels: list[str],
                 root: Path | None, features: dict | None) -> dict[str, Any]:
    from crossmodal.evaluation.calibration import apply_temperature

    head = metrics.get("registered_head") or metrics.get("best_head")
    p = pred.get(head) or {}
    out: dict[str, Any] = {"head": head, "mistakes": [], "correct": [], "reason": None, "n_test": 0,
                           "n_wrong": 0, "temperature": (metrics["heads"].get(head) or {}).get("temperature")}
    if not head or "test_proba" not in p or not len(p["test_proba"]):
        out["reason"] = "no test predictions of the registered head"
        return out
    proba = p["test_proba"].astype(np.float64)
    y = p["test_y"].astype(np.int64)
    rows = np.arange(len(y))
    predicted = proba.argmax(axis=1)
    conf = proba[rows, predicted]
    calibrated = apply_temperature(proba, out["temperature"] or 1.0)[rows, predicted]
    family = (metrics["heads"].get(head) or {}).get("family")
    no_image, no_text, out["reason"] = _removed_probabilities(head, family, models_dir, p, frame, features)
    attr_image = None if no_image is None else conf - np.asarray(no_image, dtype=np.float64)[rows, predicted]
    attr_text = None if no_text is None else conf - np.asarray(no_text, dtype=np.float64)[rows, predicted]
    gates = p.get("test_gate")
    by_id = frame.set_index(frame["id"].astype(str))
    wrong = np.flatnonzero(predicted != y)
    right = np.flatnonzero(predicted == y)
    # The most confident mistakes first: those are the rows a user of the champion is misled by.
    mistakes = wrong[np.argsort(-conf[wrong], kind="stable")][:GALLERY_MISTAKES]
    ranked = right[np.argsort(-conf[right], kind="stable")]
    spread = ranked if len(ranked) <= GALLERY_CORRECT else ranked[
        np.unique(np.linspace(0, len(ranked) - 1, GALLERY_CORRECT).round().astype(np.int64))]

    def item(i: int) -> dict[str, Any]:
        rid = str(p["test_ids"][i])
        rec = by_id.loc[rid] if rid in by_id.index else None
        if rec is not None and getattr(rec, "ndim", 1) > 1:  # a duplicated id: the first row
            rec = rec.iloc[0]
        text = "" if rec is None or rec["text"] is None else str(rec["text"])
        image = None if rec is None else rec["image"]
        uri, why = thumbnail_data_uri(image, root)
        return {"id": rid, "text": text[:CAPTION_CHARS] + ("…" if len(text) > CAPTION_CHARS else ""),
                "thumb": uri, "no_thumb": why, "true": labels[y[i]], "pred": labels[predicted[i]],
                "correct": bool(y[i] == predicted[i]), "p": float(conf[i]), "p_cal": float(calibrated[i]),
                "attr_image": None if attr_image is None else float(attr_image[i]),
                "attr_text": None if attr_text is None else float(attr_text[i]),
                "gate_image": None if gates is None else float(gates[i, 0])}

    out.update({"mistakes": [item(i) for i in mistakes], "correct": [item(i) for i in spread],
                "n_test": int(len(y)), "n_wrong": int(len(wrong)),
                "mean_image": None if attr_image is None else float(attr_image.mean()),
                "mean_text": None if attr_text is None else float(attr_text.mean())})
    return out


def _interval_svg_geometry(delta, low, high) -> dict[str, float] | None:
    """x positions (0..100) of the interval, the delta and zero on a symmetric axis around zero."""
    if delta is None or low is None or high is None:
        return None
    span = max(abs(low), abs(high), abs(delta), 1e-6) * 1.15

    def x(v: float) -> float:
        return round(50 + 50 * v / span, 2)

    return {"low": x(low), "high": x(high), "delta": x(delta), "zero": 50.0, "span": span}


def _gate(summary: dict | None) -> dict[str, Any]:
    if summary is None:
        return {"known": False, "note": "built without the run's summary: no gate decision to show"}
    decision = dict(summary.get("promotion") or {})
    ml = summary.get("mlflow") or {}
    if not decision:
        return {"known": False, "mlflow": ml, "note": "the gate did not run for this run"}
    if decision.get("unchanged") or summary.get("unchanged"):
        verdict = "unchanged"
    else:
        verdict = "promoted" if decision.get("promoted") else "kept"
    return {"known": True, "verdict": verdict, "decision": decision, "mlflow": ml,
            "geometry": _interval_svg_geometry(decision.get("delta"), decision.get("ci_low"),
                                               decision.get("ci_high"))}


# ----------------------------------------------------------------------------- rendering
def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def _signed(value, digits: int = 3) -> str:
    # + 0.0 turns a -0.0 left by rounding into 0.0: a drop of -0.0004 reads "+0.00", not "-0.00"
    return "n/a" if value is None else f"{round(float(value), digits) + 0.0:+.{digits}f}"


def _points(value) -> str:
    return "n/a" if value is None else f"{100 * float(value):+.1f} points"


def _sort_value(value) -> str:
    return "" if value is None else repr(float(value))


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    # autoescape for every template: ids, captions, labels and reasons come from a manifest
    env = Environment(loader=PackageLoader("crossmodal.evaluation", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt, signed=_signed, points=_points, sortvalue=_sort_value)
    return env


def build_report(validated_dir, models_dir, reports_dir, out_path, summary: dict | None = None,
                 images_root=None, features: dict | None = None) -> Path:
    """Write the run's report to ``out_path``; returns its path.

    ``validated_dir``, ``models_dir``, ``reports_dir``: what validation, training and evaluation wrote.
    ``summary``: the run's summary (``crossmodal.registry.publish.build_summary``) for the gate and the MLflow
    run; without it the gate section says so. ``images_root``: where thumbnails may come from (default: the data
    root recorded in validation.json). ``features``: the extraction result (``image_path``, ``text_path``), used
    only to recompute attribution for a head whose predictions lack the rows with a modality removed.
    ReportError when a file the report needs is missing.
    """
    validated_dir, models_dir, reports_dir, out_path = map(Path, (validated_dir, models_dir, reports_dir, out_path))
    validation = _read_json(validated_dir / VALIDATION_FILE, "validation results")
    metrics = _read_json(reports_dir / METRICS_FILE, "evaluation metrics")
    if not metrics.get("heads"):
        raise ReportError(f"{reports_dir / METRICS_FILE} lists no heads; re-run `crossmodal evaluate`")
    labels = metrics.get("labels")
    if labels is None:
        labels = _read_json(models_dir / LABELS_FILE, "labels")
    labels = [str(x) for x in labels]
    frame = _read_validated(validated_dir / VALIDATED_FILE)
    quarantine = _read_quarantine(validated_dir / QUARANTINE_FILE)
    root = images_root if images_root is not None else validation.get("data_root")
    root = Path(root) if root else None
    meta, pred = _load_heads(models_dir, list(metrics["heads"]))

    context = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "labels": labels,
        "data": _data_section(validation, quarantine, root, labels),
        "comparison": _comparison(metrics, meta),
        "heads": _per_head(metrics, meta, pred, reports_dir, labels),
        "attribution": _attribution(metrics, models_dir, pred, frame, labels, root, features),
        "gate": _gate(summary),
        "summary": summary or {},
        "thumb_px": THUMB_PX,
    }
    html = _environment().get_template(TEMPLATE).render(**context)
    write_bytes(out_path, html.encode("utf-8"))  # atomic: a reader (the MLflow upload) never sees half a page
    return out_path
