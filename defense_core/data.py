"""Dataset readers: NPZ arrays and ImageFolder archives (zip, tar, tar.gz).

Uploads are untrusted, so every reader bounds what it reads *before* reading
it: member counts, declared and actual uncompressed sizes, compression ratios
(bombs), array shapes declared in ``.npy`` headers, image sizes read from the
image headers, and the bytes the decoded images will take
(:attr:`ArchiveLimits.max_decoded_bytes`, checked before anything is decoded).
Nothing is ever extracted to disk, and archive members with absolute paths,
``..`` components, links or device types are refused outright. NPZ arrays are
read with ``allow_pickle=False``.

Memory follows the limits, not the member count or what a file declares:
archive members are read one at a time and exactly as large as declared, an
archive is read twice (image headers first, then the pixels, straight into one
preallocated tensor), and NPZ images are converted to uint8 in chunks while
they are decompressed. :func:`inspect_dataset_file` checks everything
:func:`load_dataset` does without keeping the decoded images.

Running out of memory or file handles says nothing about the input: such
errors (:func:`is_resource_error`) propagate as they are, never as an
:class:`InputError`.

Every reader returns an :class:`ImageSet` (uint8 NCHW, int64 labels).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import logging
import math
import os
import re
import stat
import struct
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch

from defense_core.errors import ArchiveError, DatasetError, InputError, TooLargeError
from defense_core.imageset import ImageSet
from defense_core.spec import MAX_CLASSES, MAX_INPUT_SIDE

log = logging.getLogger(__name__)

ROLES = ("clean", "test", "poisoned")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPZ_ARRAYS = ("x", "y", "target")
MAX_NPZ_MEMBERS = 64
# Members smaller than this are never called bombs: their size is bounded anyway.
RATIO_CHECK_MIN_BYTES = 1 << 20
# Raw NPZ bytes converted per step: bounds the temporaries of float/int -> uint8.
_CHUNK_BYTES = 16 * 1024**2
# PIL modes stored as one channel (16-bit PNGs are scaled to 8 bits).
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})
_RESOURCE_ERRNOS = frozenset({errno.ENOMEM, errno.EMFILE, errno.ENFILE})


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds applied while reading an uploaded dataset."""

    max_members: int = 200_000
    max_member_bytes: int = 64 * 1024**2
    max_total_bytes: int = 2 * 1024**3  # uncompressed, whole archive or NPZ
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 4096 * 4096  # per image, from its header
    max_samples: int = 1_000_000
    # The uint8 image tensor (N*C*H*W), from the headers before anything is decoded.
    # 256 MiB holds CIFAR-10's 50,000 training images (147 MiB) or SVHN's 73,257 (215 MiB).
    max_decoded_bytes: int = 256 * 1024**2

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"ArchiveLimits.{name} must be positive, got {value}")
        if self.max_compression_ratio < 1:
            raise ValueError("ArchiveLimits.max_compression_ratio must be at least 1")


@dataclass(frozen=True)
class DatasetInfo:
    """What validating a dataset file found (returned to the uploader)."""

    format: str
    num_samples: int
    image_shape: tuple[int, int, int]
    num_classes_seen: int
    label_min: int
    label_max: int
    classes: list[str] | None
    has_target: bool
    target_labels: list[int] | None
    # Poisoned sets: samples whose true label equals their target. They say nothing
    # about the attack and are left out of ASR/RA (which count non-target images only).
    target_class_samples: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d


def is_resource_error(exc: BaseException) -> bool:
    """True when ``exc`` means the process ran short of memory or file handles.

    That is the reader's trouble, not the input's: the same file may read fine
    later, so callers should answer "try again", not "bad input".
    """
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        if exc.errno in _RESOURCE_ERRNOS:
            return True
        # PIL reports a decoder's failed allocation as a plain OSError.
        return exc.errno is None and str(exc).startswith("out of memory")
    if isinstance(exc, zlib.error):
        return "insufficient memory" in str(exc)  # Z_MEM_ERROR
    return False


# --------------------------------------------------------------------------- entry points


def sniff_dataset_format(path: str | os.PathLike[str]) -> str:
    """``"npz"``, ``"zip"``, ``"tar.gz"`` or ``"tar"``, from the bytes."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        except zipfile.BadZipFile as exc:
            raise DatasetError(f"the zip archive cannot be read: {exc}") from exc
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"\x93NUMPY"):
        raise DatasetError("a single .npy array is not a dataset; save x and y with numpy.savez")
    raise DatasetError(
        "unrecognized dataset format: expected NPZ (x, y) or an ImageFolder archive (zip, tar.gz)"
    )


def load_dataset(path: str | os.PathLike[str], *, limits: ArchiveLimits = ArchiveLimits()) -> ImageSet:
    """Read an NPZ or an ImageFolder archive, whichever the bytes say it is."""
    return _read_any(Path(path), limits, keep_images=True).imageset()


def inspect_dataset_file(
    path: str | os.PathLike[str], *, role: str, limits: ArchiveLimits = ArchiveLimits()
) -> DatasetInfo:
    """Validate a dataset for ``role`` (``clean`` | ``test`` | ``poisoned``).

    Every check :func:`load_dataset` makes is made (each image is decoded),
    but the decoded images are not kept: memory stays at one image or chunk.
    """
    if role not in ROLES:
        raise InputError(f"unknown dataset role {role!r}; known: {', '.join(ROLES)}")
    read = _read_any(Path(path), limits, keep_images=False)
    y, target = read.y, read.target
    if role == "poisoned":
        if target is None:
            raise DatasetError(
                "a poisoned dataset needs `target` (the attack's target label, one or per sample) "
                "next to `x` (triggered images) and `y` (their true labels); use an NPZ"
            )
        same = int((y == target).sum())
        if same == len(y):
            raise DatasetError(
                "every poisoned sample has y equal to its target; a poisoned test set holds "
                "triggered images whose true class is not the target"
            )
    return DatasetInfo(
        format=read.format,
        num_samples=len(y),
        image_shape=read.image_shape,
        num_classes_seen=int(y.unique().numel()),
        label_min=int(y.min()),
        label_max=int(y.max()),
        classes=read.classes,
        has_target=target is not None,
        target_labels=None if target is None else [int(t) for t in target.unique()],
        target_class_samples=0 if target is None else int((y == target).sum()),
    )


@dataclass(frozen=True)
class _Read:
    """What a reader found; ``x`` is None when the images were validated, not kept."""

    format: str
    image_shape: tuple[int, int, int]
    y: torch.Tensor
    target: torch.Tensor | None
    classes: list[str] | None
    x: torch.Tensor | None

    def imageset(self) -> ImageSet:
        assert self.x is not None, "read with keep_images=False"
        return ImageSet(x=self.x, y=self.y, target=self.target)


def _read_any(path: Path, limits: ArchiveLimits, *, keep_images: bool) -> _Read:
    fmt = sniff_dataset_format(path)
    if fmt == "npz":
        return _read_npz(path, limits, keep_images=keep_images)
    return _read_archive(path, fmt, limits, keep_images=keep_images)


# --------------------------------------------------------------------------- NPZ


def load_npz(
    path: str | os.PathLike[str],
    *,
    max_samples: int = ArchiveLimits.max_samples,
    max_bytes: int = ArchiveLimits.max_total_bytes,
    max_compression_ratio: float = ArchiveLimits.max_compression_ratio,
    max_decoded_bytes: int = ArchiveLimits.max_decoded_bytes,
) -> ImageSet:
    """Read ``x`` (images), ``y`` (labels) and optional ``target`` from an NPZ.

    ``x``: uint8 ``[N, H, W, C]`` or ``[N, C, H, W]`` (C in {1, 3}; NHWC when
    both readings fit), ``[N, H, W]`` grayscale, or float in [0, 1]
    (scaled by 255 and rounded).
    """
    limits = ArchiveLimits(
        max_samples=max_samples,
        max_total_bytes=max_bytes,
        max_compression_ratio=max_compression_ratio,
        max_decoded_bytes=max_decoded_bytes,
    )
    return _read_npz(Path(path), limits, keep_images=True).imageset()


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    data_offset: int  # where the array data starts in the member


def _read_npz(path: Path, limits: ArchiveLimits, *, keep_images: bool) -> _Read:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"not an NPZ file: {exc}") from exc
    with zf:
        members = _check_zip_members(
            zf,
            archive_size=path.stat().st_size,
            max_members=MAX_NPZ_MEMBERS,
            max_member_bytes=limits.max_total_bytes,
            max_total_bytes=limits.max_total_bytes,
            max_ratio=limits.max_compression_ratio,
        )
        by_name = {info.filename: info for info in members}
        for key in ("x", "y"):
            if f"{key}.npy" not in by_name:
                raise DatasetError(f"the NPZ has no `{key}` array (found: {_npz_keys(by_name)})")
        headers = {
            key: _read_npy_header(zf, by_name[f"{key}.npy"], key)
            for key in NPZ_ARRAYS
            if f"{key}.npy" in by_name
        }
        # Everything the headers can tell is checked before any array is read.
        layout = _image_layout(headers["x"].shape, headers["x"].dtype, limits)
        _check_label_layout("y", headers["y"].dtype, headers["y"].shape, layout.n)
        if "target" in headers and headers["target"].shape != ():
            _check_label_layout("target", headers["target"].dtype, headers["target"].shape, layout.n)
        x = _read_npy_images(zf, by_name["x.npy"], headers["x"], layout, limits, keep=keep_images)
        y = _labels(_read_npy_array(zf, by_name["y.npy"], "y"), layout.n, "y")
        target = None
        if "target" in headers:
            raw_target = _read_npy_array(zf, by_name["target.npy"], "target")
            if raw_target.ndim == 0:
                raw_target = np.full(layout.n, raw_target, dtype=raw_target.dtype)
            target = _labels(raw_target, layout.n, "target")
    return _Read(
        format="npz",
        image_shape=layout.shape[1:],
        y=y,
        target=target,
        classes=None,
        x=None if x is None else torch.from_numpy(x),
    )


def _npz_keys(by_name: dict[str, zipfile.ZipInfo]) -> str:
    keys = [n[: -len(".npy")] for n in by_name if n.endswith(".npy")]
    return ", ".join(sorted(keys)) or "nothing"


def _read_npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> _NpyHeader:
    """numpy allocates what the header declares before reading: check it first."""
    try:
        with zf.open(info) as fh:
            try:
                major, _ = np.lib.format.read_magic(fh)
                if major == 1:
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fh)
            except ValueError as exc:
                raise DatasetError(f"`{key}` is not a valid .npy array: {exc}") from exc
            header_len = fh.tell()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError) as exc:
        _reraise_resource_error(exc)
        raise DatasetError(f"cannot read `{key}` from the NPZ: {exc}") from exc
    if dtype.hasobject or dtype.fields is not None:
        raise DatasetError(f"`{key}` has dtype {dtype}; only plain numeric arrays are accepted")
    declared = math.prod(shape) * dtype.itemsize
    if declared != info.file_size - header_len:
        raise DatasetError(
            f"`{key}` declares shape {shape} of {dtype} ({declared} bytes) but holds "
            f"{info.file_size - header_len} bytes"
        )
    return _NpyHeader(shape=tuple(shape), fortran_order=bool(fortran_order), dtype=dtype,
                      data_offset=header_len)


def _read_npy_array(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> np.ndarray:
    """A (small, header-checked) array, read whole."""
    try:
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError, ValueError) as exc:
        _reraise_resource_error(exc)
        raise DatasetError(f"cannot read `{key}` from the NPZ: {exc}") from exc


def _read_npy_images(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    header: _NpyHeader,
    layout: _Layout,
    limits: ArchiveLimits,
    *,
    keep: bool,
) -> np.ndarray | None:
    """``x`` as uint8 NCHW (None unless ``keep``), converted chunk by chunk as it is read."""
    try:
        if header.fortran_order:
            # Column-major data cannot be cut into samples while streaming: read it whole,
            # which is only allowed while it is no larger than the decoded images may be.
            raw_bytes = math.prod(header.shape) * header.dtype.itemsize
            if raw_bytes > limits.max_decoded_bytes:
                raise TooLargeError(
                    f"x is stored in Fortran order, which is read whole, and takes {raw_bytes} "
                    f"bytes; the limit is {limits.max_decoded_bytes} "
                    "(save it C-ordered with numpy.ascontiguousarray)"
                )
            return _convert_images(_read_npy_array(zf, info, "x"), layout, keep=keep)
        sample_shape = header.shape[1:]
        sample_bytes = math.prod(sample_shape) * header.dtype.itemsize
        with zf.open(info) as fh:
            fh.read(header.data_offset)

            def read_samples(start: int, stop: int) -> np.ndarray:
                want = (stop - start) * sample_bytes
                data = fh.read(want)
                if len(data) != want:
                    raise DatasetError(f"`x` ends after {start * sample_bytes + len(data)} bytes of data")
                return np.frombuffer(data, dtype=header.dtype).reshape((stop - start, *sample_shape))

            out = _convert_chunks(read_samples, layout, sample_bytes=sample_bytes, keep=keep)
            fh.read(1)  # at the end: lets zipfile compare the CRC
            return out
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, NotImplementedError) as exc:
        _reraise_resource_error(exc)
        raise DatasetError(f"cannot read `x` from the NPZ: {exc}") from exc


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
    layout = _image_layout(x.shape, x.dtype, limits)
    images = _convert_images(x, layout, keep=True)
    assert images is not None
    labels = _labels(np.asarray(y), layout.n, "y")
    targets = None
    if target is not None:
        target = np.asarray(target)
        if target.ndim == 0:
            target = np.full(layout.n, target, dtype=target.dtype)
        targets = _labels(target, layout.n, "target")
    return ImageSet(x=torch.from_numpy(images), y=labels, target=targets)


@dataclass(frozen=True)
class _Layout:
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


def _image_layout(shape: tuple[int, ...], dtype: np.dtype, limits: ArchiveLimits) -> _Layout:
    """Check ``x``'s shape, dtype and decoded size, from its header: nothing is read yet."""
    if len(shape) == 3:
        n, h, w = shape
        layout = _Layout(n=n, c=1, h=h, w=w, channels_last=False)
    elif len(shape) == 4:
        if shape[3] in (1, 3):
            layout = _Layout(n=shape[0], c=shape[3], h=shape[1], w=shape[2], channels_last=True)
        elif shape[1] in (1, 3):
            layout = _Layout(n=shape[0], c=shape[1], h=shape[2], w=shape[3], channels_last=False)
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
        raise DatasetError(f"images are {layout.h}x{layout.w}; sides must be in [1, {MAX_INPUT_SIDE}]")
    if dtype != np.uint8 and dtype.kind not in "fiu":
        raise DatasetError(f"x has dtype {dtype}; expected uint8, or float in [0, 1]")
    _check_decoded_bytes(layout.n, layout.c, layout.h, layout.w, limits)
    return layout


def _check_decoded_bytes(n: int, c: int, h: int, w: int, limits: ArchiveLimits) -> None:
    decoded = n * c * h * w
    if decoded > limits.max_decoded_bytes:
        raise TooLargeError(
            f"{n} images of {c}x{h}x{w} take {decoded} bytes as uint8; the limit for decoded "
            f"images is {limits.max_decoded_bytes} bytes (refused before decoding)"
        )


def _convert_images(x: np.ndarray, layout: _Layout, *, keep: bool) -> np.ndarray | None:
    """In-memory ``x`` as uint8 NCHW: uint8 NCHW as is, everything else chunk by chunk."""
    if keep and x.dtype == np.uint8:
        nchw = layout.to_nchw(x)
        if nchw.flags.c_contiguous:
            return nchw
    sample_bytes = math.prod(x.shape[1:]) * x.dtype.itemsize
    return _convert_chunks(lambda start, stop: x[start:stop], layout,
                           sample_bytes=sample_bytes, keep=keep)


def _convert_chunks(
    read_samples: Callable[[int, int], np.ndarray], layout: _Layout, *, sample_bytes: int, keep: bool
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


def _check_label_layout(name: str, dtype: np.dtype, shape: tuple[int, ...], n: int) -> None:
    if dtype.kind not in "iu":
        raise DatasetError(
            f"`{name}` must hold integer labels, got dtype {dtype} (use .astype(np.int64))"
        )
    if len(shape) != 1:
        raise DatasetError(f"`{name}` must be 1-D [N]; got shape {tuple(shape)}")
    if shape[0] != n:
        raise DatasetError(f"`{name}` has {shape[0]} entries but x has {n} images")


def _labels(values: np.ndarray, n: int, name: str) -> torch.Tensor:
    _check_label_layout(name, values.dtype, values.shape, n)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0:
        raise DatasetError(f"`{name}` has a negative label ({lo}); labels are class indices from 0")
    if hi >= MAX_CLASSES:
        raise DatasetError(f"`{name}` has label {hi}; labels must be below {MAX_CLASSES}")
    return torch.from_numpy(values.astype(np.int64))


def save_npz(path: str | os.PathLike[str], imageset: ImageSet, *, compress: bool = False) -> None:
    """Write ``x`` (uint8 NCHW), ``y`` and, if present, ``target`` to exactly ``path``."""
    arrays = {"x": imageset.x.cpu().numpy(), "y": imageset.y.cpu().numpy()}
    if imageset.target is not None:
        arrays["target"] = imageset.target.cpu().numpy()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:  # a file object: numpy would append ".npz" to a name
            (np.savez_compressed if compress else np.savez)(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _reraise_resource_error(exc: BaseException) -> None:
    """In an ``except`` that turns ``exc`` into an input error: resource errors stay themselves."""
    if is_resource_error(exc):
        raise exc


# --------------------------------------------------------------------------- archive members


_DRIVE = re.compile(r"^[A-Za-z]:")


def _safe_parts(name: str) -> tuple[str, ...]:
    """Split a member name into path parts, refusing anything that could escape."""
    if "\x00" in name:
        raise ArchiveError(f"archive member name contains a NUL byte: {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        raise ArchiveError(f"archive member has an absolute path: {name!r}")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"archive member path leaves the archive ('..'): {name!r}")
    return parts


def _check_zip_members(
    zf: zipfile.ZipFile,
    *,
    archive_size: int,
    max_members: int,
    max_member_bytes: int,
    max_total_bytes: int,
    max_ratio: float,
) -> list[zipfile.ZipInfo]:
    """Check every member's metadata; return the regular files (directories dropped)."""
    infos = zf.infolist()
    if len(infos) > max_members:
        raise ArchiveError(f"the archive has {len(infos)} members; the limit is {max_members}")
    files: list[zipfile.ZipInfo] = []
    total = 0
    for info in infos:
        _safe_parts(info.filename)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise ArchiveError(f"archive member is a symbolic link: {info.filename!r}")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"archive member is not a regular file: {info.filename!r}")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"archive member is encrypted: {info.filename!r}")
        if info.is_dir():
            continue
        if info.file_size > max_member_bytes:
            raise TooLargeError(
                f"archive member {info.filename!r} expands to {info.file_size} bytes; "
                f"the limit is {max_member_bytes}"
            )
        if info.file_size > RATIO_CHECK_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise ArchiveError(
                f"archive member {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                f"(limit {max_ratio:g}x): refused as a possible decompression bomb"
            )
        total += info.file_size
        files.append(info)
    if total > max_total_bytes:
        raise TooLargeError(f"the archive expands to {total} bytes; the limit is {max_total_bytes}")
    if total > RATIO_CHECK_MIN_BYTES and total > max_ratio * max(archive_size, 1):
        raise ArchiveError(
            f"the archive expands {total / max(archive_size, 1):.0f}x (limit {max_ratio:g}x): "
            "refused as a possible decompression bomb"
        )
    return files


def _read_member(fh: IO[bytes], name: str, expected: int) -> bytes:
    """Exactly the ``expected`` (declared, already bounded) bytes of a member.

    Never ``read(limit)`` with a large limit: a buffered reader allocates the
    whole limit up front and shrinks the result, and glibc keeps every such
    block as a mapping of its own, so holding many of them exhausts
    ``vm.max_map_count``.
    """
    data = fh.read(expected)
    if len(data) != expected:
        raise ArchiveError(f"archive member {name!r} holds {len(data)} bytes, not the declared {expected}")
    if fh.read(1):
        raise ArchiveError(f"archive member {name!r} holds more than the declared {expected} bytes")
    return data


_Entry = tuple[tuple[str, ...], "bytes | None", int]


def _iter_zip(path: Path, limits: ArchiveLimits) -> Iterator[_Entry]:
    """Yield ``(parts, data, index)`` per member; ``data`` is None for directories.

    ``index`` is the member's place in :meth:`zipfile.ZipFile.infolist`.
    """
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"the zip archive cannot be read: {exc}") from exc
    with zf:
        # Refuses links, devices, bombs: every member but the directories is a regular file.
        _check_zip_members(
            zf,
            archive_size=path.stat().st_size,
            max_members=limits.max_members,
            max_member_bytes=limits.max_member_bytes,
            max_total_bytes=limits.max_total_bytes,
            max_ratio=limits.max_compression_ratio,
        )
        for index, info in enumerate(zf.infolist()):
            if info.is_dir():
                yield _safe_parts(info.filename), None, index
            else:
                parts = _safe_parts(info.filename)
                if _skipped(parts) or not _is_image_name(info.filename):
                    yield parts, b"", index  # named, not read: sorted out by the caller
                else:
                    yield parts, _read_zip_member(zf, info), index


def _read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with zf.open(info) as fh:
            return _read_member(fh, info.filename, info.file_size)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as exc:
        _reraise_resource_error(exc)
        raise ArchiveError(f"cannot read archive member {info.filename!r}: {exc}") from exc


class _BoundedReader(io.RawIOBase):
    """A read-only stream that fails once more than ``limit`` bytes came through."""

    def __init__(self, inner: IO[bytes], limit: int, what: str) -> None:
        self._inner, self._limit, self._what, self._seen = inner, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        self._seen += len(data)
        if self._seen > self._limit:
            raise ArchiveError(self._what)
        buffer[: len(data)] = data
        return len(data)


def _iter_tar(path: Path, limits: ArchiveLimits, *, gz: bool) -> Iterator[_Entry]:
    """Yield ``(parts, data, offset)`` per member (``offset``: of its data in the tar stream)."""
    compressed_size = path.stat().st_size
    # Headers and padding cost up to ~1 KiB per member on top of the data.
    cap = limits.max_total_bytes + 1024 * (limits.max_members + 16)
    what = f"the archive expands beyond {cap} bytes"
    if gz:
        ratio_cap = int(limits.max_compression_ratio * compressed_size) + RATIO_CHECK_MIN_BYTES
        if ratio_cap < cap:
            cap = ratio_cap
            what = (
                f"the archive expands more than {limits.max_compression_ratio:g}x its compressed "
                "size: refused as a possible decompression bomb"
            )
    with path.open("rb") as raw:
        inner: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
        stream = io.BufferedReader(_BoundedReader(inner, cap, what), buffer_size=1 << 16)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                total = 0
                count = 0
                while (member := tf.next()) is not None:
                    # A stream-mode TarFile keeps every header it read; nothing here needs them.
                    tf.members.clear()
                    count += 1
                    if count > limits.max_members:
                        raise ArchiveError(f"the archive has more than {limits.max_members} members")
                    parts = _safe_parts(member.name)
                    if member.issym() or member.islnk():
                        raise ArchiveError(f"archive member is a link: {member.name!r}")
                    if member.isdir():
                        yield parts, None, member.offset_data
                        continue
                    if not member.isreg() or member.issparse():
                        raise ArchiveError(f"archive member is not a regular file: {member.name!r}")
                    if member.size > limits.max_member_bytes:
                        raise TooLargeError(
                            f"archive member {member.name!r} is {member.size} bytes; "
                            f"the limit is {limits.max_member_bytes}"
                        )
                    total += member.size
                    if total > limits.max_total_bytes:
                        raise TooLargeError(
                            f"the archive expands beyond {limits.max_total_bytes} bytes"
                        )
                    if _skipped(parts) or not _is_image_name(member.name):
                        yield parts, b"", member.offset_data
                        continue
                    fh = tf.extractfile(member)
                    assert fh is not None  # a regular file
                    yield parts, _read_member(fh, member.name, member.size), member.offset_data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            _reraise_resource_error(exc)
            raise ArchiveError(f"the tar archive cannot be read: {exc}") from exc


def _skipped(parts: tuple[str, ...]) -> bool:
    """Hidden files and macOS resource forks (``.DS_Store``, ``__MACOSX/``) are ignored."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


@contextlib.contextmanager
def _archive_entries(path: Path, fmt: str, limits: ArchiveLimits) -> Iterator[Iterator[_Entry]]:
    """Directories as ``(parts, None, where)``, images as ``(parts, bytes, where)``, one at a time.

    Hidden files are skipped and any other file is refused. The archive is
    closed when the block ends, also when the caller stops early.
    """
    members = _iter_zip(path, limits) if fmt == "zip" else _iter_tar(path, limits, gz=fmt == "tar.gz")

    def entries() -> Iterator[_Entry]:
        for parts, data, where in members:
            if not parts or _skipped(parts):
                continue
            if data is not None and not _is_image_name(parts[-1]):
                raise ArchiveError(f"{'/'.join(parts)}: only PNG and JPEG images are accepted")
            yield parts, data, where

    with contextlib.closing(members):
        yield entries()


# --------------------------------------------------------------------------- ImageFolder


def load_image_archive(
    path: str | os.PathLike[str], *, limits: ArchiveLimits = ArchiveLimits()
) -> tuple[ImageSet, list[str]]:
    """Read a zip / tar / tar.gz with one folder per class; return the images and class names.

    Class indices follow the sorted folder names. One enclosing top-level
    folder is allowed. All images must have the same size; they are stored as
    grayscale if every image is, as RGB otherwise.
    """
    path = Path(path)
    fmt = sniff_dataset_format(path)
    if fmt == "npz":
        raise DatasetError("this is an NPZ file, not an image archive")
    read = _read_archive(path, fmt, limits, keep_images=True)
    assert read.classes is not None
    return read.imageset(), read.classes


@dataclass(frozen=True, slots=True)
class _ImageHeader:
    """An image member as the first pass saw it: where it is and what its header says."""

    parts: tuple[str, ...]  # its path in the archive
    where: int  # zip: its index in infolist(); tar: the offset of its data in the tar stream
    size: int  # bytes in the archive
    width: int
    height: int
    gray: bool

    @property
    def name(self) -> str:
        return "/".join(self.parts)


def _read_archive(path: Path, fmt: str, limits: ArchiveLimits, *, keep_images: bool) -> _Read:
    images, dirs = _scan_headers(path, fmt, limits)
    if not images:
        raise DatasetError("the archive holds no PNG or JPEG images")
    strip = _wrapper_depth(images, dirs)
    relative = [image.parts[strip:] for image in images]
    for parts in relative:
        if len(parts) < 2:
            raise DatasetError(f"{parts[0]} is not inside a class folder (expected CLASS/IMAGE)")
    with_images = {parts[0] for parts in relative}
    classes = sorted(with_images | {d[strip] for d in dirs if len(d) > strip})
    empty = [c for c in classes if c not in with_images]
    if empty:
        raise DatasetError(f"class folder {empty[0]!r} has no images ({len(empty)} empty in all)")
    order = sorted(range(len(images)), key=relative.__getitem__)
    first = images[order[0]]
    for i in order:
        image = images[i]
        if (image.height, image.width) != (first.height, first.width):
            raise DatasetError(
                f"{image.name} is {image.height}x{image.width} but {first.name} is "
                f"{first.height}x{first.width}; all images must have the same size"
            )
    channels = 1 if all(image.gray for image in images) else 3
    _check_decoded_bytes(len(images), channels, first.height, first.width, limits)
    slots = [0] * len(images)  # archive order -> sorted order
    for slot, i in enumerate(order):
        slots[i] = slot
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index[relative[i][0]] for i in order], dtype=torch.int64)
    shape = (len(images), channels, first.height, first.width)
    x = _decode_images(path, fmt, images, slots, shape, keep=keep_images)
    return _Read(
        format=fmt,
        image_shape=shape[1:],
        y=labels,
        target=None,
        classes=classes,
        x=None if x is None else torch.from_numpy(x),
    )


def _scan_headers(
    path: Path, fmt: str, limits: ArchiveLimits
) -> tuple[list[_ImageHeader], list[tuple[str, ...]]]:
    """First pass: every image's size and kind from its header, and the directories.

    Nothing is decoded and no member's bytes are kept; what the images will
    take once decoded is totalled on the way, and the archive refused as soon
    as that passes the limit.
    """
    images: list[_ImageHeader] = []
    dirs: list[tuple[str, ...]] = []
    decoded = 0
    with _archive_entries(path, fmt, limits) as entries:
        for parts, data, where in entries:
            if data is None:
                dirs.append(parts)
                continue
            header = _image_header(parts, data, where, limits)
            images.append(header)
            if len(images) > limits.max_samples:
                raise TooLargeError(f"the archive holds more than {limits.max_samples} images")
            decoded += header.width * header.height * (1 if header.gray else 3)
            if decoded > limits.max_decoded_bytes:
                raise TooLargeError(
                    f"the first {len(images)} images (the last: {header.name}, "
                    f"{header.width}x{header.height}) already take more than "
                    f"{limits.max_decoded_bytes} bytes decoded, the limit for decoded images "
                    "(refused before decoding)"
                )
    return images, dirs


def _wrapper_depth(images: list[_ImageHeader], dirs: list[tuple[str, ...]]) -> int:
    """1 when one folder encloses everything (``cifar/cat/1.png``), else 0."""
    tops = {image.parts[0] for image in images} | {d[0] for d in dirs}
    return 1 if len(tops) == 1 and all(len(image.parts) >= 3 for image in images) else 0


def _decode_images(
    path: Path,
    fmt: str,
    images: list[_ImageHeader],
    slots: list[int],
    shape: tuple[int, int, int, int],
    *,
    keep: bool,
) -> np.ndarray | None:
    """Second pass: decode each image (in archive order) into its slot of one uint8 NCHW array."""
    out = np.empty(shape, dtype=np.uint8) if keep else None
    if fmt == "zip":
        payloads = _zip_payloads(path, images)
    else:
        payloads = _tar_payloads(path, images, gz=fmt == "tar.gz")
    with contextlib.closing(payloads):
        for i, data in enumerate(payloads):
            pixels = _decode_image(images[i], data)
            if out is not None:
                out[slots[i]] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def _changed(image: _ImageHeader) -> ArchiveError:
    return ArchiveError(f"{image.name}: the archive changed while it was read")


def _zip_payloads(path: Path, images: list[_ImageHeader]) -> Iterator[bytes]:
    """Each image's bytes again, from where the first pass found them."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"the zip archive cannot be read: {exc}") from exc
    with zf:
        infos = zf.infolist()
        for image in images:
            info = infos[image.where] if image.where < len(infos) else None
            same = info is not None and info.file_size == image.size
            if not same or _safe_parts(info.filename) != image.parts:  # type: ignore[union-attr]
                raise _changed(image)
            yield _read_zip_member(zf, info)


def _tar_payloads(path: Path, images: list[_ImageHeader], *, gz: bool) -> Iterator[bytes]:
    """Each image's bytes again, read at the offsets the first pass found (no header parsing)."""
    with path.open("rb") as raw:
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
        position = 0
        try:
            for image in images:
                if image.where < position:
                    raise _changed(image)
                if gz:
                    _skip(stream, image.where - position, image)
                else:
                    stream.seek(image.where)
                data = stream.read(image.size)
                if len(data) != image.size:
                    raise _changed(image)
                position = image.where + image.size
                yield data
        except (EOFError, OSError, zlib.error) as exc:
            _reraise_resource_error(exc)
            raise ArchiveError(f"the tar archive cannot be read: {exc}") from exc


def _skip(stream: IO[bytes], count: int, image: _ImageHeader) -> None:
    while count > 0:
        got = len(stream.read(min(count, 1 << 16)))
        if got == 0:
            raise _changed(image)
        count -= got


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _image_header(
    parts: tuple[str, ...], data: bytes, where: int, limits: ArchiveLimits
) -> _ImageHeader:
    """Size and kind of a PNG/JPEG from its header alone: nothing is decoded."""
    name = "/".join(parts)
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 26 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        gray = data[25] in (0, 4)  # PNG color types 0 (gray) and 4 (gray + alpha)
    else:
        with _open_image(name, data) as img:
            width, height = img.size
            gray = img.mode in _GRAY_MODES
    if width * height > limits.max_image_pixels:
        raise ArchiveError(f"{name}: {width}x{height} pixels exceeds the limit of {limits.max_image_pixels}")
    if width > MAX_INPUT_SIDE or height > MAX_INPUT_SIDE:
        raise DatasetError(f"{name}: {width}x{height} is larger than {MAX_INPUT_SIDE} per side")
    if width < 1 or height < 1:
        raise DatasetError(f"{name}: {width}x{height} holds no pixels")
    return _ImageHeader(parts=parts, where=where, size=len(data),
                        width=width, height=height, gray=gray)


def _open_image(name: str, data: bytes) -> Any:
    from PIL import Image, UnidentifiedImageError  # only the archive reader decodes images

    try:
        return Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except Image.DecompressionBombError as exc:
        raise ArchiveError(f"{name}: image too large ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        _reraise_resource_error(exc)
        raise DatasetError(f"{name}: not a readable PNG or JPEG image") from exc


def _decode_image(header: _ImageHeader, data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 ``[H, W]`` (a grayscale header) or ``[H, W, 3]``."""
    name = header.name
    with _open_image(name, data) as img:
        if img.size != (header.width, header.height):
            raise _changed(header)
        try:
            img.load()
            if not header.gray:
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
            if img.mode in _WIDE_MODES:  # 16-bit grayscale PNG: v/257 rounded, in integers
                wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
                wide += 128
                wide //= 257
                return wide.astype(np.uint8)
            return np.asarray(img.convert("L"), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as exc:
            _reraise_resource_error(exc)
            raise DatasetError(f"{name}: the image data is corrupt ({exc})") from exc
