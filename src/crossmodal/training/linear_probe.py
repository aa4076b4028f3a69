"""Fit the ``linear_probe`` head: a logistic regression on the standardised, concatenated frozen features.

    from crossmodal.training.linear_probe import train_linear_probe
    head, history = train_linear_probe(data, cfg.train, num_classes=3)   # a LinearProbeHead in eval mode

scikit-learn's L-BFGS multinomial logistic regression (balanced class weights when ``train.class_weights``) is
fitted once per C in ``train.linear_probe.c_grid``; the C with the best validation macro-F1 is kept (ties: lower
validation log-loss, then the smaller C, i.e. the stronger regularisation). Its coefficients are copied into a
:class:`~crossmodal.heads.linear.LinearProbeHead`, whose Standardize layers hold the same train statistics the
regression saw, so the torch head predicts the regression's probabilities. ``history`` has one record per C
(as the deep heads have one per epoch).
"""

from __future__ import annotations

import numpy as np

from crossmodal.config import TrainConfig
from crossmodal.errors import TrainError
from crossmodal.training.dataset import SplitFeatures


def _standardised(head, image: np.ndarray, text: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        xi = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        xt = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32))
        from crossmodal.heads.common import fill_missing

        xi, xt = fill_missing(xi, head.image_norm.mean), fill_missing(xt, head.text_norm.mean)
        return torch.cat([head.image_norm(xi), head.text_norm(xt)], dim=1).numpy().astype(np.float64)


def train_linear_probe(data: SplitFeatures, cfg: TrainConfig, num_classes: int):
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from crossmodal.heads.registry import build_head, fit_standardizers

    y_train, y_val = data.y["train"], data.y["val"]
    if len(np.unique(y_train)) < 2:
        raise TrainError("linear_probe needs at least two classes among the train rows")
    head = build_head("linear_probe", data.image_dim, data.text_dim, num_classes, hidden_dim=0, dropout=0.0)
    fit_standardizers(head, data.image["train"], data.text["train"], data.statistics)
    x_train = _standardised(head, data.image["train"], data.text["train"])
    x_val = _standardised(head, data.image["val"], data.text["val"])
    present = np.unique(y_train)  # a class absent from train gets no column: it is never predicted
    history, best = [], None
    for epoch, c in enumerate(cfg.linear_probe.c_grid, start=1):
        clf = LogisticRegression(C=c, max_iter=cfg.linear_probe.max_iter,
                                 class_weight="balanced" if cfg.class_weights else None)
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter bounds the time; the val score judges it
            clf.fit(x_train, y_train)
        proba = np.zeros((len(y_val), num_classes))
        if len(y_val):
            proba[:, present] = clf.predict_proba(x_val)
        f1 = float(f1_score(y_val, proba.argmax(1), average="macro", zero_division=0)) if len(y_val) else 0.0
        loss = float(-np.log(np.clip(proba[np.arange(len(y_val)), y_val], 1e-12, None)).mean()) if len(y_val) else 0.0
        history.append({"epoch": epoch, "C": float(c), "val_macro_f1": f1, "val_loss": loss, "train_loss": None})
        key = (-f1, loss, c)
        if best is None or key < best[0]:
            best = (key, clf)
    clf = best[1]
    coef = np.zeros((num_classes, x_train.shape[1]))
    intercept = np.full(num_classes, -1e4)  # a class never seen in train: probability ~0, as in the regression
    if len(present) == 2:  # scikit-learn keeps one row for two classes: logits (-z/2, z/2) give the same softmax
        coef[present[0]], coef[present[1]] = -clf.coef_[0] / 2, clf.coef_[0] / 2
        intercept[present[0]], intercept[present[1]] = -clf.intercept_[0] / 2, clf.intercept_[0] / 2
    else:
        coef[present], intercept[present] = clf.coef_, clf.intercept_
    with torch.no_grad():
        head.classifier.weight.copy_(torch.from_numpy(coef).float())
        head.classifier.bias.copy_(torch.from_numpy(intercept).float())
    for record in history:
        record["chosen"] = record["C"] == float(clf.C)
    return head.eval(), history
