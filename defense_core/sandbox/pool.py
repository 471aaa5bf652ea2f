"""Contained children: one started interpreter and its pipes, and the pool that keeps warm spares.

A child is a fresh interpreter started with ``subprocess`` (fork + exec:
nothing of this process's memory, connections or open files carries over;
``close_fds``) whose environment is :func:`~defense_core.sandbox.limits.child_env`.
It talks back through a dedicated pipe, one JSON event per line, read by a
thread that bounds every line; the tail of what it prints is kept for error
messages.

A :class:`ChildPool` keeps one warm spare (torch already imported) so a
validation costs a fraction of a second instead of an interpreter start;
each child still serves exactly one request.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from defense_core.sandbox.limits import ChildFailed, child_env

MAX_EVENT_BYTES = 8 << 20
MAX_OUTPUT_LINES = 40
MAX_OUTPUT_LINE_CHARS = 500
_BOOT = (
    "import sys; sys.path.insert(0, {root!r}); from defense_core.sandbox.child import main; main()"
)


class ChildProcess:
    """A started child: its process, its event pipe, and the tail of what it printed."""

    def __init__(self, threads: int) -> None:
        import defense_core

        root = str(Path(defense_core.__file__).resolve().parent.parent)
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-B",
                    "-c",
                    _BOOT.format(root=root),
                    str(write_fd),
                    str(os.getpid()),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                env=child_env(threads),
                cwd="/",
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.threads = threads
        self.started = time.monotonic()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=256)
        self.output: deque[str] = deque(maxlen=MAX_OUTPUT_LINES)
        self._events_file = os.fdopen(read_fd, "rb")
        threading.Thread(
            target=self._read_events, name=f"sandbox-events-{self.proc.pid}", daemon=True
        ).start()
        threading.Thread(
            target=self._read_output, name=f"sandbox-output-{self.proc.pid}", daemon=True
        ).start()

    def _read_events(self) -> None:
        reader = self._events_file
        try:
            while True:
                line = reader.readline(MAX_EVENT_BYTES + 1)
                if not line:
                    break
                if len(line) > MAX_EVENT_BYTES or not line.endswith(b"\n"):
                    self.events.put({"event": "protocol", "message": "an event line is too long"})
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    self.events.put({"event": "protocol", "message": "an event is not JSON"})
                    break
                if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                    self.events.put({"event": "protocol", "message": "an event is not an object"})
                    break
                self.events.put(event)
        except (OSError, ValueError):
            pass
        finally:
            self.events.put(None)  # end of stream
            reader.close()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                self.output.append(raw[:MAX_OUTPUT_LINE_CHARS].decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_request(self, request: Mapping[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            raise ChildFailed(
                f"the contained child ended before it took its request ({self.describe_exit()})"
            ) from None

    def rss_bytes(self) -> tuple[int, int]:
        """Current and peak resident memory (0 when it cannot be read)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0, 0
        values = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return values.get("VmRSS", 0), values.get("VmHWM", 0)

    def kill(self, grace_seconds: float) -> None:
        """SIGTERM, then SIGKILL after the grace period; reaps the process."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"


class ChildPool:
    """Starts children from one long-lived thread, keeping ``spares`` warm ones.

    Children are started by a dedicated thread because ``PR_SET_PDEATHSIG``
    fires when the *thread* that started a child ends: a child started by a
    short-lived request thread could be killed in the middle of its work.
    """

    def __init__(self, *, spares: int = 1, threads: int = 1) -> None:
        self.spares = max(0, spares)
        self.threads = threads
        self._requests: queue.Queue[Future[ChildProcess] | None] = queue.Queue()
        self._ready: deque[ChildProcess] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._spawn_loop, name="sandbox-spawner", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)
        self._top_up()

    def _spawn_loop(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            if not request.set_running_or_notify_cancel():
                continue
            try:
                request.set_result(ChildProcess(self.threads))
            except BaseException as exc:
                request.set_exception(exc)

    def _spawn(self) -> Future[ChildProcess]:
        future: Future[ChildProcess] = Future()
        self._requests.put(future)
        return future

    def _top_up(self) -> None:
        if self._closed or self.spares == 0:
            return

        def keep(future: Future[ChildProcess]) -> None:
            if future.exception() is None:
                with self._lock:
                    if self._closed:
                        future.result().kill(0)
                    else:
                        self._ready.append(future.result())

        with self._lock:
            missing = self.spares - len(self._ready)
        for _ in range(missing):
            self._spawn().add_done_callback(keep)

    def acquire(self, threads: int) -> ChildProcess:
        """A started child that has not served a request yet (a warm spare when one is)."""
        child = None
        with self._lock:
            while self._ready:
                candidate = self._ready.popleft()
                if candidate.alive() and candidate.threads == threads:
                    child = candidate
                    break
                candidate.kill(0)
        if child is None:
            future = self._spawn() if threads == self.threads else None
            child = future.result() if future is not None else self._spawn_with(threads)
        self._top_up()
        return child

    def _spawn_with(self, threads: int) -> ChildProcess:
        saved, self.threads = self.threads, threads
        try:
            return self._spawn().result()
        finally:
            self.threads = saved

    def close(self) -> None:
        with self._lock:
            self._closed = True
            ready, self._ready = list(self._ready), deque()
        for child in ready:
            child.kill(0)
        self._requests.put(None)


_POOLS: dict[tuple[int, int, int], ChildPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(*, spares: int = 1, threads: int = 1) -> ChildPool:
    """This process's pool for the given spare count and thread count (made on first use)."""
    key = (os.getpid(), spares, threads)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = ChildPool(spares=spares, threads=threads)
            _POOLS[key] = pool
        return pool
