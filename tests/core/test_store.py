"""The artifact store against real backends: a folder and a SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.core.errors import NotFound, PayloadTooLarge, ServiceUnavailable
from api.core.store import (
    ArtifactStore,
    LocalStore,
    S3Store,
    StoredObject,
    artifact_key,
    make_s3_client,
    make_store,
    validate_key,
)

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
MIB = 1 << 20


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def s3_client(server: dict[str, Any]) -> Any:
    return make_s3_client(
        endpoint_url=server["endpoint_url"],
        access_key_id=server["access_key"],
        secret_access_key=server["secret_key"],
        region=server["region"],
    )


@pytest.fixture
def s3_store(s3_server: dict[str, Any]) -> S3Store:
    # Smallest legal part size, so multipart paths run with little data.
    prefix = f"store-test-{uuid.uuid4().hex[:8]}"
    return S3Store(s3_server["bucket"], prefix, s3_client(s3_server), part_size=5 * MIB)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts")
    return request.getfixturevalue("s3_store")


def leftovers(store: ArtifactStore) -> list[str]:
    """Everything the backend holds: files (temporary ones included) or objects and
    pending multipart uploads under the store's prefix."""
    if isinstance(store, LocalStore):
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert isinstance(store, S3Store)
    listing = store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix + "/")
    objects = [item["Key"] for item in listing.get("Contents", [])]
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix + "/")
    pending = [f"upload:{item['Key']}" for item in uploads.get("Uploads", [])]
    return sorted(objects + pending)


def test_known_digests(store: ArtifactStore) -> None:
    assert store.put_stream("a/abc.bin", [b"a", b"bc"]) == StoredObject(size=3, sha256=ABC_SHA256)
    assert store.put_stream("a/empty.bin", []) == StoredObject(size=0, sha256=EMPTY_SHA256)
    assert b"".join(store.iter_chunks("a/abc.bin")) == b"abc"
    assert b"".join(store.iter_chunks("a/empty.bin")) == b""
    assert store.exists("a/abc.bin") and not store.exists("a/missing.bin")


def test_multipart_roundtrip_and_download(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(11 * MIB + 123)  # three parts of 5 MiB on S3: 5 + 5 + 1
    stored = store.put_stream("m/model.safetensors", chunked(data, 777_777), max_bytes=len(data))
    assert stored == StoredObject(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    pieces = list(store.iter_chunks("m/model.safetensors", chunk_size=MIB))
    assert max(len(piece) for piece in pieces) <= MIB
    assert b"".join(pieces) == data
    target = tmp_path / "out" / "model.safetensors"
    assert store.download_to("m/model.safetensors", target) == stored
    assert target.read_bytes() == data
    assert [p.name for p in target.parent.iterdir()] == ["model.safetensors"]


def test_overwrite_replaces_content(store: ArtifactStore) -> None:
    store.put_stream("k.bin", [b"first version"])
    store.put_stream("k.bin", [b"second"])
    assert b"".join(store.iter_chunks("k.bin")) == b"second"


@pytest.mark.parametrize("size", [10, 6 * MIB])  # fails in the first part / after a part
def test_too_large_leaves_nothing_behind(store: ArtifactStore, size: int) -> None:
    limit = size - 1
    with pytest.raises(PayloadTooLarge) as raised:
        store.put_stream("big/upload.bin", chunked(b"x" * size, 64 * 1024), max_bytes=limit)
    assert raised.value.status == 413
    assert raised.value.extra == {"max_bytes": limit}
    assert not store.exists("big/upload.bin")
    assert leftovers(store) == []


def test_exactly_at_the_limit_is_accepted(store: ArtifactStore) -> None:
    assert store.put_stream("edge.bin", [b"12345"], max_bytes=5).size == 5


def test_failing_source_leaves_nothing_behind(store: ArtifactStore) -> None:
    def broken() -> Iterator[bytes]:
        yield b"y" * (6 * MIB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream("broken.bin", broken())
    assert leftovers(store) == []


def test_put_file_and_delete(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc")
    assert store.put_file("f/source.bin", source) == StoredObject(3, ABC_SHA256)
    store.delete("f/source.bin")
    store.delete("f/source.bin")  # deleting twice is fine
    assert not store.exists("f/source.bin")
    with pytest.raises(NotFound):
        store.iter_chunks("f/source.bin")


def test_ping(store: ArtifactStore) -> None:
    store.ping()


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a\\b", ".hidden", "a/", "é", "a b",
     "x" * 401],
)
def test_invalid_keys_are_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        validate_key(key)
    store = LocalStore(tmp_path / "root")
    with pytest.raises(ValueError):
        store.put_stream(key, [b"data"])
    assert leftovers(store) == []


def test_artifact_key_layout() -> None:
    org, artifact = uuid.UUID(int=1), uuid.UUID(int=2)
    assert artifact_key(org_id=org, artifact_id=artifact, suffix=".npz") == (
        f"orgs/{org}/artifacts/{artifact}.npz"
    )


def test_local_store_ping_fails_without_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    with pytest.raises(ServiceUnavailable):
        store.ping()


@pytest.mark.s3
def test_s3_ping_and_auth_failures(s3_server: dict[str, Any]) -> None:
    with pytest.raises(ServiceUnavailable):
        S3Store("no-such-bucket-here", "", s3_client(s3_server)).ping()
    wrong = dict(s3_server, secret_key="not-the-secret")
    with pytest.raises(Exception, match=r"SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        S3Store(s3_server["bucket"], "p", s3_client(wrong)).put_stream("k", [b"data"])


@pytest.mark.s3
def test_make_store_from_settings(settings_factory: Any, s3_server: dict[str, Any]) -> None:
    local = make_store(settings_factory())
    assert isinstance(local, LocalStore)
    remote = make_store(settings_factory(s3=s3_server))
    assert isinstance(remote, S3Store)
    assert remote.bucket == s3_server["bucket"] and remote.prefix.startswith("test-")
    assert remote.put_stream("x.bin", [b"abc"]).sha256 == ABC_SHA256
    assert remote.client.get_object(Bucket=remote.bucket, Key=f"{remote.prefix}/x.bin")[
        "Body"
    ].read() == b"abc"
