"""In-memory image and label arrays: layout, range checks, conversion to uint8 NCHW."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from defense_core.data.limits import ArchiveLimits, check_decoded_bytes
from defense_core.errors import DatasetError, TooLargeError
from defense_core.imageset import ImageSet
from defense_core.spec import MAX_CLASSES, MAX_INPUT_SIDE

# Raw NPZ bytes converted per step: bounds the temporaries of float/int -> uint8.
_CHUNK_BYTES = 16 * 1024**2


def arrays_to_imageset(
    x: np.ndarray,
    y: np.ndarray,
    target: np.ndarray | None = None,
    *,
    max_samples: int = ArchiveLimits.max_samples,
    max_decoded_bytes: int = ArchiveLimits.max_decoded_bytes,
) -> ImageSet:
    """Validate arrays (see :func:`load_npz`) and convert them to an :class:`ImageSet`."""
    x = np.asarray(x)
    limits = ArchiveLimits(max_samples=max_samples, max_decoded_bytes=max_decoded_bytes)
    layout = image_layout(x.shape, x.dtype, limits)
    images = convert_images(x, layout, keep=True)
    assert images is not None
    labels = to_labels(np.asarray(y), layout.n, "y")
    targets = None
    if target is not None:
        targets = target_labels(np.asarray(target), layout.n)
    return ImageSet(x=torch.from_numpy(images), y=labels, target=targets)


@dataclass(frozen=True)
class Layout:
    """Where ``x``'s samples, channels and sides are; the uint8 NCHW shape it becomes."""

    n: int
    c: int
    h: int
    w: int
    channels_last: bool  # [N, H, W, C]; [N, H, W] and [N, C, H, W] are not

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    def to_nchw(self, samples: np.ndarray) -> np.ndarray:
        """A view of samples ``[k, ...]`` as ``[k, C, H, W]``."""
        if samples.ndim == 3:
            return samples[:, None, :, :]
        return samples.transpose(0, 3, 1, 2) if self.channels_last else samples


def image_layout(shape: tuple[int, ...], dtype: np.dtype, limits: ArchiveLimits) -> Layout:
    """Check ``x``'s shape, dtype and decoded size, from its header: nothing is read yet."""
    if len(shape) == 3:
        n, h, w = shape
        layout = Layout(n=n, c=1, h=h, w=w, channels_last=False)
    elif len(shape) == 4:
        if shape[3] in (1, 3):
            layout = Layout(n=shape[0], c=shape[3], h=shape[1], w=shape[2], channels_last=True)
        elif shape[1] in (1, 3):
            layout = Layout(n=shape[0], c=shape[1], h=shape[2], w=shape[3], channels_last=False)
        else:
            raise DatasetError(
                f"cannot tell the channel axis of x with shape {tuple(shape)}: "
                "expected [N, H, W, C] or [N, C, H, W] with C = 1 or 3"
            )
    else:
        raise DatasetError(
            f"x must be [N, H, W], [N, H, W, C] or [N, C, H, W]; got shape {tuple(shape)}"
        )
    if layout.n == 0:
        raise DatasetError("x holds no images")
    if layout.n > limits.max_samples:
        raise TooLargeError(f"x holds {layout.n} images; the limit is {limits.max_samples}")
    if not (1 <= layout.h <= MAX_INPUT_SIDE and 1 <= layout.w <= MAX_INPUT_SIDE):
        raise DatasetError(
            f"images are {layout.h}x{layout.w}; sides must be in [1, {MAX_INPUT_SIDE}]"
        )
    if dtype != np.uint8 and dtype.kind not in "fiu":
        raise DatasetError(f"x has dtype {dtype}; expected uint8, or float in [0, 1]")
    check_decoded_bytes(layout.n, layout.c, layout.h, layout.w, limits)
    return layout


def convert_images(x: np.ndarray, layout: Layout, *, keep: bool) -> np.ndarray | None:
    """In-memory ``x`` as uint8 NCHW: uint8 NCHW as is, everything else chunk by chunk."""
    if keep and x.dtype == np.uint8:
        nchw = layout.to_nchw(x)
        if nchw.flags.c_contiguous:
            return nchw
    sample_bytes = math.prod(x.shape[1:]) * x.dtype.itemsize
    return convert_chunks(lambda start, stop: x[start:stop], layout,
                           sample_bytes=sample_bytes, keep=keep)


def convert_chunks(
    read_samples: Callable[[int, int], np.ndarray], layout: Layout, *, sample_bytes: int, keep: bool
) -> np.ndarray | None:
    """Fill one uint8 NCHW array from ``read_samples(start, stop)``, a bounded chunk at a time.

    Only the output and one chunk's temporaries are ever held, whatever the
    input dtype (a float64 ``x`` is 8x its uint8 size) or layout.
    """
    out = np.empty(layout.shape, dtype=np.uint8) if keep else None
    step = max(1, _CHUNK_BYTES // max(1, sample_bytes))
    for start in range(0, layout.n, step):
        stop = min(start + step, layout.n)
        pixels = _pixels_to_uint8(layout.to_nchw(read_samples(start, stop)))
        if out is not None:
            out[start:stop] = pixels
    return out


def _pixels_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Range-check one chunk and convert it (uint8 passes through as a view)."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind == "f":
        chunk = pixels.astype(np.float32)
        if not np.isfinite(chunk).all():
            raise DatasetError("float images contain NaN or infinite values")
        lo, hi = float(chunk.min()), float(chunk.max())
        if lo < 0.0 or hi > 1.0:
            raise DatasetError(
                f"float images must be in [0, 1]; x spans [{lo:g}, {hi:g}] "
                "(for 0-255 values store x as uint8)"
            )
        chunk *= 255.0
        np.rint(chunk, out=chunk)
        return chunk.astype(np.uint8)
    lo, hi = int(pixels.min()), int(pixels.max())
    if lo < 0 or hi > 255:
        raise DatasetError(f"integer images must be in [0, 255]; x spans [{lo}, {hi}]")
    return pixels.astype(np.uint8)


def check_label_layout(name: str, dtype: np.dtype, shape: tuple[int, ...], n: int) -> None:
    if dtype.kind not in "iu":
        raise DatasetError(
            f"`{name}` must hold integer labels, got dtype {dtype} (use .astype(np.int64))"
        )
    if len(shape) != 1:
        raise DatasetError(f"`{name}` must be 1-D [N]; got shape {tuple(shape)}")
    if shape[0] != n:
        raise DatasetError(f"`{name}` has {shape[0]} entries but x has {n} images")


def to_labels(values: np.ndarray, n: int, name: str) -> torch.Tensor:
    check_label_layout(name, values.dtype, values.shape, n)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0:
        raise DatasetError(f"`{name}` has a negative label ({lo}); labels are class indices from 0")
    if hi >= MAX_CLASSES:
        raise DatasetError(f"`{name}` has label {hi}; labels must be below {MAX_CLASSES}")
    return torch.from_numpy(values.astype(np.int64))


def target_labels(values: np.ndarray, n: int) -> torch.Tensor:
    """``target`` as one label per sample: a scalar is the target of all ``n``."""
    if values.ndim == 0:
        values = np.full(n, values, dtype=values.dtype)
    return to_labels(values, n, "target")
