"""Image sources for the encoders: paths or bytes -> decoded, resized uint8 tensors, one batch at a time.

``ImageSources`` is the map-style dataset both image paths use: DataLoader workers (a GPU machine, or an explicit
``encoders.num_workers``) and the CPU thread pipeline (``FeatureExtractor._iter_threaded``).
"""

from __future__ import annotations


# --------------------------------------------------------------------------- image decoding (DataLoader)
class ImageSources:
    """Map-style dataset: index -> (index, uint8 tensor or JPEG bytes tensor, error or None).

    On the CPU every image is decoded and resized here, in the DataLoader's workers, with the very
    functions validation and serving use. With ``raw_jpeg`` (a CUDA device), plain RGB JPEGs are only read
    and come back as 1-D byte tensors tagged ``jpeg``, for batched decoding on the GPU (crossmodal.features.jpeg).
    Decoding errors are returned, not raised: raised inside a worker they come back wrapped in a worker
    traceback; returned, the main process can name the image plainly.
    """

    def __init__(self, sources: list, size: int, max_pixels: int | None, names: list[str] | None,
                 raw_jpeg: bool = False):
        self.sources, self.size, self.max_pixels, self.names = sources, size, max_pixels, names
        self.raw_jpeg = raw_jpeg

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        import torch

        from crossmodal.data.images import image_to_tensor, load_image

        src = self.sources[i]
        if self.raw_jpeg:
            try:
                if isinstance(src, bytes | bytearray | memoryview):
                    data = bytes(src)
                else:
                    with open(src, "rb") as fh:
                        data = fh.read()
            except (OSError, TypeError):
                data = None  # the CPU path below names the problem
            from crossmodal.features.jpeg import gpu_ready_jpeg

            if data is not None and gpu_ready_jpeg(data, self.max_pixels):
                return i, ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), None
        try:
            return i, ("pixels", image_to_tensor(load_image(src, self.max_pixels), self.size)), None
        except Exception as err:  # ImageError, or a TypeError for a source that is neither path nor bytes
            return i, None, self.describe(i, err)

    def describe(self, i: int, err: BaseException) -> str:
        src = self.sources[i]
        what = self.names[i] if self.names else f"image {i}"
        shown = f"{len(src)} bytes" if isinstance(src, bytes | bytearray) else str(src)
        return f"{what} ({shown}): {err}"


def collate(batch: list):
    idx = [b[0] for b in batch]
    errors = [b[2] for b in batch if b[2] is not None]
    return idx, [b[1] for b in batch], errors
