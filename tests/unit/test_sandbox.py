"""The contained child, with real processes: what it can reach, and that it dies when told."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from defense_core.errors import Cancelled
from defense_core.sandbox import ChildPool, Limits, ResourceLimitError, run_contained
from defense_core.sandbox.confine import landlock_abi
from defense_core.sandbox.limits import PASSED_ENV

LANDLOCK = landlock_abi()
needs_landlock = pytest.mark.skipif(LANDLOCK < 1, reason="this kernel offers no Landlock")


def _probe(scratch: Path, **args: object) -> dict:
    return run_contained("probe", args, scratch=scratch, limits=Limits(wall_seconds=60)).result


@needs_landlock
def test_the_child_sees_only_its_scratch_directory(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the worker's credentials")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "input.bin").write_bytes(b"model")
    outside = tmp_path / "written-outside.txt"
    result = _probe(
        scratch,
        read=[str(secret), str(scratch / "input.bin"), "/etc/passwd", f"/proc/{os.getpid()}/environ",
              str(Path.cwd() / "pyproject.toml")],
        write=[str(outside), str(scratch / "output.bin"), "/tmp/cleanroom-probe-write"],
    )
    assert result["read"][str(scratch / "input.bin")] == "ok"
    assert result["write"][str(scratch / "output.bin")] == "ok"
    for path in (str(secret), "/etc/passwd", f"/proc/{os.getpid()}/environ", str(Path.cwd() / "pyproject.toml")):
        assert result["read"][path].startswith("denied"), path
    for path in (str(outside), "/tmp/cleanroom-probe-write"):
        assert result["write"][path].startswith("denied"), path
        assert not Path(path).exists()
    assert (scratch / "output.bin").read_bytes() == b"probe\n"


def test_the_childs_environment_holds_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://cleanroom:hunter2@db/cleanroom")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("CLEANROOM_METRICS_TOKEN", "hunter2")
    result = _probe(tmp_path, env=True)
    allowed = set(PASSED_ENV) | {"PATH", "HOME", "PYTHONDONTWRITEBYTECODE", "OMP_NUM_THREADS",
                                 "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TMPDIR", "LC_CTYPE"}
    assert set(result["env"]) <= allowed, set(result["env"]) - allowed


@pytest.mark.skipif(LANDLOCK < 4, reason="Landlock network rules need ABI 4 (Linux 6.7)")
def test_the_child_cannot_connect_to_the_database_broker_or_start_programs(tmp_path: Path) -> None:
    result = _probe(tmp_path, connect=[["127.0.0.1", 5432], ["127.0.0.1", 6379]], exec=["/bin/true"])
    assert all(v.startswith("denied") for v in result["connect"].values()), result["connect"]
    assert result["exec"].startswith("denied")


def test_an_allocation_past_the_memory_bound_fails_in_the_child(tmp_path: Path) -> None:
    limits = Limits(wall_seconds=60, memory_bytes=3 << 30)
    result = run_contained("probe", {"allocate_bytes": 6 << 30}, scratch=tmp_path, limits=limits).result
    assert result["allocate"] == "denied (MemoryError)"


def _hang(tmp_path: Path, **kwargs: object) -> float:
    started = time.monotonic()
    run_contained("probe", {"hang": True, "ignore_sigterm": True}, scratch=tmp_path, **kwargs)  # type: ignore[arg-type]
    return time.monotonic() - started


def test_a_cancel_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    asked = []

    def should_stop() -> bool:
        asked.append(time.monotonic())
        return len(asked) > 20  # about two seconds in

    before = {p.pid for p in psutil.Process().children()}
    started = time.monotonic()
    with pytest.raises(Cancelled):
        _hang(tmp_path, limits=Limits(wall_seconds=600, grace_seconds=0.5), should_stop=should_stop)
    assert time.monotonic() - started < 15
    assert {p.pid for p in psutil.Process().children()} <= before  # killed and reaped


def test_the_wall_clock_bound_kills_the_child(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ResourceLimitError, match="did not finish within 3 s"):
        _hang(tmp_path, limits=Limits(wall_seconds=3, grace_seconds=0.5))
    assert time.monotonic() - started < 15


def test_the_child_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from pathlib import Path
        from defense_core.sandbox import Limits, run_contained
        run_contained("probe", {{"hang": True, "ignore_sigterm": True}}, scratch=Path({str(tmp_path)!r}),
                      limits=Limits(wall_seconds=600))
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and not children:
            children = [
                c for c in psutil.Process(parent.pid).children() if "defense_core.sandbox" in " ".join(c.cmdline())
            ]
            time.sleep(0.2)
        assert children, "the contained child did not start"
        time.sleep(1)
        parent.kill()
        parent.wait()
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        parent.kill()


def test_a_warm_spare_serves_one_request_only(tmp_path: Path) -> None:
    pool = ChildPool(spares=1)
    try:
        first = run_contained("probe", {"env": True}, scratch=tmp_path, limits=Limits(wall_seconds=60), pool=pool)
        second = run_contained("probe", {"env": True}, scratch=tmp_path, limits=Limits(wall_seconds=60), pool=pool)
        assert first.result == second.result
        assert first.confinement and second.confinement
    finally:
        pool.close()


@needs_landlock
@pytest.mark.parametrize("name", ["forward-writes", "setstate-writes", "forward-reads"])
def test_with_the_operator_check_bypassed_a_hostile_model_still_reaches_nothing(tmp_path: Path, name: str) -> None:
    """The sandbox alone, as if a hostile archive had got past the operator checks."""
    from defense_core.sandbox import ChildInputError
    from tests.hostile_models import SPEC, FileReader, FileWriter, SetStateWriter, save

    host_file = tmp_path / "host-file.bin"
    host_file.write_bytes(b"TOPSECRET" + b"\0" * 55)
    make = {"forward-writes": FileWriter, "setstate-writes": SetStateWriter, "forward-reads": FileReader}[name]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    save(make(str(host_file)), scratch / "model.bin")
    args = {"model": "model.bin", "spec": SPEC, "max_bytes": 1 << 30}

    with pytest.raises(ChildInputError) as checked:  # with the check: refused, the operator named
        run_contained("inspect_model", args, scratch=scratch, limits=Limits(wall_seconds=60))
    assert checked.value.code == "forbidden-operator" and checked.value.operator == "aten::from_file"

    try:  # without it: the model runs, and the kernel stops what it tries
        outcome = run_contained(
            "inspect_model", {**args, "operator_check": False}, scratch=scratch, limits=Limits(wall_seconds=60)
        )
        leaked = str(outcome.result)
    except Exception as exc:
        leaked = str(exc)
        assert "Permission denied" in leaked or "permission" in leaked.lower(), leaked
    assert "TOPSECRET" not in leaked and str(list(b"TOPSECRE")) not in leaked
    assert host_file.read_bytes() == b"TOPSECRET" + b"\0" * 55
