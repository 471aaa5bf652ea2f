"""PNG and JPEG members: their size and kind from the header, then their pixels."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from defense_core.data.limits import ArchiveLimits, reraise_resource_error
from defense_core.errors import ArchiveError, DatasetError
from defense_core.spec import MAX_INPUT_SIDE

# PIL modes stored as one channel (16-bit PNGs are scaled to 8 bits).
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L"})


@dataclass(frozen=True, slots=True)
class ImageHeader:
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


def archive_changed(image: ImageHeader) -> ArchiveError:
    return ArchiveError(f"{image.name}: the archive changed while it was read")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_image_header(
    parts: tuple[str, ...], data: bytes, where: int, limits: ArchiveLimits
) -> ImageHeader:
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
        raise ArchiveError(
            f"{name}: {width}x{height} pixels exceeds the limit of {limits.max_image_pixels}"
        )
    if width > MAX_INPUT_SIDE or height > MAX_INPUT_SIDE:
        raise DatasetError(f"{name}: {width}x{height} is larger than {MAX_INPUT_SIDE} per side")
    if width < 1 or height < 1:
        raise DatasetError(f"{name}: {width}x{height} holds no pixels")
    return ImageHeader(parts=parts, where=where, size=len(data),
                        width=width, height=height, gray=gray)


def _open_image(name: str, data: bytes) -> Any:
    from PIL import Image, UnidentifiedImageError  # only the archive reader decodes images

    try:
        return Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except Image.DecompressionBombError as exc:
        raise ArchiveError(f"{name}: image too large ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reraise_resource_error(exc)
        raise DatasetError(f"{name}: not a readable PNG or JPEG image") from exc


def decode_image(header: ImageHeader, data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 ``[H, W]`` (a grayscale header) or ``[H, W, 3]``."""
    name = header.name
    with _open_image(name, data) as img:
        if img.size != (header.width, header.height):
            raise archive_changed(header)
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
            reraise_resource_error(exc)
            raise DatasetError(f"{name}: the image data is corrupt ({exc})") from exc
