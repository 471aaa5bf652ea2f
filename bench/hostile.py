"""Hostile-upload benchmark: every case of ``tests/hostile_corpus.py`` against the served API,
with the API process's memory measured per case.

1. Starts ``uvicorn api.main:app --http api.http_protocol:ProblemH11Protocol`` on a free
   loopback port with the embedded defaults under a temporary ``CLEANROOM_DATA_DIR``
   (SQLite migrated at start-up, local store) and ``MODEL_VALIDATION_TIMEOUT_S``
   (``--validation-timeout-s``, default 10).
2. Creates an organization and an API key on its database, then warms the process up
   (a valid model and a valid dataset: the engine is imported once per process).
3. Uploads each case over HTTP (httpx, a timeout on every request) while a thread samples,
   every ``--sample-ms`` (20), the RSS of the API process and, separately, of each of its
   child processes (the contained validation children and the warm spare): per case the
   API's RSS before, its peak during the request and after, and the largest child RSS seen.
4. After the corpus: ``/healthz`` and a valid upload still answer, and the API process's
   RSS, memory mappings and open descriptors are compared with those before the corpus.

Prints a markdown table and writes it to ``bench/results/hostile.md`` (``--out``) with the
machine. Stops by itself: every request has a timeout, the whole run has a deadline
(``--deadline-s``), and the server is killed at the end whatever happened.

    .venv/bin/python -m bench.hostile [--cases NAME ...] [--validation-timeout-s 10]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hostile_corpus import CASES, SECRET, Case, valid_model, valid_npz  # noqa: E402

MIB = 1 << 20
SPEC_TEXT = '{"arch": "small_cnn", "num_classes": 4, "in_channels": 1, "input_size": [16, 16], ' \
    '"mean": [0.5], "std": [0.25]}'


@dataclass(frozen=True)
class Row:
    case: Case
    status: int
    type: str
    seconds: float
    rss_before: float  # MiB, the API process
    rss_peak: float
    rss_after: float
    child_peak: float  # MiB, the largest RSS of a child present when the request came
    child_growth: float  # MiB, the largest rise of such a child during the request
    payload_ran: bool
    leaked: bool

    @property
    def as_expected(self) -> bool:
        if self.payload_ran or self.leaked or self.status != self.case.status:
            return False
        return self.case.accepted or self.type in self.case.slugs


@dataclass(frozen=True)
class Usage:
    rss: float
    maps: int
    fds: int

    @classmethod
    def of(cls, process: psutil.Process) -> Usage:
        with open(f"/proc/{process.pid}/maps") as fh:
            maps = sum(1 for _ in fh)
        return cls(rss=process.memory_info().rss / MIB, maps=maps, fds=process.num_fds())


class Sampler:
    """Peak RSS of a process, and of the children it had when sampling began, in a thread.

    A validation runs in the warm spare that was waiting when the request came, so the
    children present at the start are the ones measured; the replacement spare started
    during the request (an interpreter importing torch) is left out.
    """

    def __init__(self, process: psutil.Process, interval_s: float) -> None:
        self.process = process
        self.interval_s = interval_s
        self.peak = 0.0
        self.child_peak = 0.0
        self.child_growth = 0.0  # the largest rise of one child over its RSS at the start
        self._children: dict[int, tuple[psutil.Process, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, self.process.memory_info().rss / MIB)
        for child, start in self._children.values():
            with contextlib.suppress(psutil.Error):
                rss = child.memory_info().rss / MIB
                self.child_peak = max(self.child_peak, rss)
                self.child_growth = max(self.child_growth, rss - start)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        with contextlib.suppress(psutil.Error):
            for child in self.process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self._children[child.pid] = (child, child.memory_info().rss / MIB)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def served_api(data_dir: Path, *, validation_timeout_s: float,
               log: Path) -> Iterator[tuple[str, int]]:
    """``(base_url, pid)`` of a uvicorn serving ``api.main:app``; killed on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLEANROOM_")}
    env.update(PYTHONUNBUFFERED="1", CLEANROOM_DATA_DIR=str(data_dir),
               CLEANROOM_MODEL_VALIDATION_TIMEOUT_S=str(validation_timeout_s))
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log",
               "--http", "api.http_protocol:ProblemH11Protocol"]
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its group: the children go with it
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited during start-up:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not answer /healthz in 90 s")
            time.sleep(0.2)
        yield base, process.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def create_key(database_url: str) -> str:
    from api.core.auth import create_api_key, create_org
    from api.core.db import make_engine, make_session_factory, session_scope

    engine = make_engine(database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            create_org(session=session, name="hostile-bench")
            _, raw = create_api_key(session=session, org_name="hostile-bench")
            return raw
    finally:
        engine.dispose()


def upload(client: httpx.Client, case: Case, content: bytes) -> httpx.Response:
    files = {"file": (case.filename, content, "application/octet-stream")}
    return client.post(case.endpoint, files=files, data=dict(case.fields))


def still_serving(client: httpx.Client) -> bool:
    health = client.get("/healthz")
    model = client.post("/v1/models", files={"file": ("ok.safetensors", valid_model())},
                        data={"spec": SPEC_TEXT})
    data = client.post("/v1/datasets", files={"file": ("ok.npz", valid_npz())},
                       data={"role": "clean"})
    return (health.status_code, model.status_code, data.status_code) == (200, 201, 201)


def settle(api: psutil.Process, *, timeout_s: float = 20.0) -> None:
    """Wait until the API's children stop changing (the replacement spare has imported torch),
    so a case's child numbers are those of its validation, not of a spare starting up."""

    def snapshot() -> dict[int, float]:
        found: dict[int, float] = {}
        with contextlib.suppress(psutil.Error):
            for child in api.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    found[child.pid] = child.memory_info().rss / MIB
        return found

    deadline = time.monotonic() + timeout_s
    previous = snapshot()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        current = snapshot()
        if current.keys() == previous.keys() and all(
                abs(current[pid] - previous[pid]) < 1.0 for pid in current):
            return
        previous = current


def run_case(client: httpx.Client, api: psutil.Process, case: Case, tmp: Path,
             sample_s: float) -> Row:
    content = case.build(tmp)
    settle(api)
    rss_before = api.memory_info().rss / MIB
    started = time.monotonic()
    with Sampler(api, sample_s) as sampler:
        try:
            response: httpx.Response | None = upload(client, case, content)
        except httpx.HTTPError:
            response = None
        seconds = time.monotonic() - started
    status, slug, leaked = 0, "(no answer)", False
    if response is not None:
        status = response.status_code
        leaked = SECRET in response.content
        slug = ""
        if response.headers.get("content-type", "").endswith("json"):
            slug = str(response.json().get("type", "")).rsplit("/", 1)[-1]
    return Row(case=case, status=status, type=slug, seconds=seconds, rss_before=rss_before,
               rss_peak=sampler.peak, rss_after=api.memory_info().rss / MIB,
               child_peak=sampler.child_peak, child_growth=sampler.child_growth,
               payload_ran=case.marker is not None and (tmp / case.marker).exists(), leaked=leaked)


def table(rows: list[Row]) -> list[str]:
    lines = ["| case | expected | status | problem type | as expected | s | API RSS before | peak "
             "| after (MiB) | child peak (MiB) | child rise (MiB) |",
             "|---|---|---:|---|:---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = "yes" if r.as_expected else "**no**"
        if r.payload_ran:
            mark += " (payload ran)"
        if r.leaked:
            mark += " (secret leaked)"
        lines.append(f"| {r.case.name} | {r.case.expected} | {r.status} | {r.type or '-'} | {mark} "
                     f"| {r.seconds:.2f} | {r.rss_before:.0f} | {r.rss_peak:.0f} "
                     f"| {r.rss_after:.0f} | {r.child_peak:.0f} | {r.child_growth:.0f} |")
    return lines


def machine() -> str:
    import torch

    from defense_core.cpu_mode import cpu_name

    memory_gib = psutil.virtual_memory().total / (1 << 30)
    return (f"{cpu_name()}, nproc {len(os.sched_getaffinity(0))}, {memory_gib:.0f} GiB, "
            f"Linux {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


@dataclass(frozen=True)
class Run:
    rows: list[Row]
    cold: Usage  # the API process right after start-up
    before: Usage  # after the warm-up, before the corpus
    after: Usage  # after the corpus and the final check
    spare_mib: float  # an idle warm spare child
    serving: bool  # /healthz and valid uploads answered after the corpus
    date: str


def run(cases: list[Case], args: argparse.Namespace) -> Run:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cleanroom-hostile-") as raw_tmp:
        tmp = Path(raw_tmp)
        data_dir = tmp / "var"
        log = tmp / "api.log"
        with served_api(data_dir, validation_timeout_s=args.validation_timeout_s,
                        log=log) as (base, pid):
            key = create_key(f"sqlite:///{data_dir / 'cleanroom.db'}")
            api = psutil.Process(pid)
            timeout = httpx.Timeout(args.request_timeout_s, connect=10.0)
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                              timeout=timeout) as client:
                cold = Usage.of(api)
                if not (still_serving(client) and still_serving(client)):
                    raise RuntimeError(f"the warm-up uploads failed:\n{log.read_text()[-2000:]}")
                settle(api)  # the spare child the warm-ups used is replaced
                before = Usage.of(api)
                spare = max((c.memory_info().rss / MIB for c in api.children(recursive=True)),
                            default=0.0)
                deadline = time.monotonic() + args.deadline_s
                for index, case in enumerate(cases):
                    if time.monotonic() > deadline:
                        print(f"deadline reached after {index} cases", file=sys.stderr)
                        break
                    case_tmp = tmp / f"case-{index}"
                    case_tmp.mkdir()
                    row = run_case(client, api, case, case_tmp, args.sample_ms / 1000)
                    rows.append(row)
                    print(f"{case.name:40s} {row.status} {row.type:24s} {row.seconds:6.2f}s "
                          f"API {row.rss_before:.0f}/{row.rss_peak:.0f}/{row.rss_after:.0f} MiB "
                          f"child {row.child_peak:.0f} (+{row.child_growth:.0f}) MiB",
                          file=sys.stderr)
                settle(api)
                serving = still_serving(client)
                after = Usage.of(api)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return Run(rows=rows, cold=cold, before=before, after=after, spare_mib=spare,
               serving=serving, date=date)


def report(result: Run, args: argparse.Namespace) -> str:
    rows, before, after = result.rows, result.before, result.after
    failed = [r.case.name for r in rows if not r.as_expected]
    peak = max(rows, key=lambda r: r.rss_peak - r.rss_before, default=None)
    lines = [
        "# Hostile uploads against the served API",
        "",
        f"{result.date}; {machine()}.",
        "",
        "Every case of `tests/hostile_corpus.py` uploaded over HTTP (httpx, loopback) to "
        "`uvicorn api.main:app --http api.http_protocol:ProblemH11Protocol` with the embedded "
        "defaults (SQLite, local store) and "
        f"`MODEL_VALIDATION_TIMEOUT_S={args.validation_timeout_s:g}`, one case after the other "
        "on the same process, after two warm-up rounds (a valid model and dataset); before "
        "each case the run waits for the API's children to settle (the replacement warm spare "
        "started by the previous validation has imported torch), so \"s\" is the time of the "
        "request alone. RSS "
        f"sampled every {args.sample_ms:g} ms: the API process before, at its peak during and "
        "after the request; \"child peak\" is the largest RSS, during the request, of the "
        "API's children present when it came (the warm spare, which idles at "
        f"{result.spare_mib:.0f} MiB with torch imported, and serves a model validation), "
        "\"child rise\" the largest rise of one of them over its RSS at the start: dataset "
        "uploads are read in the API process (rise 0), model uploads in the child. "
        "Reproduce: `.venv/bin/python -m bench.hostile` (about two minutes).",
        "",
        f"- {len(rows) - len(failed)} of {len(rows)} cases answered as expected"
        + (f"; not as expected: {', '.join(failed)}." if failed else "."),
        f"- API process over the whole corpus: RSS {before.rss:.0f} -> {after.rss:.0f} MiB, "
        f"{before.maps} -> {after.maps} memory mappings, {before.fds} -> {after.fds} open "
        f"descriptors (at start-up, before the warm-up: {result.cold.rss:.0f} MiB)."
        + (f" Largest rise during one request: {peak.rss_peak - peak.rss_before:.0f} MiB "
           f"({peak.case.name})." if peak else ""),
        "- After the corpus, /healthz and a valid model and dataset upload: "
        + ("all answered (200, 201, 201)." if result.serving else "**failed**."),
        "",
        *table(rows),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cases", nargs="*", help="case names (default: the whole corpus)")
    parser.add_argument("--validation-timeout-s", type=float, default=10.0,
                        help="MODEL_VALIDATION_TIMEOUT_S of the served API")
    parser.add_argument("--request-timeout-s", type=float, default=120.0, help="per request")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="for the whole corpus")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="RSS sampling interval")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile.md")
    args = parser.parse_args(argv)

    known = {case.name: case for case in CASES}
    unknown = [name for name in args.cases or () if name not in known]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(known)}")
    cases = [known[name] for name in args.cases] if args.cases else CASES

    result = run(cases, args)
    text = report(result, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if result.serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
