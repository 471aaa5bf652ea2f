"""Hostile uploads: files and form fields a stranger could send to ``POST /v1/models`` and
``POST /v1/datasets``, each with the outcome the service owes them.

Every :class:`Case` builds its bytes in memory (a few use the tmp folder for the paths
their payload aims at), in well under a second and without downloads, and names what a
correct service answers: the status and the problem ``type`` slug, or 201 where accepting
is right. ``marker`` names a file (in the tmp folder) that the payload creates if it ever
runs: it must not exist afterwards. ``secret`` is bytes written to a host file that the
payload tries to read: they must not come back in the answer.

Used by ``tests/api/test_hostile_corpus.py`` (in-process app) and ``bench/hostile.py``
(the served app, with its memory measured per case).

Decisions worth stating:

- **Huge finite weights** (every float ``3e38``) load and map an input to logits of the
  right shape, so the upload is accepted; a job on such a model fails later as
  ``training-diverged``. NaN and infinite weights are refused at upload: no job could
  ever use them.
- **Pixel floods and sample floods** are 413 ``payload-too-large``: the file is small or
  ordinary, what it holds once decoded is over the bounds, and the engine says so before
  decoding. An NPZ header that declares more than the file holds is ``invalid-dataset``
  (the file contradicts itself), also refused from the header before any allocation.
- **Malformed archives** are ``unsafe-archive`` (the engine's code for archives it will
  not read: bombs, links, devices, traversal, corrupt structure); a file that is not a
  readable dataset at all is ``invalid-dataset``. A truncated archive may be either,
  depending on where the damage is found, so those cases accept both.
- **Malformed model files** are ``model-mismatch`` (the engine's code for "this file does
  not give the declared model"); files that are not a known format, or that would need
  unpickling, are ``unsafe-model``.
"""

from __future__ import annotations

import io
import json
import pickle
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The tests' registry model (tests/api/conftest.SPEC): small_cnn, 4 classes, 1x16x16.
SPEC: dict[str, Any] = {"arch": "small_cnn", "num_classes": 4, "in_channels": 1,
                        "input_size": [16, 16], "mean": [0.5], "std": [0.25]}
TORCHSCRIPT_SPEC: dict[str, Any] = {**SPEC, "arch": "torchscript"}
SECRET = b"TOPSECRET-cleanroom-host-credential"

MIB = 1 << 20
MANY_MEMBERS = 100_000

@dataclass(frozen=True)
class Case:
    """One hostile upload and what the service must answer."""

    name: str
    kind: str  # "model" (POST /v1/models) or "dataset" (POST /v1/datasets)
    build: Callable[[Path], bytes]  # the file's bytes; tmp holds the marker/secret targets
    status: int  # expected HTTP status
    slugs: tuple[str, ...]  # acceptable problem type slugs (empty when accepted)
    why: str  # what the file tries, and why the expectation is right
    fields: Mapping[str, str | list[str]] = field(default_factory=dict)
    filename: str = "upload.bin"
    marker: str | None = None  # tmp-folder file the payload would create if it ran
    secret: bool = False  # the payload tries to read tmp/credentials (SECRET)

    def __repr__(self) -> str:  # short in test reports (some fields are megabytes)
        return f"Case({self.name!r}, {self.kind}, expects {self.expected})"

    @property
    def endpoint(self) -> str:
        return "/v1/models" if self.kind == "model" else "/v1/datasets"

    @property
    def accepted(self) -> bool:
        return self.status == 201

    @property
    def expected(self) -> str:
        return "accepted" if self.accepted else f"{self.status} {' or '.join(self.slugs)}"


def _case(kind: str, name: str, build: Callable[[Path], bytes], expect: str, why: str,
          **kw: Any) -> Case:
    """``expect``: ``"201"``, or ``"422 slug"`` (``"422 a|b"`` when either slug is right)."""
    status, _, slugs = expect.partition(" ")
    return Case(name=name, kind=kind, build=build, status=int(status),
                slugs=tuple(slugs.split("|")) if slugs else (), why=why, **kw)


def model(name: str, build: Callable[[Path], bytes], expect: str, why: str, *,
          spec: Mapping[str, Any] | str = SPEC, **kw: Any) -> Case:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return _case("model", name, build, expect, why, fields={"spec": text}, **kw)


def dataset(name: str, build: Callable[[Path], bytes], expect: str, why: str, *,
            fields: Mapping[str, str | list[str]] | None = None, **kw: Any) -> Case:
    return _case("dataset", name, build, expect, why, fields={"role": "clean", **(fields or {})},
                 **kw)


# --------------------------------------------------------------------------- building blocks


class Payload:
    """Unpickling this calls ``open(path, "w")``: the marker file appears if a loader runs it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def png(width: int, height: int, *, rgb: bool = False, body: bytes | None = None) -> bytes:
    """A PNG of zeros (black) declaring ``width`` x ``height``; ``body`` replaces its IDAT data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    channels = 3 if rgb else 1
    if body is None:
        body = zlib.compress(bytes((width * channels + 1) * height), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def zip_bytes(members: Iterable[tuple[str | zipfile.ZipInfo, bytes]], *,
              compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A tar.gz of ``members`` (``None`` data for links, FIFOs and devices)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tar_member(name: str, *, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o644
    return info


def image_folder(extra: Iterable[tuple[str, bytes]] = ()) -> list[tuple[str, bytes]]:
    """Two classes of two 16x16 gray images: valid on its own, ``extra`` makes it hostile."""
    image = png(16, 16)
    return [(f"c{i % 2}/{i}.png", image) for i in range(4)] + list(extra)


def folder_tar(extra: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    return tar_bytes([(tar_member(name), data) for name, data in image_folder()] + list(extra))


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def valid_npz(n: int = 8) -> bytes:
    rng = np.random.default_rng(0)
    return npz(x=rng.integers(0, 256, size=(n, 16, 16, 1), dtype=np.uint8),
               y=np.arange(n, dtype=np.int64) % 4)


def npy_header_only(shape: tuple[int, ...], descr: str = "|u1", data: bytes = bytes(64)) -> bytes:
    """A .npy file whose header declares ``shape`` but which holds only ``data``."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin-1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def small_cnn_state(num_classes: int = 4) -> dict[str, Any]:
    import torch

    from defense_core.registry import create_model
    from defense_core.spec import ModelSpec

    torch.manual_seed(0)
    return create_model(ModelSpec.from_dict({**SPEC, "num_classes": num_classes})).state_dict()


def safetensors_of(state: Mapping[str, Any]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def valid_model() -> bytes:
    return safetensors_of(small_cnn_state())


def torch_save(obj: Any) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def raw_safetensors(header: bytes, data: bytes = bytes(16), *,
                    declared: int | None = None) -> bytes:
    """``[u64 header length][header][data]``, with the length as given (or the true one)."""
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


def st_header(entries: Mapping[str, Mapping[str, Any]]) -> bytes:
    return json.dumps(dict(entries)).encode()


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def scripted(make: Callable[[], Any]) -> bytes:
    from tests.hostile_models import scripted_bytes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still accepted
        return scripted_bytes(make())


# --------------------------------------------------------------------------- model files


def _raw_pickle(tmp: Path) -> bytes:
    state = {"conv.weight": [0.0], "payload": Payload(tmp / "pwned-raw-pickle")}
    return pickle.dumps(state, protocol=2)


def _torch_save_module(tmp: Path) -> bytes:
    from defense_core.registry import create_model
    from defense_core.spec import ModelSpec

    return torch_save(create_model(ModelSpec.from_dict(SPEC)))


def _zip_pickle(tmp: Path) -> bytes:
    """A hand-made torch.save layout whose data.pkl is a plain pickle with a payload."""
    payload = pickle.dumps(Payload(tmp / "pwned-zip-pickle"), protocol=2)
    return zip_bytes([("archive/data.pkl", payload), ("archive/version", b"3\n"),
                      ("archive/byteorder", b"little")], compression=zipfile.ZIP_STORED)


def _torch_save_payload(tmp: Path) -> bytes:
    import torch

    payload = Payload(tmp / "pwned-torch-save")
    return torch_save({"conv1.weight": torch.zeros(1), "payload": payload})


def _weights(value: float) -> Callable[[Path], bytes]:
    def build(tmp: Path) -> bytes:
        state = small_cnn_state()
        for name, tensor in state.items():
            if tensor.is_floating_point() and name.endswith("weight"):
                if value == 3e38:
                    tensor.fill_(value)
                else:
                    tensor.view(-1)[0] = value
        return safetensors_of(state)

    return build


def _wrong_shapes(tmp: Path) -> bytes:
    return torch_save(small_cnn_state(num_classes=10))  # spec says 4


def _file_writer(tmp: Path) -> bytes:
    from tests.hostile_models import FileWriter

    return scripted(lambda: FileWriter(str(tmp / "pwned-from-file")))


def _setstate_writer(tmp: Path) -> bytes:
    from tests.hostile_models import SetStateWriter

    return scripted(lambda: SetStateWriter(str(tmp / "pwned-setstate")))


def _file_reader(tmp: Path) -> bytes:
    from tests.hostile_models import FileReader

    secret = tmp / "credentials"
    secret.write_bytes(SECRET)
    return scripted(lambda: FileReader(str(secret)))


def _forever_looper() -> Any:
    import torch

    from tests.hostile_models import Benign

    class ForeverLooper(Benign):
        """Loops on any input without NaN (a zero input included), all in C++."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x
            while bool((y == y).all()):
                y = y + 1.0
            return self.logits(x)

    return ForeverLooper()


def _allocator() -> Any:
    from tests.hostile_models import Allocator

    return Allocator()


def _benign() -> Any:
    from tests.hostile_models import Benign

    return Benign()


def _truncated_torchscript(tmp: Path) -> bytes:
    return half(scripted(_benign))


def _huge_shape(tmp: Path) -> bytes:
    side = 1 << 31
    return raw_safetensors(st_header(
        {"w": {"dtype": "F32", "shape": [side, side, side], "data_offsets": [0, 16]}}))


def _st_entries(**entries: tuple[str, list[int], list[int]]) -> Callable[[Path], bytes]:
    """safetensors with 16 data bytes and ``name=(dtype, shape, data_offsets)`` entries."""
    header = {name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}
              for name, (dtype, shape, offsets) in entries.items()}
    return lambda tmp: raw_safetensors(st_header(header))


def _valid_model(tmp: Path) -> bytes:
    return valid_model()


TS = {"spec": TORCHSCRIPT_SPEC, "filename": "model.pt"}
PT = {"filename": "model.pt"}

MODEL_CASES: list[Case] = [
    model("raw-pickle-reduce", _raw_pickle, "422 unsafe-model",
          "a plain pickle whose __reduce__ opens a host file: refused from its first bytes",
          marker="pwned-raw-pickle", filename="model.pkl"),
    model("torch-save-whole-module", _torch_save_module, "422 unsafe-model",
          "torch.save of an nn.Module: loading it needs unpickling classes", **PT),
    model("zip-pickle-as-torch-save", _zip_pickle, "422 unsafe-model",
          "a zip laid out like torch.save whose data.pkl is a __reduce__ payload",
          marker="pwned-zip-pickle", **PT),
    model("torch-save-with-payload", _torch_save_payload, "422 unsafe-model",
          "a real torch.save state dict carrying one object with a __reduce__ payload",
          marker="pwned-torch-save", **PT),
    model("safetensors-header-longer-than-file",
          lambda tmp: raw_safetensors(b'{"w": {}}', declared=1 << 40), "422 unsafe-model",
          "the u64 header length is 1 TiB in a 33-byte file: not read as safetensors at all"),
    model("safetensors-header-not-json",
          lambda tmp: raw_safetensors(b"{this is not json, \xff\xfe}"), "422 model-mismatch",
          "a header that opens like JSON and is neither JSON nor UTF-8"),
    model("safetensors-offsets-out-of-range", _st_entries(w=("F32", [4], [0, 1 << 30])),
          "422 model-mismatch", "data_offsets point 1 GiB past the end of the file"),
    model("safetensors-overlapping-offsets",
          _st_entries(a=("F32", [4], [0, 16]), b=("F32", [4], [0, 16])),
          "422 model-mismatch", "two tensors share the same bytes"),
    model("safetensors-huge-shape", _huge_shape, "422 model-mismatch",
          "a shape of 2^93 elements declared over 16 bytes of data"),
    model("safetensors-non-numeric-dtype", _st_entries(w=("BOOL", [16], [0, 16])),
          "422 model-mismatch", "a bool tensor where weights must be floats or integers"),
    model("nan-weights", _weights(float("nan")), "422 model-mismatch",
          "small_cnn safetensors with a NaN in every weight tensor: no job could use it"),
    model("inf-weights", _weights(float("inf")), "422 model-mismatch",
          "small_cnn safetensors with +inf in every weight tensor"),
    model("huge-finite-weights", _weights(3e38), "201",
          "every weight 3e38: finite, loads, maps an input to [1, 4]; accepted at upload, "
          "a job on it fails as training-diverged"),
    model("state-dict-wrong-shapes", _wrong_shapes, "422 model-mismatch",
          "a weights-only torch.save of a 10-class small_cnn under a 4-class spec", **PT),
    model("truncated-safetensors", lambda tmp: half(valid_model()), "422 model-mismatch",
          "the first half of a valid safetensors file"),
    model("truncated-torch-save", lambda tmp: half(torch_save(small_cnn_state())),
          "422 model-mismatch", "the first half of a torch.save file (no central directory)",
          **PT),
    model("truncated-torchscript", _truncated_torchscript, "422 model-mismatch",
          "the first half of a valid TorchScript archive", **TS),
    model("empty-model", lambda tmp: b"", "422 model-mismatch", "a zero-byte file"),
    model("torchscript-writes-host-file", _file_writer, "422 forbidden-operator",
          "forward() maps a host file with aten::from_file(shared=True) and writes it",
          marker="pwned-from-file", **TS),
    model("torchscript-setstate-writes-host-file", _setstate_writer, "422 forbidden-operator",
          "__setstate__ (run by torch.jit.load) writes a host file through aten::from_file",
          marker="pwned-setstate", **TS),
    model("torchscript-reads-host-file", _file_reader, "422 forbidden-operator",
          "forward() copies a host credentials file into a buffer through aten::from_file",
          secret=True, **TS),
    model("torchscript-loops-forever", lambda tmp: scripted(_forever_looper),
          "422 resource-limit",
          "forward() never returns (the loop stays in C++): killed at the validation bound",
          **TS),
    model("torchscript-allocates-1gib", lambda tmp: scripted(_allocator), "422 resource-limit",
          "forward() allocates 1 GiB: over the validation child's memory bound", **TS),
    model("spec-invalid-json", _valid_model, "422 invalid-spec",
          "a spec field that is not JSON", spec='{"arch": "small_cnn", num_classes: 4'),
    model("spec-deeply-nested", _valid_model, "422 invalid-spec",
          "a 7,000-deep JSON array (14 KB) as the spec: the decoder's recursion limit "
          "must not make it a 500", spec="[" * 7000 + "]" * 7000),
    model("spec-oversized", _valid_model, "422 invalid-spec",
          "a 40 KB spec (valid JSON, one long string): over the spec's own bound",
          spec=json.dumps({**SPEC, "note": "x" * 40_000})),
    model("giant-text-field", _valid_model, "413 payload-too-large",
          "a 4 MiB spec field: refused while it streams, never buffered whole",
          spec=json.dumps({**SPEC, "note": "x" * (4 * MIB)})),
]


# --------------------------------------------------------------------------- dataset files


def _zip_bomb(tmp: Path) -> bytes:
    return zip_bytes(image_folder([("c0/bomb.png", bytes(48 * MIB))]))


def _tar_gz_bomb(tmp: Path) -> bytes:
    return folder_tar([(tar_member("c0/bomb.png"), bytes(48 * MIB))])


def _nested_zip(tmp: Path) -> bytes:
    return zip_bytes(image_folder([("c1/inner.zip", zip_bytes(image_folder()))]))


def _overlapping_zip(tmp: Path) -> bytes:
    """2,000 central-directory entries, all pointing at one stored 40 KB member."""
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes()
    data = png(64, 64, rgb=True, body=zlib.compress(noise, 0))
    crc, size = zlib.crc32(data), len(data)
    first = b"c0/0.png"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, size, size, len(first), 0)
    body = local + first + data
    central = b""
    count = 2000
    for i in range(count):
        name = f"c{i % 2}/{i}.png".encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, crc, size,
                               size, len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), len(body), 0)
    return body + central + end


def _png_bomb(tmp: Path) -> bytes:
    # 100,000 x 100,000 gray pixels (10 GB decoded) declared by a ~1 KB PNG
    bomb = png(100_000, 100_000, body=zlib.compress(bytes(MIB), 9))
    return zip_bytes(image_folder([("c1/bomb.png", bomb)]))


def _pixel_flood(tmp: Path) -> bytes:
    black = png(1024, 1024, rgb=True)  # 3 MiB decoded, ~3 KB encoded
    return zip_bytes((f"c{i % 3}/{i}.png", black) for i in range(300))


def _many_members() -> Iterable[tuple[str, bytes]]:
    """99,999 tiny images, then one non-image member: every member has to be looked at."""
    tiny = png(1, 1)
    for i in range(MANY_MEMBERS - 1):
        yield f"c{i % 2}/{i}.png", tiny
    yield "c1/readme.txt", b"not an image\n"


def _many_zip(tmp: Path) -> bytes:
    return zip_bytes(_many_members(), compression=zipfile.ZIP_STORED)


def _many_tar_gz(tmp: Path) -> bytes:
    return tar_bytes((tar_member(name), data) for name, data in _many_members())


def _zip_symlink(tmp: Path) -> bytes:
    link = zipfile.ZipInfo("c1/link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_bytes(image_folder([(link, b"/etc/passwd")]))


def _object_npz(tmp: Path) -> bytes:
    x = np.empty(2, dtype=object)
    x[0] = Payload(tmp / "pwned-npz")
    x[1] = Payload(tmp / "pwned-npz")
    return npz(x=x, y=np.array([0, 1]))


def _npz_members(x: bytes, y: bytes) -> bytes:
    return zip_bytes([("x.npy", x), ("y.npy", y)], compression=zipfile.ZIP_STORED)


def _labels(values: list[int]) -> Callable[[Path], bytes]:
    def build(tmp: Path) -> bytes:
        x = np.zeros((len(values), 16, 16, 1), dtype=np.uint8)
        return npz(x=x, y=np.array(values, dtype=np.int64))

    return build


def _nan_images(tmp: Path) -> bytes:
    x = np.full((4, 16, 16, 1), np.nan, dtype=np.float32)
    return npz(x=x, y=np.arange(4, dtype=np.int64))


def _traversal(tmp: Path) -> bytes:
    return zip_bytes(image_folder([("../escape.png", png(16, 16))]))


def _special_tar(name: str, kind: bytes, linkname: str = "") -> Callable[[Path], bytes]:
    """The valid image folder plus one member of type ``kind`` (a link, FIFO, device, ...)."""
    data = None if kind != tarfile.REGTYPE else png(16, 16)
    return lambda tmp: folder_tar([(tar_member(name, kind=kind, linkname=linkname), data)])


def _huge_npz_header(tmp: Path) -> bytes:
    return _npz_members(npy_header_only((10**12, 16, 16, 1)), npy(np.zeros(4, np.int64)))


def _short_npz(tmp: Path) -> bytes:
    return _npz_members(npy_header_only((1000, 16, 16, 1)), npy(np.zeros(1000, np.int64)))


def _too_many_images(tmp: Path) -> bytes:
    n = 1_100_000
    return npz(x=np.zeros((n, 1, 1, 1), np.uint8), y=np.zeros(n, np.int64))


def _truncated_png(tmp: Path) -> bytes:
    return zip_bytes(image_folder([("c1/cut.png", half(png(16, 16, rgb=True)))]))


ZIP = {"filename": "data.zip"}
TGZ = {"filename": "data.tar.gz"}
NPZ = {"filename": "data.npz"}

DATASET_CASES: list[Case] = [
    dataset("zip-bomb", _zip_bomb, "422 unsafe-archive",
            "a 48 MiB member of zeros deflated to ~50 KB (ratio ~1000)", **ZIP),
    dataset("tar-gz-bomb", _tar_gz_bomb, "422 unsafe-archive",
            "the same 48 MiB of zeros as a tar.gz member", **TGZ),
    dataset("nested-zip", _nested_zip, "422 unsafe-archive",
            "a zip inside the image folder: archives are never opened recursively", **ZIP),
    dataset("overlapping-entries-zip", _overlapping_zip, "422 unsafe-archive",
            "2,000 central-directory entries share one member's bytes (80 MB in 150 KB)", **ZIP),
    dataset("png-decompression-bomb", _png_bomb, "422 unsafe-archive",
            "a ~1 KB PNG declaring 100,000 x 100,000 pixels", **ZIP),
    dataset("pixel-flood", _pixel_flood, "413 payload-too-large",
            "300 black 1024x1024 RGB PNGs: ~900 MiB decoded from ~60 KB", **ZIP),
    dataset("many-members-zip", _many_zip, "422 unsafe-archive",
            "100,000 members (tiny images, one text file last): bounded memory, maps, fds",
            **ZIP),
    dataset("many-members-tar-gz", _many_tar_gz, "422 unsafe-archive",
            "the same 100,000 members in a tar.gz of about a MB", **TGZ),
    dataset("zip-path-traversal", _traversal, "422 unsafe-archive",
            "a member named ../escape.png", **ZIP),
    dataset("tar-absolute-path", _special_tar("/tmp/cleanroom-escape.png", tarfile.REGTYPE),
            "422 unsafe-archive", "a member with an absolute path", **TGZ),
    dataset("tar-symlink", _special_tar("c1/link.png", tarfile.SYMTYPE, "/etc/passwd"),
            "422 unsafe-archive", "a symbolic link to /etc/passwd named like an image", **TGZ),
    dataset("tar-hardlink", _special_tar("c1/hard.png", tarfile.LNKTYPE, "c0/0.png"),
            "422 unsafe-archive", "a hard link member", **TGZ),
    dataset("tar-fifo", _special_tar("c1/pipe.png", tarfile.FIFOTYPE),
            "422 unsafe-archive", "a FIFO member (a reader would block on it)", **TGZ),
    dataset("tar-char-device", _special_tar("c1/zero.png", tarfile.CHRTYPE),
            "422 unsafe-archive", "a character-device member", **TGZ),
    dataset("zip-symlink", _zip_symlink, "422 unsafe-archive",
            "a zip member whose mode says symbolic link", **ZIP),
    dataset("npz-object-array", _object_npz, "422 invalid-dataset",
            "x is an object array whose elements have a __reduce__ payload",
            marker="pwned-npz", **NPZ),
    dataset("npz-huge-declared-shape", _huge_npz_header, "422 invalid-dataset",
            "x's .npy header declares 10^12 images (256 TB) over 64 bytes: refused from the "
            "header, before anything is allocated", **NPZ),
    dataset("npz-too-many-images", _too_many_images, "413 payload-too-large",
            "1.1 million 1x1 images (10 MB): over the sample bound", **NPZ),
    dataset("npz-declared-shape-exceeds-data", _short_npz, "422 invalid-dataset",
            "x declares 1,000 images and holds 64 bytes", **NPZ),
    dataset("npz-labels-out-of-range", _labels([0, 1, 2, 1 << 40]), "422 invalid-dataset",
            "a label of 2^40", **NPZ),
    dataset("npz-negative-labels", _labels([0, 1, -7, 2]), "422 invalid-dataset",
            "a label of -7", **NPZ),
    dataset("npz-nan-images", _nan_images, "422 invalid-dataset",
            "float images that are all NaN", **NPZ),
    dataset("truncated-npz", lambda tmp: half(valid_npz(64)), "422 invalid-dataset",
            "the first half of a valid NPZ", **NPZ),
    dataset("truncated-zip", lambda tmp: half(zip_bytes(image_folder())),
            "422 invalid-dataset|unsafe-archive", "the first half of an image-folder zip", **ZIP),
    dataset("truncated-tar-gz", lambda tmp: half(folder_tar([])),
            "422 invalid-dataset|unsafe-archive", "the first half of an image-folder tar.gz",
            **TGZ),
    dataset("truncated-png", _truncated_png, "422 invalid-dataset",
            "an image cut in the middle of its data", **ZIP),
    dataset("empty-dataset", lambda tmp: b"", "422 invalid-dataset", "a zero-byte file"),
    dataset("many-form-parts", lambda tmp: valid_npz(), "400 malformed-multipart",
            "40 extra form fields besides file and role", fields={"note": ["x"] * 40}, **NPZ),
]

CASES: list[Case] = MODEL_CASES + DATASET_CASES
BY_NAME: dict[str, Case] = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"
