"""The bounds a dataset upload is read under, and what running short of resources means."""

from __future__ import annotations

import errno
import zlib
from dataclasses import asdict, dataclass

from defense_core.errors import TooLargeError

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


DEFAULT_LIMITS = ArchiveLimits()


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


def reraise_resource_error(exc: BaseException) -> None:
    """In an ``except`` that turns ``exc`` into an input error: resource errors stay themselves."""
    if is_resource_error(exc):
        raise exc


def check_decoded_bytes(n: int, c: int, h: int, w: int, limits: ArchiveLimits) -> None:
    decoded = n * c * h * w
    if decoded > limits.max_decoded_bytes:
        raise TooLargeError(
            f"{n} images of {c}x{h}x{w} take {decoded} bytes as uint8; the limit for decoded "
            f"images is {limits.max_decoded_bytes} bytes (refused before decoding)"
        )
