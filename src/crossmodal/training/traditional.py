"""Traditional baselines: handcrafted features and a scikit-learn logistic regression, in the same table as the heads.

    from crossmodal.training.traditional import train_traditional
    infos = train_traditional("work/validated/validated.parquet", data, labels, cfg.train, "work/models",
                              ["traditional_text", "traditional_image", "traditional_concat"])
    # data, labels: crossmodal.training.dataset.load_split_features(...); infos: {name: head.json}

They answer "what do the pretrained encoders buy?": ``traditional_text`` is TF-IDF of word 1..n-grams,
``traditional_image`` HSV colour histograms, colour moments and HOG (Dalal & Triggs) of the image loaded as the
deep pipeline loads it (``crossmodal.data.images``), ``traditional_concat`` both blocks scaled to about unit row
norm. ``C`` is picked from ``train.traditional.c_grid`` by validation macro-F1 (ties: lower log-loss). An absent
text is an empty string, an absent image an all-zero (training-mean) row. Each writes ``<out_dir>/<name>/head.json``
(family "traditional") and ``predictions.npz`` like every head, and no weights: baselines are never registered.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from crossmodal.artifacts import HEAD_FILE, PREDICTIONS_FILE
from crossmodal.data.manifest import is_absent
from crossmodal.data.split import SPLITS
from crossmodal.data.validated import read_validated
from crossmodal.errors import TrainError

MODALITY = {"traditional_text": "text", "traditional_image": "image", "traditional_concat": "fusion"}


# ---------------------------------------------------------------- image features


def hog(gray: np.ndarray, cell: int = 8, orientations: int = 9) -> np.ndarray:
    """HOG of a 2-D float image: unsigned gradients, ``cell``-pixel cells, 2x2-cell blocks with L2-Hys."""
    g = np.asarray(gray, dtype=np.float64)
    gx, gy = np.zeros_like(g), np.zeros_like(g)
    gx[:, 1:-1] = g[:, 2:] - g[:, :-2]  # centred differences, as in Dalal & Triggs
    gy[1:-1, :] = g[2:, :] - g[:-2, :]
    magnitude = np.hypot(gx, gy)
    angle = np.rad2deg(np.arctan2(gy, gx)) % 180.0
    # Each pixel votes into its two nearest orientation bins, linearly by distance to the bin centres.
    pos = angle / (180.0 / orientations) - 0.5
    low = np.floor(pos).astype(np.int64)
    w_high = pos - low
    ny, nx = g.shape[0] // cell, g.shape[1] // cell
    if ny < 2 or nx < 2:
        raise ValueError(f"HOG needs at least 2x2 cells: image {g.shape} with {cell}-pixel cells")
    cy = np.minimum(np.arange(g.shape[0]) // cell, ny - 1)[:, None]
    cx = np.minimum(np.arange(g.shape[1]) // cell, nx - 1)[None, :]
    cell_index = np.broadcast_to(cy * nx + cx, g.shape).ravel()
    hist = np.zeros(ny * nx * orientations)
    for bins, weight in ((low % orientations, 1.0 - w_high), ((low + 1) % orientations, w_high)):
        hist += np.bincount(cell_index * orientations + bins.ravel(), weights=(magnitude * weight).ravel(),
                            minlength=hist.size)
    hist = hist.reshape(ny, nx, orientations)
    blocks = np.concatenate([hist[:-1, :-1], hist[1:, :-1], hist[:-1, 1:], hist[1:, 1:]], axis=2)
    eps = 1e-5
    blocks = blocks / np.sqrt((blocks**2).sum(axis=2, keepdims=True) + eps**2)
    blocks = np.minimum(blocks, 0.2)  # the "Hys" of L2-Hys: clip, then renormalise
    blocks = blocks / np.sqrt((blocks**2).sum(axis=2, keepdims=True) + eps**2)
    return blocks.ravel()


def image_descriptor(img, cfg) -> np.ndarray:
    """Colour histograms (HSV, ``cfg.color_bins`` per channel), RGB mean/std, and HOG of the grey image."""
    from PIL import Image

    from crossmodal.data.images import image_to_tensor

    arr = image_to_tensor(img, cfg.image_size).permute(1, 2, 0).numpy()  # uint8 (S, S, 3), centre crop
    rgb = Image.fromarray(arr, mode="RGB")
    hsv = np.asarray(rgb.convert("HSV"), dtype=np.float64)
    hists = [np.histogram(hsv[..., c], bins=cfg.color_bins, range=(0, 256))[0] for c in range(3)]
    colour = np.concatenate(hists) / float(arr.shape[0] * arr.shape[1])
    moments = np.concatenate([arr.reshape(-1, 3).mean(0), arr.reshape(-1, 3).std(0)]) / 255.0
    grey = np.asarray(rgb.convert("L"), dtype=np.float64) / 255.0
    return np.concatenate([colour, moments, hog(grey, cfg.hog_cell, cfg.hog_orientations)]).astype(np.float32)


def image_features(paths, ids, cfg) -> np.ndarray:
    """(N, D) descriptors; an absent image (null / empty path) is a NaN row."""
    from crossmodal.data.images import ImageError, load_image

    rows, dim = [], None
    for path, row_id in zip(paths, ids, strict=True):
        if is_absent(path):
            rows.append(None)
            continue
        try:
            feats = image_descriptor(load_image(path), cfg)
        except ImageError as err:
            raise TrainError(f"row {row_id!r}: image {path} cannot be read for the traditional baseline ({err}); "
                             "re-run `crossmodal validate`") from None
        dim = len(feats)
        rows.append(feats)
    if dim is None:
        raise TrainError("no row has an image: traditional_image / traditional_concat need some images")
    nan = np.full(dim, np.nan, dtype=np.float32)
    return np.stack([nan if r is None else r for r in rows]).astype(np.float32)


# ---------------------------------------------------------------- fitting


def _full_proba(clf, x, num_classes: int) -> np.ndarray:
    """predict_proba with one column per label, also when a class had no train rows (its column stays 0)."""
    out = np.zeros((x.shape[0], num_classes), dtype=np.float64)
    if x.shape[0]:
        out[:, clf.classes_] = clf.predict_proba(x)
    return out.astype(np.float32)


def _log_loss(y: np.ndarray, proba: np.ndarray) -> float | None:
    if not len(y):
        return None
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_select(x: dict, y: dict, num_classes: int, cfg) -> tuple[object, list[dict], int]:
    """One logistic regression per C in ``cfg.traditional.c_grid``; keep the best on validation.

    Returns (classifier, history with one row per C, 1-based index of the kept row).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from crossmodal.training.loop import is_better, macro_f1

    history, best = [], None
    for i, c in enumerate(cfg.traditional.c_grid, start=1):
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced" if cfg.class_weights else None)
        # One BLAS thread, as for the deep heads (crossmodal.training.loop.torch_threads): with anything else
        # running, OpenBLAS threads wait on each other and the fit slows down instead of speeding up.
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)  # the best C on validation decides, not the solver
            clf.fit(x["train"], y["train"])
        p_train, p_val = _full_proba(clf, x["train"], num_classes), _full_proba(clf, x["val"], num_classes)
        f1 = macro_f1(y["val"], p_val.argmax(1)) if len(y["val"]) else 0.0
        row = {"epoch": i, "C": float(c), "train_loss": _log_loss(y["train"], p_train),
               "val_loss": _log_loss(y["val"], p_val), "val_macro_f1": f1}
        history.append(row)
        if best is None or is_better(f1, row["val_loss"] or 0.0, best[1]["val_macro_f1"], best[1]["val_loss"] or 0.0):
            best = (clf, row)
    return best[0], history, best[1]["epoch"]


def _texts(frame, split_mask) -> list[str]:
    from crossmodal.data.text import clean_text

    return [clean_text(None if is_absent(t) else t) for t in frame.loc[split_mask, "text"]]


class _Blocks:
    """Fitted feature blocks shared by the three baselines (each computed once per run)."""

    def __init__(self, frame, masks, data, cfg):
        self.frame, self.masks, self.data, self.cfg = frame, masks, data, cfg
        self._text = self._image = None
        self.seconds = {"text": 0.0, "image": 0.0}

    def text(self):
        """{split: sparse TF-IDF}, and the same with every text removed (empty rows) for the test split."""
        if self._text is None:
            from sklearn.feature_extraction.text import TfidfVectorizer

            start = time.perf_counter()
            tc = self.cfg.traditional
            vec = TfidfVectorizer(ngram_range=(1, tc.ngram_max), max_features=tc.max_features, sublinear_tf=True,
                                  token_pattern=r"(?u)\b\w+\b", dtype=np.float32)
            texts = {s: _texts(self.frame, self.masks[s]) for s in SPLITS}
            try:
                vec.fit(texts["train"])
            except ValueError as err:  # "empty vocabulary": no train row has a word
                raise TrainError(f"traditional_text cannot build a vocabulary from the train texts ({err})") from None
            blocks = {s: vec.transform(texts[s]) for s in SPLITS}
            blocks["test_without"] = vec.transform([""] * len(texts["test"]))
            self._text = blocks
            self.seconds["text"] = time.perf_counter() - start
        return self._text

    def image(self):
        """{split: dense standardised descriptors}; absent images and the removed-image case are zero rows."""
        if self._image is None:
            from sklearn.preprocessing import StandardScaler

            start = time.perf_counter()
            raw = {s: image_features(self.frame.loc[self.masks[s], "image"].tolist(), self.data.ids[s],
                                     self.cfg.traditional) for s in SPLITS}
            scaler = StandardScaler().fit(raw["train"])  # NaN rows (absent images) are ignored by the fit
            blocks = {s: np.nan_to_num(scaler.transform(raw[s]), nan=0.0).astype(np.float32) for s in SPLITS}
            blocks["test_without"] = np.zeros_like(blocks["test"])
            self._image = blocks
            self.seconds["image"] = time.perf_counter() - start
        return self._image


def _design(name: str, blocks: _Blocks) -> tuple[dict, dict]:
    """(features per split, {"text": test features with the text removed, "image": ... image removed})."""
    from scipy import sparse

    if name == "traditional_text":
        t = blocks.text()
        return {s: t[s] for s in SPLITS}, {"text": t["test_without"], "image": t["test"]}
    if name == "traditional_image":
        im = blocks.image()
        return {s: im[s] for s in SPLITS}, {"text": im["test"], "image": im["test_without"]}
    t, im = blocks.text(), blocks.image()
    scale = 1.0 / np.sqrt(im["train"].shape[1])  # standardised rows have norm ~sqrt(D): bring them to ~1 like TF-IDF

    def both(text_part, image_part):
        return sparse.hstack([text_part, sparse.csr_matrix(image_part * scale)], format="csr")

    x = {s: both(t[s], im[s]) for s in SPLITS}
    return x, {"text": both(t["test_without"], im["test"]), "image": both(t["test"], im["test_without"])}


def train_traditional(validated_path, data, labels: list[str], cfg, out_dir, names: list[str]) -> dict[str, dict]:
    """Fit the named baselines and write their head.json + predictions.npz; returns each head's info dict."""
    from crossmodal.evaluation.metrics import compute_metrics

    frame = read_validated(validated_path, ("text", "image", "split"), TrainError)
    split = frame["split"].astype(str).to_numpy()
    masks = {s: split == s for s in SPLITS}
    blocks = _Blocks(frame, masks, data, cfg)
    num_classes = len(labels)
    out: dict[str, dict] = {}
    for name in names:
        start = time.perf_counter()
        before = dict(blocks.seconds)
        x, removed = _design(name, blocks)
        clf, history, best = fit_select(x, data.y, num_classes, cfg)
        proba = {s: _full_proba(clf, x[s], num_classes) for s in ("val", "test")}
        # Time = fitting plus the feature blocks this head computed first (a later head reuses them).
        seconds = time.perf_counter() - start
        feature_seconds = {k: round(blocks.seconds[k] - before[k], 3) for k in blocks.seconds}
        val_metrics = compute_metrics(data.y["val"], proba["val"], labels)
        info = {
            "name": name, "modality": MODALITY[name], "family": "traditional",
            "init_args": {"name": name, "classifier": "logistic_regression", "C": history[best - 1]["C"],
                          "num_features": int(x["train"].shape[1]), "num_classes": num_classes},
            "best_epoch": best, "epochs_run": len(history), "train_seconds": round(seconds, 3),
            "feature_seconds": feature_seconds, "val_metrics": val_metrics, "history": history, "labels": labels,
            "config": cfg.model_dump(),
        }
        head_dir = Path(out_dir) / name
        head_dir.mkdir(parents=True, exist_ok=True)
        (head_dir / HEAD_FILE).write_text(json.dumps(info, indent=2))
        np.savez(
            head_dir / PREDICTIONS_FILE,
            **{f"{s}_proba": proba[s] for s in ("val", "test")},
            **{f"{s}_y": data.y[s] for s in ("val", "test")},
            **{f"{s}_ids": data.ids[s].astype(str) for s in ("val", "test")},
            test_proba_missing_text=_full_proba(clf, removed["text"], num_classes),
            test_proba_missing_image=_full_proba(clf, removed["image"], num_classes),
        )
        out[name] = info
    return out
