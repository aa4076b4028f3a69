"""Dense SIFT descriptors and a bag of visual words (Csurka et al. 2004), the classic image feature of the baselines.

    from crossmodal.training.visual_words import dense_sift, fit_vocabulary, bag_of_words
    sets = [dense_sift(grey, step=8) for grey in train_greys]        # uint8 (S, S) -> (n_i, 128) float32
    vocabulary = fit_vocabulary(sets, size=256, seed=0, max_descriptors=50_000)
    hist = bag_of_words([dense_sift(g, step=8) for g in greys], vocabulary)   # (N, 256), rows sum to 1 (or 0)

Keypoints sit on a grid every ``step`` pixels, each describing a ``2 * step`` pixel patch, instead of SIFT's own
detector: a 32-pixel icon yields a handful of detected keypoints at best, and a grid gives every image the same
coverage. A patch with (almost) no gradient is flat background; its SIFT vector would be normalised noise, so it is
dropped, and an image of flat patches only has no descriptors and an all-zero histogram. The vocabulary is a
mini-batch k-means over (a seeded subsample of) the descriptors it is given: callers pass the train rows only.
"""

from __future__ import annotations

import numpy as np

DESCRIPTOR_DIM = 128  # SIFT: 4x4 cells x 8 orientations
# A patch whose mean gradient magnitude is below this (grey levels per pixel, 0..255) counts as flat.
FLAT_GRADIENT = 1.0


def grid_keypoints(height: int, width: int, step: int) -> np.ndarray:
    """(n, 2) x, y centres of the ``2 * step`` patches on a ``step`` grid that lie wholly inside the image."""
    half = step  # patch radius
    xs = np.arange(half, width - half + 1, step, dtype=np.float64)
    ys = np.arange(half, height - half + 1, step, dtype=np.float64)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    return grid


def dense_sift(grey: np.ndarray, step: int) -> np.ndarray:
    """(n, 128) float32 SIFT descriptors of a 2-D uint8 image on a ``step``-pixel grid, flat patches dropped."""
    import cv2

    g = np.ascontiguousarray(grey, dtype=np.uint8)
    if g.ndim != 2:
        raise ValueError(f"dense_sift needs a 2-D grey image, got shape {g.shape}")
    centres = grid_keypoints(g.shape[0], g.shape[1], step)
    if not len(centres):
        return np.zeros((0, DESCRIPTOR_DIM), dtype=np.float32)
    # Mean gradient magnitude inside each patch, from an integral image: flat patches are skipped before SIFT.
    f = g.astype(np.float64)
    gx, gy = np.zeros_like(f), np.zeros_like(f)
    gx[:, 1:-1] = (f[:, 2:] - f[:, :-2]) / 2
    gy[1:-1, :] = (f[2:, :] - f[:-2, :]) / 2
    integral = np.pad(np.hypot(gx, gy).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0 = (centres[:, 0] - step).astype(np.int64)
    y0 = (centres[:, 1] - step).astype(np.int64)
    x1, y1 = x0 + 2 * step, y0 + 2 * step
    energy = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / (2 * step) ** 2
    centres = centres[energy >= FLAT_GRADIENT]
    if not len(centres):
        return np.zeros((0, DESCRIPTOR_DIM), dtype=np.float32)
    # OpenCV's descriptor spans 4 cells of 3 * size / 2 pixels: size = patch / 6 makes it cover the 2 * step patch.
    keypoints = [cv2.KeyPoint(float(x), float(y), 2 * step / 6) for x, y in centres]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one thread, like the rest of training: the cores go to the other tasks
    try:
        _, desc = cv2.SIFT_create().compute(g, keypoints)
    finally:
        cv2.setNumThreads(threads)
    if desc is None:
        return np.zeros((0, DESCRIPTOR_DIM), dtype=np.float32)
    return desc.astype(np.float32)


def fit_vocabulary(descriptor_sets, size: int, seed: int, max_descriptors: int):
    """Mini-batch k-means with ``size`` words over the descriptors of ``descriptor_sets`` (a list of (n_i, 128)
    arrays, None for an absent image); at most ``max_descriptors`` of them, drawn with ``seed``."""
    from sklearn.cluster import MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    sets = [d for d in descriptor_sets if d is not None and len(d)]
    total = sum(len(d) for d in sets)
    if total < size:
        raise ValueError(f"the images yield {total} SIFT descriptors, fewer than the {size} visual words asked for")
    descriptors = np.concatenate(sets)
    rng = np.random.default_rng(seed)
    if total > max_descriptors:
        descriptors = descriptors[np.sort(rng.choice(total, max_descriptors, replace=False))]
    kmeans = MiniBatchKMeans(n_clusters=size, random_state=seed, batch_size=4096, n_init=3, max_no_improvement=20)
    with threadpool_limits(1):  # one BLAS thread, as for every training fit
        kmeans.fit(descriptors)
    return kmeans


def bag_of_words(descriptor_sets, vocabulary) -> np.ndarray:
    """(N, words) float32 L1-normalised word histograms; an image without descriptors is an all-zero row, an
    absent one (None) a NaN row."""
    from threadpoolctl import threadpool_limits

    words = vocabulary.n_clusters
    out = np.zeros((len(descriptor_sets), words), dtype=np.float32)
    sizes = [0 if d is None else len(d) for d in descriptor_sets]
    present = [d for d in descriptor_sets if d is not None and len(d)]
    if present:
        with threadpool_limits(1):
            assigned = vocabulary.predict(np.concatenate(present))
        row = np.repeat(np.arange(len(descriptor_sets)), sizes)
        np.add.at(out, (row, assigned), 1.0)
        counts = np.asarray(sizes, dtype=np.float32)[:, None]
        np.divide(out, counts, out=out, where=counts > 0)
    out[[d is None for d in descriptor_sets]] = np.nan
    return out
