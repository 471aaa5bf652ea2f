"""Dataset readers: NPZ layouts and label checks, ImageFolder archives, hostile archives."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defense_core.data import (
    ArchiveLimits,
    inspect_dataset_file,
    load_dataset,
    load_image_archive,
    load_npz,
    save_npz,
    sniff_dataset_format,
)
from defense_core.errors import ArchiveError, DatasetError, InputError, TooLargeError
from defense_core.imageset import ImageSet

RNG = np.random.default_rng(0)
X_NHWC = RNG.integers(0, 256, size=(6, 8, 9, 3), dtype=np.uint8)  # H=8, W=9: layout is unambiguous
Y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)


def _npz(path: Path, **arrays: object) -> Path:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return path


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: dict[str, bytes], *, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------ NPZ layouts


def test_nhwc_nchw_and_float_give_the_same_imageset(tmp_path: Path) -> None:
    nhwc = load_npz(_npz(tmp_path / "a.npz", x=X_NHWC, y=Y))
    nchw = load_npz(_npz(tmp_path / "b.npz", x=X_NHWC.transpose(0, 3, 1, 2), y=Y))
    floats = load_npz(_npz(tmp_path / "c.npz", x=X_NHWC.astype(np.float32) / 255.0, y=Y))
    expected = torch.from_numpy(X_NHWC.transpose(0, 3, 1, 2).copy())
    for images in (nhwc, nchw, floats):
        assert images.x.dtype == torch.uint8 and images.x.shape == (6, 3, 8, 9)
        assert torch.equal(images.x, expected)
        assert torch.equal(images.y, torch.from_numpy(Y))
        assert images.target is None


def test_float_pixels_are_rounded(tmp_path: Path) -> None:
    x = np.array([0.0, 1.0, 0.5, 0.1, 0.9999], dtype=np.float64).reshape(1, 1, 1, 5).repeat(8, axis=2)
    images = load_npz(_npz(tmp_path / "f.npz", x=x, y=np.array([0])))
    # 0.5*255 = 127.5 -> 128; 0.1*255 = 25.5 -> 26 (float64: 25.500000000000004); 0.9999*255 = 254.97 -> 255
    assert images.x[0, 0, 0].tolist() == [0, 255, 128, 26, 255]


def test_grayscale_3d_and_ambiguous_layouts(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, size=(2, 10, 11), dtype=np.uint8)
    images = load_npz(_npz(tmp_path / "g.npz", x=gray, y=np.array([1, 0])))
    assert images.x.shape == (2, 1, 10, 11) and torch.equal(images.x[:, 0], torch.from_numpy(gray))
    # [N, 3, 3, 3] fits both readings: NHWC wins.
    cube = RNG.integers(0, 256, size=(2, 3, 3, 3), dtype=np.uint8)
    images = load_npz(_npz(tmp_path / "c.npz", x=cube, y=np.array([1, 0])))
    assert torch.equal(images.x, torch.from_numpy(cube.transpose(0, 3, 1, 2).copy()))


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((2, 5, 5, 5), np.uint8), "cannot tell the channel axis"),
        (np.zeros((2, 25), np.uint8), "x must be"),
        (np.full((2, 4, 4), 1.2, np.float32), "must be in \\[0, 1\\]"),
        (np.full((2, 4, 4), np.nan, np.float32), "NaN"),
        (np.full((2, 4, 4), 300, np.int32), "\\[0, 255\\]"),
        (np.zeros((2, 4, 4), bool), "dtype bool"),
    ],
)
def test_bad_images_are_refused(tmp_path: Path, x: np.ndarray, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_npz(_npz(tmp_path / "bad.npz", x=x, y=np.array([0, 1])))


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (np.array([0, -1]), "negative label \\(-1\\)"),
        (np.array([0.0, 1.5]), "integer labels, got dtype float64"),
        (np.array([0, 1, 2]), "has 3 entries but x has 2 images"),
        (np.array([[0], [1]]), "1-D"),
    ],
)
def test_label_errors(tmp_path: Path, y: np.ndarray, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_npz(_npz(tmp_path / "bad.npz", x=np.zeros((2, 4, 4), np.uint8), y=y))


def test_scalar_target_is_broadcast_and_per_sample_checked(tmp_path: Path) -> None:
    images = load_npz(_npz(tmp_path / "p.npz", x=X_NHWC, y=Y + 1, target=np.int64(0)))
    assert images.target is not None and images.target.tolist() == [0] * 6
    with pytest.raises(DatasetError, match="`target` has 2 entries"):
        load_npz(_npz(tmp_path / "q.npz", x=X_NHWC, y=Y, target=np.array([0, 0])))


def test_missing_y_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no `y` array \\(found: x\\)"):
        load_npz(_npz(tmp_path / "a.npz", x=X_NHWC))


def test_max_samples(tmp_path: Path) -> None:
    with pytest.raises(TooLargeError, match="6 images; the limit is 5"):
        load_npz(_npz(tmp_path / "a.npz", x=X_NHWC, y=Y), max_samples=5)


class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[override]
        return (open, (self.path, "w"))


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    x = np.empty(2, dtype=object)
    x[0] = _CreatesFileWhenUnpickled(marker)
    with pytest.raises(DatasetError, match="only plain numeric arrays"):
        load_npz(_npz(tmp_path / "o.npz", x=x, y=np.array([0, 1])))
    assert not marker.exists()


def test_npy_header_declaring_more_than_it_holds_is_refused_before_allocating(tmp_path: Path) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)}
    )
    bogus_x = header.getvalue() + bytes(64)  # the header (with its magic) and 64 bytes of data
    buf = io.BytesIO()
    np.save(buf, Y)
    path = _zip(tmp_path / "lie.npz", {"x.npy": bogus_x, "y.npy": buf.getvalue()})
    with pytest.raises(DatasetError, match="declares shape \\(1000000000, 28, 28\\)"):
        load_npz(path)


def test_compressed_npz_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    with path.open("wb") as fh:
        np.savez_compressed(fh, x=np.zeros((20_000, 32, 32), np.uint8), y=np.zeros(20_000, np.int64))
    with pytest.raises(ArchiveError, match="possible decompression bomb"):
        load_npz(path)


def test_save_npz_round_trip_writes_exactly_the_path(tmp_path: Path) -> None:
    original = ImageSet(
        x=torch.from_numpy(X_NHWC.transpose(0, 3, 1, 2).copy()),
        y=torch.from_numpy(Y) + 1,
        target=torch.zeros(6, dtype=torch.int64),
    )
    path = tmp_path / "poisoned.bin"
    save_npz(path, original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poisoned.bin"]
    again = load_dataset(path)
    assert torch.equal(again.x, original.x) and torch.equal(again.y, original.y)
    assert again.target is not None and torch.equal(again.target, original.target)


# ------------------------------------------------------------------ ImageFolder archives


def _folder(gray: bool = False) -> tuple[dict[str, bytes], np.ndarray, list[int]]:
    shape = (7, 6) if gray else (7, 6, 3)
    members, arrays, labels = {}, [], []
    for label, cls in enumerate(["airplane", "bird", "cat"]):
        for i in range(2):
            arr = RNG.integers(0, 256, size=shape, dtype=np.uint8)
            members[f"cifar/{cls}/{i}.png"] = _png(arr)
            arrays.append(arr)
            labels.append(label)
    return members, np.stack(arrays), labels


def test_zip_and_tar_gz_image_folders_give_the_same_images(tmp_path: Path) -> None:
    members, arrays, labels = _folder()
    # Shuffled member order must not matter; an enclosing "cifar/" folder is allowed.
    shuffled = dict(reversed(list(members.items())))
    from_zip, classes = load_image_archive(_zip(tmp_path / "d.zip", shuffled))
    from_tar, classes_tar = load_image_archive(_tar(tmp_path / "d.tar.gz", members))
    assert classes == classes_tar == ["airplane", "bird", "cat"]
    expected = torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy())
    for images in (from_zip, from_tar):
        assert torch.equal(images.x, expected)
        assert images.y.tolist() == labels
    assert sniff_dataset_format(tmp_path / "d.zip") == "zip"
    assert sniff_dataset_format(tmp_path / "d.tar.gz") == "tar.gz"


def test_grayscale_folder_stays_single_channel_and_mixed_becomes_rgb(tmp_path: Path) -> None:
    members, arrays, _ = _folder(gray=True)
    images, _ = load_image_archive(_zip(tmp_path / "g.zip", members))
    assert images.x.shape == (6, 1, 7, 6) and torch.equal(images.x[:, 0], torch.from_numpy(arrays))
    rgb = RNG.integers(0, 256, size=(7, 6, 3), dtype=np.uint8)
    members["cifar/cat/9.png"] = _png(rgb)
    mixed, _ = load_image_archive(_zip(tmp_path / "m.zip", members))
    assert mixed.x.shape == (7, 3, 7, 6)
    assert torch.equal(mixed.x[0], torch.from_numpy(arrays[0]).expand(3, 7, 6))  # gray replicated
    assert torch.equal(mixed.x[-1], torch.from_numpy(rgb).permute(2, 0, 1))


def test_images_of_different_sizes_name_the_file(tmp_path: Path) -> None:
    members, _, _ = _folder()
    members["cifar/cat/odd.png"] = _png(np.zeros((5, 5, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"cifar/cat/odd.png is 5x5 but .* is 7x6"):
        load_image_archive(_zip(tmp_path / "d.zip", members))


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    members, _, _ = _folder()
    members["cifar/dog/"] = b""  # a directory entry with nothing inside
    with pytest.raises(DatasetError, match="class folder 'dog' has no images"):
        load_image_archive(_zip(tmp_path / "d.zip", members))


def test_non_image_and_corrupt_files_are_named(tmp_path: Path) -> None:
    members, _, _ = _folder()
    with pytest.raises(ArchiveError, match=r"cifar/cat/notes.txt: only PNG and JPEG"):
        load_image_archive(_zip(tmp_path / "a.zip", {**members, "cifar/cat/notes.txt": b"hi"}))
    with pytest.raises(DatasetError, match=r"cifar/cat/broken.png: not a readable PNG"):
        load_image_archive(_zip(tmp_path / "b.zip", {**members, "cifar/cat/broken.png": b"\x89PNG junk"}))
    # Hidden files and macOS forks are ignored.
    images, _ = load_image_archive(
        _zip(tmp_path / "c.zip", {**members, "cifar/.DS_Store": b"x", "__MACOSX/cifar/._0.png": b"x"})
    )
    assert len(images) == 6


def test_pixel_limit_is_checked_per_image(tmp_path: Path) -> None:
    members, _, _ = _folder()
    with pytest.raises(ArchiveError, match=r"cifar/airplane/0.png: 6x7 pixels exceeds the limit of 40"):
        load_image_archive(_zip(tmp_path / "d.zip", members), limits=ArchiveLimits(max_image_pixels=40))


# ------------------------------------------------------------------ hostile archives


@pytest.mark.parametrize("name", ["../evil.png", "/etc/evil.png", "cat/../../evil.png", "C:\\evil.png", "..\\evil.png"])
def test_traversal_paths_in_zip_are_refused(tmp_path: Path, name: str) -> None:
    members, _, _ = _folder()
    zip_path = tmp_path / "t.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
        zf.writestr(zipfile.ZipInfo(name), _png(np.zeros((7, 6, 3), np.uint8)))
    with pytest.raises(ArchiveError, match=r"absolute path|leaves the archive"):
        load_image_archive(zip_path)


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png"])
def test_traversal_paths_in_tar_are_refused(tmp_path: Path, name: str) -> None:
    members, _, _ = _folder()
    with pytest.raises(ArchiveError, match=r"absolute path|leaves the archive"):
        load_image_archive(_tar(tmp_path / "t.tar.gz", {**members, name: b"x"}))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_devices_in_tar_are_refused(tmp_path: Path, kind: bytes) -> None:
    members, _, _ = _folder()
    path = _tar(tmp_path / "t.tar.gz", members)
    with tarfile.open(tmp_path / "l.tar.gz", "w:gz") as out, tarfile.open(path) as src:
        for member in src:
            out.addfile(member, src.extractfile(member))
        link = tarfile.TarInfo("cifar/cat/link.png")
        link.type = kind
        link.linkname = "/etc/passwd"
        out.addfile(link)
    with pytest.raises(ArchiveError, match=r"is a link|not a regular file"):
        load_image_archive(tmp_path / "l.tar.gz")


def test_symlink_in_zip_is_refused(tmp_path: Path) -> None:
    members, _, _ = _folder()
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
        info = zipfile.ZipInfo("cifar/cat/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        load_image_archive(path)


def test_zip_bomb_member_is_refused_before_decompression(tmp_path: Path) -> None:
    members, _, _ = _folder()
    path = _zip(tmp_path / "bomb.zip", {**members, "cifar/cat/big.png": bytes(30 * 1024**2)})
    assert path.stat().st_size < 200_000
    with pytest.raises(ArchiveError, match="possible decompression bomb"):
        load_image_archive(path)


def test_tar_gz_bomb_is_cut_off_while_streaming(tmp_path: Path) -> None:
    members, _, _ = _folder()
    path = _tar(tmp_path / "bomb.tar.gz", {**members, "cifar/cat/big.png": bytes(30 * 1024**2)})
    assert path.stat().st_size < 200_000
    with pytest.raises(ArchiveError, match="possible decompression bomb"):
        load_image_archive(path)


def test_member_count_and_size_limits(tmp_path: Path) -> None:
    members, _, _ = _folder()
    path = _zip(tmp_path / "d.zip", members)
    with pytest.raises(ArchiveError, match="limit is 3"):
        load_image_archive(path, limits=ArchiveLimits(max_members=3))
    with pytest.raises(TooLargeError, match="the limit is 10"):
        load_image_archive(path, limits=ArchiveLimits(max_member_bytes=10))
    tar = _tar(tmp_path / "d.tar", members, mode="w")
    assert sniff_dataset_format(tar) == "tar"
    with pytest.raises(TooLargeError, match="the limit is 10"):
        load_image_archive(tar, limits=ArchiveLimits(max_member_bytes=10))


def test_gzip_that_is_not_a_tar_is_an_archive_error(tmp_path: Path) -> None:
    path = tmp_path / "d.tar.gz"
    path.write_bytes(gzip.compress(b"just text, no tar headers" * 40))
    with pytest.raises(ArchiveError, match="cannot be read"):
        load_image_archive(path)


def test_truncated_gzip_is_an_archive_error(tmp_path: Path) -> None:
    members, _, _ = _folder()
    path = _tar(tmp_path / "d.tar.gz", members)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ArchiveError, match="cannot be read"):
        load_image_archive(path)


# ------------------------------------------------------------------ inspect by role


def test_inspect_reports_what_it_found(tmp_path: Path) -> None:
    info = inspect_dataset_file(_npz(tmp_path / "p.npz", x=X_NHWC, y=Y + 1, target=np.int64(0)), role="poisoned")
    assert info.to_dict() == {
        "format": "npz",
        "num_samples": 6,
        "image_shape": [3, 8, 9],
        "num_classes_seen": 3,
        "label_min": 1,
        "label_max": 3,
        "classes": None,
        "has_target": True,
        "target_labels": [0],
        "target_class_samples": 0,
    }
    members, _, _ = _folder()
    info = inspect_dataset_file(_zip(tmp_path / "d.zip", members), role="clean")
    assert info.classes == ["airplane", "bird", "cat"] and info.format == "zip" and not info.has_target


def test_inspect_role_rules(tmp_path: Path) -> None:
    clean = _npz(tmp_path / "c.npz", x=X_NHWC, y=Y)
    with pytest.raises(InputError, match="unknown dataset role 'train'"):
        inspect_dataset_file(clean, role="train")
    with pytest.raises(DatasetError, match="needs `target`"):
        inspect_dataset_file(clean, role="poisoned")
    # Target-class samples are accepted and counted (ASR/RA leave them out) ...
    mixed = inspect_dataset_file(_npz(tmp_path / "p.npz", x=X_NHWC, y=Y, target=np.int64(0)), role="poisoned")
    assert mixed.target_class_samples == 2 and mixed.num_samples == 6
    # ... but a set made only of them measures nothing.
    with pytest.raises(DatasetError, match="every poisoned sample has y equal to its target"):
        inspect_dataset_file(
            _npz(tmp_path / "q.npz", x=X_NHWC, y=np.zeros(6, dtype=np.int64), target=np.int64(0)), role="poisoned"
        )
    assert inspect_dataset_file(clean, role="test").num_samples == 6


def test_unknown_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello world, not a dataset")
    with pytest.raises(DatasetError, match="unrecognized dataset format"):
        load_dataset(path)
