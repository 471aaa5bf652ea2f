"""NPZ datasets: ``x``, ``y`` and ``target`` arrays, header-checked before they are read.

Arrays are read with ``allow_pickle=False``; ``x`` is converted to uint8 in
chunks while it is decompressed.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from defense_core.atomic import atomic_write
from defense_core.data.archive import ZIP_READ_ERRORS, check_zip_members
from defense_core.data.arrays import (
    Layout,
    check_label_layout,
    convert_chunks,
    convert_images,
    image_layout,
    target_labels,
    to_labels,
)
from defense_core.data.limits import ArchiveLimits, reraise_resource_error
from defense_core.data.results import Read
from defense_core.errors import DatasetError, TooLargeError
from defense_core.imageset import ImageSet

NPZ_ARRAYS = ("x", "y", "target")
MAX_NPZ_MEMBERS = 64


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
    return read_npz(Path(path), limits, keep_images=True).imageset()


@dataclass(frozen=True)
class _NpyHeader:
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    data_offset: int  # where the array data starts in the member


def read_npz(path: Path, limits: ArchiveLimits, *, keep_images: bool) -> Read:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"not an NPZ file: {exc}") from exc
    with zf:
        members = check_zip_members(
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
        layout = image_layout(headers["x"].shape, headers["x"].dtype, limits)
        check_label_layout("y", headers["y"].dtype, headers["y"].shape, layout.n)
        if "target" in headers and headers["target"].shape != ():
            check_label_layout("target", headers["target"].dtype, headers["target"].shape, layout.n)
        x = _read_npy_images(zf, by_name["x.npy"], headers["x"], layout, limits, keep=keep_images)
        y = to_labels(_read_npy_array(zf, by_name["y.npy"], "y"), layout.n, "y")
        target = None
        if "target" in headers:
            raw_target = _read_npy_array(zf, by_name["target.npy"], "target")
            target = target_labels(raw_target, layout.n)
    return Read(
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
    except ZIP_READ_ERRORS as exc:
        reraise_resource_error(exc)
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
    except (*ZIP_READ_ERRORS, ValueError) as exc:
        reraise_resource_error(exc)
        raise DatasetError(f"cannot read `{key}` from the NPZ: {exc}") from exc


def _read_npy_images(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    header: _NpyHeader,
    layout: Layout,
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
            return convert_images(_read_npy_array(zf, info, "x"), layout, keep=keep)
        sample_shape = header.shape[1:]
        sample_bytes = math.prod(sample_shape) * header.dtype.itemsize
        with zf.open(info) as fh:
            fh.read(header.data_offset)

            def read_samples(start: int, stop: int) -> np.ndarray:
                want = (stop - start) * sample_bytes
                data = fh.read(want)
                if len(data) != want:
                    got = start * sample_bytes + len(data)
                    raise DatasetError(f"`x` ends after {got} bytes of data")
                samples = np.frombuffer(data, dtype=header.dtype)
                return samples.reshape((stop - start, *sample_shape))

            out = convert_chunks(read_samples, layout, sample_bytes=sample_bytes, keep=keep)
            fh.read(1)  # at the end: lets zipfile compare the CRC
            return out
    except ZIP_READ_ERRORS as exc:
        reraise_resource_error(exc)
        raise DatasetError(f"cannot read `x` from the NPZ: {exc}") from exc


def save_npz(path: str | os.PathLike[str], imageset: ImageSet, *, compress: bool = False) -> None:
    """Write ``x`` (uint8 NCHW), ``y`` and, if present, ``target`` to exactly ``path``."""
    arrays = {"x": imageset.x.cpu().numpy(), "y": imageset.y.cpu().numpy()}
    if imageset.target is not None:
        arrays["target"] = imageset.target.cpu().numpy()
    # A file object, not a name: numpy would append ".npz" to a name.
    with atomic_write(path) as tmp, tmp.open("wb") as fh:
        (np.savez_compressed if compress else np.savez)(fh, **arrays)
