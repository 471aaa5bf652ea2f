"""Reading and validating a dataset file, whichever format its bytes say it is."""

from __future__ import annotations

import os
from pathlib import Path

from defense_core.data.archive import sniff_dataset_format
from defense_core.data.folder import read_archive
from defense_core.data.limits import DEFAULT_LIMITS, ArchiveLimits
from defense_core.data.npz import read_npz
from defense_core.data.results import DatasetInfo, Read
from defense_core.errors import DatasetError, InputError
from defense_core.imageset import ImageSet

ROLES = ("clean", "test", "poisoned")


def load_dataset(
    path: str | os.PathLike[str], *, limits: ArchiveLimits = DEFAULT_LIMITS
) -> ImageSet:
    """Read an NPZ or an ImageFolder archive, whichever the bytes say it is."""
    return _read_any(Path(path), limits, keep_images=True).imageset()


def inspect_dataset_file(
    path: str | os.PathLike[str], *, role: str, limits: ArchiveLimits = DEFAULT_LIMITS
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


def _read_any(path: Path, limits: ArchiveLimits, *, keep_images: bool) -> Read:
    fmt = sniff_dataset_format(path)
    if fmt == "npz":
        return read_npz(path, limits, keep_images=keep_images)
    return read_archive(path, fmt, limits, keep_images=keep_images)
