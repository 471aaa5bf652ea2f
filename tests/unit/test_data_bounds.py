"""Dataset readers are bounded in what the process holds, not only in bytes read.

- Reading an archive of tens of thousands of tiny members leaves the number of
  memory mappings (``/proc/self/maps``, capped by ``vm.max_map_count``) and of
  open file descriptors where it was, at the peak as well as after.
- Decoded images are bounded before anything is decoded: each image's size
  comes from its header, and the total the uint8 tensor would take is checked
  against ``ArchiveLimits.max_decoded_bytes`` (a few hundred 1024x1024 PNGs of
  a few KB each are refused without the process growing).
- NPZ images are converted chunk by chunk: a float64 ``x`` costs the uint8
  output, not 8x more.
- Running out of memory or file handles while reading is never reported as
  bad input, and the reader works again once resources are back.

Memory is measured in fresh subprocesses (``ru_maxrss`` of a process that did
nothing else), mappings and descriptors by sampling ``/proc/self`` while reading.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defense_core.data import (
    ArchiveLimits,
    inspect_dataset_file,
    is_resource_error,
    load_image_archive,
    load_npz,
)
from defense_core.errors import ArchiveError, InputError, TooLargeError

REPO = Path(__file__).resolve().parents[2]
FORMATS = ("zip", "tar", "tar.gz")
MANY = 10_000  # enough for a per-member leak to stand out far above the slack below
SLACK = 64  # mappings a read may add once (thread stacks, arenas, lazily loaded code)


def png(shape: tuple[int, ...], value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_archive(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A zip, tar or tar.gz (from the suffix) holding ``members`` in order."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
        return path
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tiny_images(count: int) -> Iterator[tuple[str, bytes]]:
    data = png((4, 4))
    for i in range(count):
        yield f"class{i % 2}/{i}.png", data


def images_and_other_files(count: int) -> Iterator[tuple[str, bytes]]:
    """Tiny PNGs between hidden non-images (skipped), then a visible text file (refused)."""
    data = png((4, 4))
    for i in range(count - 1):
        if i % 2:
            yield f"class{i % 4 // 2}/.notes-{i}.txt", b"not an image"
        else:
            yield f"class{i % 4 // 2}/{i}.png", data
    yield "class1/readme.txt", b"the last member is not an image"


# ------------------------------------------------------------------ mappings and descriptors


def _count_maps() -> int:
    with open("/proc/self/maps", "rb") as fh:
        return sum(1 for _ in fh)


def _count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Usage:
    maps_before: int = 0
    fds_before: int = 0
    maps_peak: int = 0
    fds_peak: int = 0
    maps_after: int = 0
    fds_after: int = 0

    def assert_flat(self) -> None:
        assert self.maps_peak - self.maps_before <= SLACK, self
        assert self.maps_after - self.maps_before <= SLACK, self
        assert self.fds_peak - self.fds_before <= 4, self
        # no descriptor left open (one closed meanwhile by another thread of the process is fine)
        assert self.fds_after <= self.fds_before, self


@contextmanager
def sampled_usage() -> Iterator[Usage]:
    """Mappings and fds before, at the highest point while the block runs, and after."""
    usage = Usage()
    done = threading.Event()
    started = threading.Event()
    counting = threading.Lock()  # one count at a time: each sees only its own /proc/self/fd handle

    def count() -> tuple[int, int]:
        with counting:
            return _count_maps(), _count_fds()

    def sample() -> None:
        started.set()
        while not done.is_set():
            maps, fds = count()
            usage.maps_peak, usage.fds_peak = max(usage.maps_peak, maps), max(usage.fds_peak, fds)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()  # before the baseline: its own stack is not the reader's
    started.wait()
    usage.maps_before, usage.fds_before = count()
    try:
        yield usage
    finally:
        done.set()
        sampler.join()
        usage.maps_after, usage.fds_after = count()
        usage.maps_peak = max(usage.maps_peak, usage.maps_after)
        usage.fds_peak = max(usage.fds_peak, usage.fds_after)


@pytest.fixture(scope="module")
def many_member_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("many")
    archives = {}
    for fmt in FORMATS:
        archives[fmt, "images"] = write_archive(root / f"images.{fmt}", tiny_images(MANY))
        archives[fmt, "mixed"] = write_archive(root / f"mixed.{fmt}", images_and_other_files(MANY))
    return archives


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_image_members_leave_mappings_and_fds_flat(
    many_member_archives: dict[tuple[str, str], Path], fmt: str
) -> None:
    # Each member used to be read with read(64 MiB): the buffer was allocated whole and
    # shrunk, and every kept member stayed a mapping of its own (30,000+ for 30,000 members).
    path = many_member_archives[fmt, "images"]
    with sampled_usage() as usage:
        images, classes = load_image_archive(path)
    usage.assert_flat()
    assert images.x.shape == (MANY, 1, 4, 4) and classes == ["class0", "class1"]
    with sampled_usage() as usage:
        assert inspect_dataset_file(path, role="clean").num_samples == MANY
    usage.assert_flat()


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_members_are_read_through_and_the_visible_non_image_refused(
    many_member_archives: dict[tuple[str, str], Path], fmt: str
) -> None:
    with sampled_usage() as usage, pytest.raises(ArchiveError, match=r"class1/readme.txt: only PNG and JPEG"):
        inspect_dataset_file(many_member_archives[fmt, "mixed"], role="clean")
    usage.assert_flat()


@pytest.mark.parametrize("fmt", FORMATS)
def test_member_count_over_the_bound_is_refused_flat(
    many_member_archives: dict[tuple[str, str], Path], fmt: str
) -> None:
    limits = ArchiveLimits(max_members=MANY // 2)
    with sampled_usage() as usage, pytest.raises(ArchiveError, match=f"{MANY // 2}"):
        load_image_archive(many_member_archives[fmt, "images"], limits=limits)
    usage.assert_flat()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_hundred_thousand_members_leave_mappings_and_fds_flat(tmp_path: Path, fmt: str) -> None:
    """The reported case: ~100,000 tiny members, past the 65,530 mappings of vm.max_map_count."""
    path = write_archive(tmp_path / f"many.{fmt}", tiny_images(100_000))
    with sampled_usage() as usage:
        assert inspect_dataset_file(path, role="clean").num_samples == 100_000
    usage.assert_flat()
    over = write_archive(tmp_path / f"over.{fmt}", images_and_other_files(100_000))
    with sampled_usage() as usage, pytest.raises(ArchiveError, match=r"readme.txt"):
        inspect_dataset_file(over, role="clean")
    usage.assert_flat()


# ------------------------------------------------------------------ decoded images, bounded before decoding


PEAK_PRELUDE = """
import json, resource, sys
sys.path.insert(0, {repo!r})
import numpy as np, PIL.Image, PIL.PngImagePlugin, torch
from defense_core import data

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:
        return f"{{type(exc).__name__}}: {{exc}}"

base = peak_mb()
"""


def run_measured(body: str, *, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``body`` after PEAK_PRELUDE in a fresh interpreter; it prints one JSON line."""
    script = PEAK_PRELUDE.format(repo=str(REPO)) + body
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pixel_flood_is_refused_from_the_headers_without_growing(tmp_path: Path) -> None:
    # 300 black 1024x1024 PNGs: ~3 KB each, ~60 KB zipped, 900 MiB once decoded as RGB.
    black_rgb, black_gray = png((1024, 1024, 3)), png((1024, 1024))
    rgb = write_archive(tmp_path / "rgb.zip", ((f"c{i % 3}/{i}.png", black_rgb) for i in range(300)))
    gray = write_archive(tmp_path / "gray.zip", ((f"c{i % 3}/{i}.png", black_gray) for i in range(300)))
    assert rgb.stat().st_size < 200_000 and gray.stat().st_size < 200_000
    measured = run_measured(f"""
results = {{}}
for name in ("rgb", "gray"):
    path = {str(tmp_path)!r} + f"/{{name}}.zip"
    results[name] = [outcome(lambda: data.inspect_dataset_file(path, role="clean")),
                     outcome(lambda: data.load_dataset(path))]
print(json.dumps({{"results": results, "growth_mb": peak_mb() - base}}))
""")
    for name, outcomes in measured["results"].items():  # type: ignore[union-attr]
        for text in outcomes:
            assert text.startswith("TooLargeError"), (name, text)
            assert "limit for decoded images" in text and "before decoding" in text, text
    assert measured["growth_mb"] < 40, measured


def _folder(shapes: list[tuple[int, ...]]) -> list[tuple[str, bytes]]:
    return [(f"c{i % 2}/{i}.png", png(shape, value=i)) for i, shape in enumerate(shapes)]


def test_decoded_bytes_bound_is_exact_and_counts_the_channels_kept(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "rgb.zip", _folder([(7, 6, 3)] * 6))  # 6 * 3 * 7 * 6 = 756 bytes
    images, _ = load_image_archive(path, limits=ArchiveLimits(max_decoded_bytes=756))
    assert images.x.shape == (6, 3, 7, 6)
    with pytest.raises(TooLargeError, match="limit for decoded images"):
        load_image_archive(path, limits=ArchiveLimits(max_decoded_bytes=755))
    # Five grayscale images and one RGB are all stored as RGB: 6 * 3 * 64 = 1152 bytes,
    # though their own pixels add up to 5 * 64 + 192 = 512.
    mixed = write_archive(tmp_path / "mixed.zip", _folder([(8, 8)] * 5 + [(8, 8, 3)]))
    with pytest.raises(TooLargeError, match="6 images of 3x8x8 take 1152 bytes"):
        inspect_dataset_file(mixed, role="clean", limits=ArchiveLimits(max_decoded_bytes=1000))
    assert load_image_archive(mixed, limits=ArchiveLimits(max_decoded_bytes=1152))[0].x.shape == (6, 3, 8, 8)


def test_defaults_accept_real_datasets(tmp_path: Path) -> None:
    limits = ArchiveLimits()
    assert limits.max_decoded_bytes >= 50_000 * 3 * 32 * 32  # CIFAR-10's training set
    assert limits.max_decoded_bytes >= 60_000 * 28 * 28  # MNIST's
    sample = png((32, 32, 3), value=7)
    path = write_archive(tmp_path / "cifar.tar.gz",
                         ((f"cifar/class{i % 10}/{i}.png", sample) for i in range(10_000)))
    info = inspect_dataset_file(path, role="clean")
    assert info.num_samples == 10_000 and info.image_shape == (3, 32, 32)
    assert info.classes == [f"class{i}" for i in range(10)]


def test_image_headers_are_checked_before_any_image_is_decoded(tmp_path: Path) -> None:
    # The oversized image comes last in the archive but is refused before the corrupt
    # one before it would be decoded (which would name the corrupt file instead).
    corrupt = png((6, 6))[:40] + b"\x00" * 64  # a valid PNG header, broken pixel data
    members = [("a/0.png", png((6, 6))), ("a/1.png", corrupt), ("b/2.png", png((2000, 30)))]
    with pytest.raises(InputError, match=r"b/2.png: 30x2000 is larger than 1024 per side"):
        inspect_dataset_file(write_archive(tmp_path / "d.zip", members), role="clean")
    with pytest.raises(InputError, match=r"a/1.png"):
        inspect_dataset_file(write_archive(tmp_path / "e.zip", [*members[:2], ("b/2.png", png((6, 6)))]),
                             role="clean")


# ------------------------------------------------------------------ NPZ conversions


def test_npz_float_images_cost_the_uint8_output_not_the_float_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(1500, 64, 64, 3)).astype(np.float64) / 255.0  # 141 MiB as float64
    path = tmp_path / "floats.npz"
    np.savez(path, x=x, y=np.arange(1500) % 10)
    expected = np.rint(x.astype(np.float32) * 255.0).astype(np.uint8).transpose(0, 3, 1, 2)
    np.save(tmp_path / "expected.npy", expected)
    del x
    measured = run_measured(f"""
path = {str(path)!r}
n = data.inspect_dataset_file(path, role="clean").num_samples
inspect_growth = peak_mb() - base
x = data.load_dataset(path).x.numpy()
load_growth = peak_mb() - base
same = bool(np.array_equal(x, np.load({str(tmp_path / "expected.npy")!r})))
print(json.dumps({{"n": n, "inspect_growth_mb": inspect_growth, "load_growth_mb": load_growth,
                  "same": same}}))
""")
    assert measured["n"] == 1500 and measured["same"], measured
    # The uint8 output is 18 MiB; np.load alone would take 141 MiB, inspecting keeps no output.
    assert measured["inspect_growth_mb"] < 40, measured
    assert measured["load_growth_mb"] < 70, measured


def test_npz_decoded_size_is_checked_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((10, 8, 8, 3), np.uint8), y=np.zeros(10, np.int64))
    assert load_npz(path, max_decoded_bytes=1920).x.shape == (10, 3, 8, 8)
    with pytest.raises(TooLargeError, match="10 images of 3x8x8 take 1920 bytes"):
        load_npz(path, max_decoded_bytes=1919)
    # Fortran-ordered data cannot be streamed by samples: read whole only while small.
    fortran = tmp_path / "f.npz"
    np.savez(fortran, x=np.asfortranarray(np.zeros((10, 8, 8, 3), np.float32)), y=np.zeros(10, np.int64))
    assert load_npz(fortran).x.shape == (10, 3, 8, 8)
    with pytest.raises(TooLargeError, match="Fortran order"):
        load_npz(fortran, max_decoded_bytes=7680 - 1)


def test_npz_labels_are_checked_from_the_header_before_reading(tmp_path: Path) -> None:
    # y declares 10x more entries than x has images: refused by its header, whatever it holds.
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(40, np.int64))
    with pytest.raises(InputError, match="`y` has 40 entries but x has 4 images"):
        inspect_dataset_file(path, role="clean")


# ------------------------------------------------------------------ running out is not bad input


def test_resource_errors_are_told_apart_from_input_errors() -> None:
    assert is_resource_error(MemoryError())
    assert is_resource_error(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert is_resource_error(OSError(errno.EMFILE, "Too many open files"))
    assert is_resource_error(OSError(errno.ENFILE, "Too many open files in system"))
    assert is_resource_error(OSError("out of memory when reading image file"))  # PIL's decoders
    assert is_resource_error(zlib.error("Error -4 while decompressing data: insufficient memory"))
    assert not is_resource_error(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_resource_error(OSError("image file is truncated"))
    assert not is_resource_error(zlib.error("Error -3 while decompressing data: invalid block type"))
    assert not is_resource_error(ValueError("bad"))


# Large blocks come from mmap and go back at once, all threads share one arena: the
# address-space limit then fails the first large allocation, wherever the heap stands.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
              "MALLOC_TRIM_THRESHOLD_": "131072"}


def test_out_of_memory_and_file_handles_while_reading_propagate_and_pass(tmp_path: Path) -> None:
    # One sample of x is 24 MiB (1024x1024x3 float64): reading it needs one 24 MiB block.
    path = tmp_path / "big.npz"
    np.savez(path, x=np.full((2, 1024, 1024, 3), 0.5), y=np.array([0, 1]))
    measured = run_measured(f"""
import os, resource
path = {str(path)!r}
def vm_size():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize"))
results = {{"warm": outcome(lambda: data.inspect_dataset_file(path, role="clean"))}}
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (8 << 20), hard))
try:
    results["memory"] = outcome(lambda: data.inspect_dataset_file(path, role="clean"))
finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
results["memory_then"] = outcome(lambda: data.inspect_dataset_file(path, role="clean"))
probe = os.dup(0); os.close(probe)  # the lowest free descriptor: the limit makes it unusable
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
try:
    results["files"] = outcome(lambda: data.inspect_dataset_file(path, role="clean"))
finally:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
results["files_then"] = outcome(lambda: data.inspect_dataset_file(path, role="clean"))
print(json.dumps(results))
""", env=MALLOC_ENV)
    assert measured["warm"] == "ok", measured
    assert str(measured["memory"]).startswith("MemoryError"), measured
    assert str(measured["files"]).startswith("OSError") and "Too many open files" in str(measured["files"]), measured
    assert measured["memory_then"] == measured["files_then"] == "ok", measured
