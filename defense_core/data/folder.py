"""ImageFolder archives (zip, tar, tar.gz): one folder per class, read in two passes.

The first pass reads every image's header (size, kind) and refuses the
archive as soon as the decoded images would pass their bound; the second
decodes the pixels straight into one preallocated uint8 NCHW array.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch

from defense_core.data.archive import (
    archive_entries,
    open_zip,
    read_zip_member,
    safe_parts,
    sniff_dataset_format,
)
from defense_core.data.images import ImageHeader, archive_changed, decode_image, read_image_header
from defense_core.data.limits import (
    DEFAULT_LIMITS,
    ArchiveLimits,
    check_decoded_bytes,
    reraise_resource_error,
)
from defense_core.data.results import Read
from defense_core.errors import ArchiveError, DatasetError, TooLargeError
from defense_core.imageset import ImageSet


def load_image_archive(
    path: str | os.PathLike[str], *, limits: ArchiveLimits = DEFAULT_LIMITS
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
    read = read_archive(path, fmt, limits, keep_images=True)
    assert read.classes is not None
    return read.imageset(), read.classes


def read_archive(path: Path, fmt: str, limits: ArchiveLimits, *, keep_images: bool) -> Read:
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
    check_decoded_bytes(len(images), channels, first.height, first.width, limits)
    slots = [0] * len(images)  # archive order -> sorted order
    for slot, i in enumerate(order):
        slots[i] = slot
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index[relative[i][0]] for i in order], dtype=torch.int64)
    shape = (len(images), channels, first.height, first.width)
    x = _decode_images(path, fmt, images, slots, shape, keep=keep_images)
    return Read(
        format=fmt,
        image_shape=shape[1:],
        y=labels,
        target=None,
        classes=classes,
        x=None if x is None else torch.from_numpy(x),
    )


def _scan_headers(
    path: Path, fmt: str, limits: ArchiveLimits
) -> tuple[list[ImageHeader], list[tuple[str, ...]]]:
    """First pass: every image's size and kind from its header, and the directories.

    Nothing is decoded and no member's bytes are kept; what the images will
    take once decoded is totalled on the way, and the archive refused as soon
    as that passes the limit.
    """
    images: list[ImageHeader] = []
    dirs: list[tuple[str, ...]] = []
    decoded = 0
    with archive_entries(path, fmt, limits) as entries:
        for parts, data, where in entries:
            if data is None:
                dirs.append(parts)
                continue
            header = read_image_header(parts, data, where, limits)
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


def _wrapper_depth(images: list[ImageHeader], dirs: list[tuple[str, ...]]) -> int:
    """1 when one folder encloses everything (``cifar/cat/1.png``), else 0."""
    tops = {image.parts[0] for image in images} | {d[0] for d in dirs}
    return 1 if len(tops) == 1 and all(len(image.parts) >= 3 for image in images) else 0


def _decode_images(
    path: Path,
    fmt: str,
    images: list[ImageHeader],
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
            pixels = decode_image(images[i], data)
            if out is not None:
                out[slots[i]] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def _zip_payloads(path: Path, images: list[ImageHeader]) -> Iterator[bytes]:
    """Each image's bytes again, from where the first pass found them."""
    with open_zip(path) as zf:
        infos = zf.infolist()
        for image in images:
            info = infos[image.where] if image.where < len(infos) else None
            same = info is not None and info.file_size == image.size
            if not same or safe_parts(info.filename) != image.parts:  # type: ignore[union-attr]
                raise archive_changed(image)
            yield read_zip_member(zf, info)


def _tar_payloads(path: Path, images: list[ImageHeader], *, gz: bool) -> Iterator[bytes]:
    """Each image's bytes again, read at the offsets the first pass found (no header parsing)."""
    with path.open("rb") as raw:
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
        position = 0
        try:
            for image in images:
                if image.where < position:
                    raise archive_changed(image)
                if gz:
                    _skip(stream, image.where - position, image)
                else:
                    stream.seek(image.where)
                data = stream.read(image.size)
                if len(data) != image.size:
                    raise archive_changed(image)
                position = image.where + image.size
                yield data
        except (EOFError, OSError, zlib.error) as exc:
            reraise_resource_error(exc)
            raise ArchiveError(f"the tar archive cannot be read: {exc}") from exc


def _skip(stream: IO[bytes], count: int, image: ImageHeader) -> None:
    while count > 0:
        got = len(stream.read(min(count, 1 << 16)))
        if got == 0:
            raise archive_changed(image)
        count -= got
