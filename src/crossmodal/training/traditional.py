"""Traditional baselines: handcrafted features and a scikit-learn logistic regression, in the same table as the heads.

    from crossmodal.training.traditional import train_traditional
    infos = train_traditional("work/validated/validated.parquet", data, labels, cfg.train, "work/models",
                              ["traditional_text", "traditional_image", "traditional_concat"])
    # data, labels: crossmodal.training.dataset.load_split_features(...); infos: {name: head.json}

They answer "what do the pretrained encoders buy?": ``traditional_text`` is TF-IDF of word 1..n-grams,
``traditional_image`` the image loaded as the deep pipeline loads it (``crossmodal.data.images``) described by
``train.traditional.image_features``: ``hog_color`` (HSV colour histograms, colour moments and HOG, Dalal & Triggs)
or ``sift_bovw`` (a bag of dense-SIFT visual words, ``crossmodal.training.visual_words``), and
``traditional_concat`` both blocks scaled to about unit row norm and concatenated: feature-level fusion.
``train.traditional.projection`` first maps the blocks into a smaller space (``crossmodal.training.projection``):
``pca`` or ``lda`` per modality (for the unimodal baselines too), or ``cca`` between image and text (the fused
baseline only); blocks wider than ``svd_dim`` are reduced first (TF-IDF by TruncatedSVD). Every vocabulary, scaler
and projection is fitted on the train rows only, and ``C`` is picked from ``train.traditional.c_grid`` by validation
macro-F1 (ties: lower log-loss). An absent text is an empty string, an absent image an all-zero (training-mean) row;
after a projection, an absent modality is the projected training mean. Each writes ``<out_dir>/<name>/head.json``
(family "traditional"; ``variant``, ``image_features`` and ``projection`` say what it was built from) and
``predictions.npz`` like every head, and no weights: baselines are never registered.
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


def _pixels(img, size: int) -> np.ndarray:
    from crossmodal.data.images import image_to_tensor

    return image_to_tensor(img, size).permute(1, 2, 0).numpy()  # uint8 (S, S, 3), centre crop


def image_descriptor(img, cfg) -> np.ndarray:
    """Colour histograms (HSV, ``cfg.color_bins`` per channel), RGB mean/std, and HOG of the grey image."""
    from PIL import Image

    arr = _pixels(img, cfg.image_size)
    rgb = Image.fromarray(arr, mode="RGB")
    hsv = np.asarray(rgb.convert("HSV"), dtype=np.float64)
    hists = [np.histogram(hsv[..., c], bins=cfg.color_bins, range=(0, 256))[0] for c in range(3)]
    colour = np.concatenate(hists) / float(arr.shape[0] * arr.shape[1])
    moments = np.concatenate([arr.reshape(-1, 3).mean(0), arr.reshape(-1, 3).std(0)]) / 255.0
    grey = np.asarray(rgb.convert("L"), dtype=np.float64) / 255.0
    return np.concatenate([colour, moments, hog(grey, cfg.hog_cell, cfg.hog_orientations)]).astype(np.float32)


def sift_descriptors(img, cfg) -> np.ndarray:
    """(n, 128) dense SIFT descriptors of the grey image at ``cfg.image_size``, every ``cfg.sift_step`` pixels."""
    from PIL import Image

    from crossmodal.training.visual_words import dense_sift

    grey = np.asarray(Image.fromarray(_pixels(img, cfg.image_size), mode="RGB").convert("L"))
    return dense_sift(grey, cfg.sift_step)


def _describe_images(paths, ids, describe) -> list:
    """``describe(image)`` of every row's image; None where the image is absent (null / empty path)."""
    from crossmodal.data.images import ImageError, load_image

    rows = []
    for path, row_id in zip(paths, ids, strict=True):
        if is_absent(path):
            rows.append(None)
            continue
        try:
            rows.append(describe(load_image(path)))
        except ImageError as err:
            raise TrainError(f"row {row_id!r}: image {path} cannot be read for the traditional baseline ({err}); "
                             "re-run `crossmodal validate`") from None
    return rows


def image_features(paths, ids, cfg) -> np.ndarray:
    """(N, D) colour + HOG descriptors (``image_descriptor``); an absent image (null / empty path) is a NaN row."""
    rows = _describe_images(paths, ids, lambda img: image_descriptor(img, cfg))
    dim = next((len(r) for r in rows if r is not None), None)
    if dim is None:
        raise TrainError("no row has an image: traditional_image / traditional_concat need some images")
    nan = np.full(dim, np.nan, dtype=np.float32)
    return np.stack([nan if r is None else r for r in rows]).astype(np.float32)


def sift_bovw_features(paths: dict, ids: dict, cfg, seed: int) -> dict[str, np.ndarray]:
    """{split: (N, words) bag of visual words}, the vocabulary fitted on the train split's descriptors only.

    ``paths`` / ``ids``: {split: list}. An absent image is a NaN row, one without descriptors (flat) a zero row.
    """
    from crossmodal.training.visual_words import bag_of_words, fit_vocabulary

    sets = {s: _describe_images(paths[s], ids[s], lambda img: sift_descriptors(img, cfg)) for s in paths}
    if all(d is None for rows in sets.values() for d in rows):
        raise TrainError("no row has an image: traditional_image / traditional_concat need some images")
    try:
        vocabulary = fit_vocabulary(sets["train"], cfg.sift_vocabulary, seed, cfg.sift_max_descriptors)
    except ValueError as err:  # too few descriptors for the vocabulary
        raise TrainError(f"sift_bovw: {err} in the train split; lower train.traditional.sift_vocabulary or "
                         "train.traditional.sift_step, or raise train.traditional.image_size") from None
    hists = {s: bag_of_words(rows, vocabulary) for s, rows in sets.items()}
    if cfg.sift_weighting == "hellinger":  # Hellinger kernel as a dot product (Arandjelovic & Zisserman 2012)
        hists = {s: np.sqrt(h) for s, h in hists.items()}
    return hists


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


# Keys of a feature block: the three splits, and the test rows with this modality removed.
WITHOUT = "test_without"
BLOCK_KEYS = (*SPLITS, WITHOUT)


def variant(name: str, tc) -> dict:
    """What a baseline is built from: {"variant": "tfidf+sift_bovw+cca", "image_features": ..., "projection": ...}.

    ``image_features`` is None for ``traditional_text`` (it reads no image); ``projection`` is the one this head
    applies: ``cca`` projects the fused baseline only, so the unimodal ones say "none" under it."""
    modality = MODALITY[name]
    projection = tc.projection if modality == "fusion" or tc.projection in ("pca", "lda") else "none"
    parts = ([] if modality == "image" else ["tfidf"]) + ([] if modality == "text" else [tc.image_features])
    parts += [] if projection == "none" else [projection]
    return {"variant": "+".join(parts), "image_features": None if modality == "text" else tc.image_features,
            "projection": projection}


class _Blocks:
    """Fitted feature blocks shared by the three baselines (each computed once per run).

    Each block is {key: rows} over ``BLOCK_KEYS``, with a matching {key: bool rows} of where the modality is present.
    """

    def __init__(self, frame, masks, data, cfg):
        self.frame, self.masks, self.data, self.cfg = frame, masks, data, cfg
        self._text = self._image = None
        self._reduced: dict = {}
        self._projected: dict = {}
        self.present: dict = {}
        self.seconds = {"text": 0.0, "image": 0.0, "projection": 0.0}

    def text(self):
        """{key: sparse TF-IDF}; a row is present when it has a word of the train vocabulary."""
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
            blocks[WITHOUT] = vec.transform([""] * len(texts["test"]))
            self._text = blocks
            self.present["text"] = {k: np.diff(b.indptr) > 0 for k, b in blocks.items()}
            self.seconds["text"] = time.perf_counter() - start
        return self._text

    def image(self):
        """{key: dense standardised descriptors}; absent images and the removed-image case are zero rows."""
        if self._image is None:
            from sklearn.preprocessing import StandardScaler

            start = time.perf_counter()
            tc = self.cfg.traditional
            paths = {s: self.frame.loc[self.masks[s], "image"].tolist() for s in SPLITS}
            if tc.image_features == "sift_bovw":
                raw = sift_bovw_features(paths, self.data.ids, tc, self.cfg.seed)
            else:
                raw = {s: image_features(paths[s], self.data.ids[s], tc) for s in SPLITS}
            scaler = StandardScaler().fit(raw["train"])  # NaN rows (absent images) are ignored by the fit
            blocks = {s: np.nan_to_num(scaler.transform(raw[s]), nan=0.0).astype(np.float32) for s in SPLITS}
            blocks[WITHOUT] = np.zeros_like(blocks["test"])
            self._image = blocks
            present = {s: ~np.isnan(raw[s]).any(axis=1) for s in SPLITS}
            self.present["image"] = {**present, WITHOUT: np.zeros(len(blocks[WITHOUT]), dtype=bool)}
            self.seconds["image"] = time.perf_counter() - start
        return self._image

    def block(self, modality: str):
        return self.text() if modality == "text" else self.image()

    def reduced(self, modality: str):
        """The block at most ``svd_dim`` wide (dense), the reduction fitted on the train rows that have it."""
        if modality not in self._reduced:
            from crossmodal.training.projection import fit_reducer

            block = self.block(modality)
            start = time.perf_counter()
            fit = _rows(block["train"], self.present[modality]["train"], modality)
            try:
                reduce = fit_reducer(fit, self.cfg.traditional.svd_dim, self.cfg.seed)
            except ValueError as err:
                raise TrainError(f"projection {self.cfg.traditional.projection!r}: the {modality} block cannot be "
                                 f"reduced to train.traditional.svd_dim ({err})") from None
            self._reduced[modality] = {k: reduce(b) for k, b in block.items()}
            self.seconds["projection"] += time.perf_counter() - start
        return self._reduced[modality]

    def projected(self, modality: str):
        """pca / lda of one modality's reduced block, fitted on its train rows (lda: with their labels)."""
        tc = self.cfg.traditional
        if modality not in self._projected:
            from crossmodal.training.projection import fit_projection

            reduced = self.reduced(modality)
            start = time.perf_counter()
            present = self.present[modality]
            fit, labels = _rows(reduced["train"], present["train"], modality), self.data.y["train"][present["train"]]
            try:
                project, _ = fit_projection(tc.projection, fit, tc.projection_dim, self.cfg.seed, labels=labels)
            except ValueError as err:
                raise TrainError(f"train.traditional.projection {tc.projection!r} on the {modality} block: "
                                 f"{err}") from None
            self._projected[modality] = _centre({k: project(b) for k, b in reduced.items()}, present)
            self.seconds["projection"] += time.perf_counter() - start
        return self._projected[modality]

    def cca(self):
        """(image, text) canonical variates, CCA fitted on the train rows that have both modalities."""
        if "cca" not in self._projected:
            from crossmodal.training.projection import fit_cca

            image, text = self.reduced("image"), self.reduced("text")
            start = time.perf_counter()
            both = self.present["image"]["train"] & self.present["text"]["train"]
            try:
                along_image, along_text, _ = fit_cca(image["train"][both], text["train"][both],
                                                     self.cfg.traditional.projection_dim)
            except ValueError as err:
                raise TrainError(f"train.traditional.projection 'cca' needs train rows with both an image and a "
                                 f"text: {err}") from None
            self._projected["cca"] = (
                _centre({k: along_image(b) for k, b in image.items()}, self.present["image"]),
                _centre({k: along_text(b) for k, b in text.items()}, self.present["text"]))
            self.seconds["projection"] += time.perf_counter() - start
        return self._projected["cca"]


def _rows(x, mask: np.ndarray, modality: str):
    if not mask.any():
        raise TrainError(f"no train row has the {modality} modality: the projection cannot be fitted")
    return x[np.flatnonzero(mask)]


def _centre(block: dict, present: dict) -> dict:
    """Projected rows minus the train mean, an absent modality at 0 (that mean), all scaled to about unit row norm
    so that two fused blocks weigh alike."""
    train = block["train"][present["train"]]
    mean = train.mean(axis=0)
    norm = float(np.linalg.norm(train - mean, axis=1).mean()) or 1.0  # a constant block stays at 0
    out = {}
    for key, rows in block.items():
        rows = (rows - mean) / norm
        rows[~present[key]] = 0.0
        out[key] = rows.astype(np.float32)
    return out


def _design(name: str, blocks: _Blocks) -> tuple[dict, dict]:
    """(features per split, {"text": test features with the text removed, "image": ... image removed})."""
    from scipy import sparse

    projection = variant(name, blocks.cfg.traditional)["projection"]
    if name in ("traditional_text", "traditional_image"):
        modality = MODALITY[name]
        b = blocks.projected(modality) if projection != "none" else blocks.block(modality)
        full, without = {s: b[s] for s in SPLITS}, b[WITHOUT]
        # Removing the other modality changes nothing: this head does not read it.
        if modality == "text":
            return full, {"text": without, "image": b["test"]}
        return full, {"text": b["test"], "image": without}
    if projection == "none":
        t, im = blocks.text(), blocks.image()
        scale = 1.0 / np.sqrt(im["train"].shape[1])  # standardised rows have norm ~sqrt(D): to ~1 like TF-IDF

        def both(text_part, image_part):
            return sparse.hstack([text_part, sparse.csr_matrix(image_part * scale)], format="csr")
    else:
        im, t = blocks.cca() if projection == "cca" else (blocks.projected("image"), blocks.projected("text"))

        def both(text_part, image_part):
            return np.hstack([text_part, image_part])

    x = {s: both(t[s], im[s]) for s in SPLITS}
    return x, {"text": both(t[WITHOUT], im["test"]), "image": both(t["test"], im[WITHOUT])}


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
            "name": name, "modality": MODALITY[name], "family": "traditional", **variant(name, cfg.traditional),
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
