"""Projections of the baselines' feature blocks into a smaller, shared space before they are fused.

    from crossmodal.training.projection import fit_reducer, fit_projection, fit_cca
    reduce = fit_reducer(tfidf_train, dim=256, seed=0)                   # sparse TF-IDF -> TruncatedSVD (LSA)
    pca, dims = fit_projection("pca", reduce(tfidf_train), dim=64, seed=0)  # or "lda" with labels=y_train
    text_64 = pca(reduce(tfidf_test))
    image_cca, text_cca, dims = fit_cca(image_train, text_train, dim=64)  # rows: the same items, both modalities
    fused = np.hstack([image_cca(image_test), text_cca(text_test)])

Every transform is fitted on the rows it is given (the caller passes train rows only) and returns a callable that
maps any rows of the same block to a dense float32 matrix. PCA and LDA project each modality on its own; CCA
(Hotelling 1936) finds the image and text directions that correlate most across items, the classic
"shared subspace" of cross-modal retrieval and fusion. LDA keeps at most ``classes - 1`` dims, CCA at most the
rank of either block, and every projection at most as many dims as the rows and features allow.
"""

from __future__ import annotations

import warnings

import numpy as np

METHODS = ("pca", "lda", "cca")


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def fit_reducer(x_fit, dim: int, seed: int):
    """A callable mapping rows of the block to at most ``dim`` dense dims: TruncatedSVD of a sparse block (it needs
    no centring, so TF-IDF stays sparse while fitting), PCA of a dense block wider than ``dim``, else the rows as
    they are."""
    from scipy import sparse
    from sklearn.decomposition import PCA, TruncatedSVD
    from threadpoolctl import threadpool_limits

    rows, width = x_fit.shape
    if sparse.issparse(x_fit):
        k = min(dim, width - 1, rows - 1)  # ARPACK/randomised SVD: fewer components than either side
        if k < 1:
            raise ValueError(f"TruncatedSVD needs at least 2 rows and 2 features to fit, got {rows} x {width}")
        model = TruncatedSVD(n_components=k, random_state=seed)
    elif width > dim:
        model = PCA(n_components=min(dim, rows), random_state=seed)
    else:
        return lambda x: _dense(x).astype(np.float32)
    with threadpool_limits(1):  # one BLAS thread, as for every training fit
        model.fit(x_fit)

    def transform(x):
        with threadpool_limits(1):
            return np.asarray(model.transform(x), dtype=np.float32)

    return transform


def fit_projection(method: str, x_fit, dim: int, seed: int, labels=None):
    """PCA (``dim`` principal components) or LDA (at most ``min(dim, classes - 1)`` discriminants, ``labels``
    needed) fitted on dense ``x_fit``; returns (transform callable, number of output dims)."""
    from sklearn.decomposition import PCA
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from threadpoolctl import threadpool_limits

    x_fit = _dense(x_fit)
    rows, width = x_fit.shape
    if method == "pca":
        k = min(dim, rows, width)
        model = PCA(n_components=k, random_state=seed)
        args = (x_fit,)
    elif method == "lda":
        if labels is None:
            raise ValueError("lda needs the labels of the rows it is fitted on")
        classes = len(np.unique(labels))
        if classes < 2:
            raise ValueError(f"lda needs at least 2 classes among the rows it is fitted on, got {classes}")
        k = min(dim, classes - 1, width)
        # Shrinkage (Ledoit-Wolf) keeps the within-class covariance invertible when features rival rows.
        model = LinearDiscriminantAnalysis(n_components=k, solver="eigen", shrinkage="auto")
        args = (x_fit, np.asarray(labels))
    else:
        raise ValueError(f"unknown per-modality projection {method!r}; expected pca or lda")
    with threadpool_limits(1):
        model.fit(*args)

    def transform(x):
        with threadpool_limits(1):
            return np.asarray(model.transform(_dense(x)), dtype=np.float32)

    return transform, k


def fit_cca(x_fit, y_fit, dim: int):
    """CCA between two blocks of the same rows (dense); returns (x transform, y transform, number of dims).

    Each transform maps rows of its own block only: a canonical variate of the image block does not depend on
    the text, so a row without one modality still gets the other's projection."""
    from sklearn.cross_decomposition import CCA
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    x_fit, y_fit = _dense(x_fit), _dense(y_fit)
    if len(x_fit) != len(y_fit):
        raise ValueError(f"cca needs the same rows in both blocks, got {len(x_fit)} and {len(y_fit)}")
    if len(x_fit) < 2:
        raise ValueError(f"cca needs at least 2 rows with both blocks, got {len(x_fit)}")
    # No more pairs than either block has independent directions: past its rank a block's residual is constant
    # and the further "canonical variates" are noise.
    k = min(dim, len(x_fit) - 1, *(np.linalg.matrix_rank(b - b.mean(0)) for b in (x_fit, y_fit)))
    if k < 1:
        raise ValueError("cca needs blocks that vary across the rows; one of them is constant")
    # sklearn's own tolerance: a looser one fits faster but moved the fused macro-F1 (docs/heads.md).
    model = CCA(n_components=k, max_iter=500)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a late component that converges slowly still helps
        model.fit(x_fit, y_fit)
    # Canonical variates: (x - mean) / std @ rotations, the same as CCA.transform, one block at a time.
    sides = {}
    for side, block in (("x", x_fit), ("y", y_fit)):
        mean, std = block.mean(0), block.std(0, ddof=1)
        std[std == 0] = 1.0  # what CCA(scale=True) does with a constant column
        rotation = getattr(model, f"{side}_rotations_")
        sides[side] = (mean, std, rotation)

    def along(side):
        mean, std, rotation = sides[side]
        return lambda x: (((_dense(x) - mean) / std) @ rotation).astype(np.float32)

    return along("x"), along("y"), k
