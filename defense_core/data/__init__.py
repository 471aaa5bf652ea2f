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

Modules: :mod:`~defense_core.data.limits` (the bounds, resource errors),
:mod:`~defense_core.data.archive` (format sniffing, member safety, bounded
member reads), :mod:`~defense_core.data.npz` (NPZ arrays),
:mod:`~defense_core.data.folder` and :mod:`~defense_core.data.images`
(ImageFolder archives, image headers and decoding),
:mod:`~defense_core.data.arrays` (layout, range and label checks, conversion),
:mod:`~defense_core.data.validation` (:func:`load_dataset`,
:func:`inspect_dataset_file`) and :mod:`~defense_core.data.results`.
"""

from defense_core.data.archive import IMAGE_SUFFIXES, RATIO_CHECK_MIN_BYTES, sniff_dataset_format
from defense_core.data.arrays import arrays_to_imageset
from defense_core.data.folder import load_image_archive
from defense_core.data.limits import ArchiveLimits, is_resource_error
from defense_core.data.npz import MAX_NPZ_MEMBERS, NPZ_ARRAYS, load_npz, save_npz
from defense_core.data.results import DatasetInfo
from defense_core.data.validation import ROLES, inspect_dataset_file, load_dataset

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_NPZ_MEMBERS",
    "NPZ_ARRAYS",
    "RATIO_CHECK_MIN_BYTES",
    "ROLES",
    "ArchiveLimits",
    "DatasetInfo",
    "arrays_to_imageset",
    "inspect_dataset_file",
    "is_resource_error",
    "load_dataset",
    "load_image_archive",
    "load_npz",
    "save_npz",
    "sniff_dataset_format",
]
