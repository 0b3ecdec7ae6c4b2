"""`modelcd serve`'s side of the inbox worker process (``modelcd.worker``): start it, wake it
when deliveries are stored, wake the release runner when it reports outbox work, restart it if
it dies, and stop it with the service."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time

from modelcd.context import Context

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0


class WorkerProcess:
    """One ``python -m modelcd.worker --channel`` child of this process."""

    def __init__(self, ctx: Context, nice: int = 10) -> None:
        self.ctx = ctx
        self.nice = nice
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = threading.Event()
        self.restarts = 0
        self._lock = threading.Lock()
        self._waker = threading.Thread(target=self._wake_loop, name="inbox-wake", daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="inbox-worker-watch", daemon=True)

    def start(self) -> WorkerProcess:
        self._spawn()
        self._waker.start()
        self._watcher.start()
        return self

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "modelcd.worker", "--channel", "--parent", str(os.getpid()),
               "--nice", str(self.nice)]
        env = {**os.environ, "MODELCD_HOME": str(self.ctx.settings.home)}
        if self.ctx.settings.database_url:
            env["MODELCD_DATABASE_URL"] = self.ctx.settings.database_url
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, env=env)
        assert proc.stdin is not None
        os.set_blocking(proc.stdin.fileno(), False)
        with self._lock:
            self.proc = proc
        self.wake()  # deliveries stored while no worker ran

    def wake(self) -> None:
        """Tell the worker that new deliveries are due (never blocks)."""
        with self._lock:
            proc = self.proc
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ValueError, OSError):
            os.write(proc.stdin.fileno(), b"w")

    def _wake_loop(self) -> None:
        wake = self.ctx.inbox_wake
        while not self.stopped.is_set():
            if wake.wait(0.5):
                wake.clear()
                self.wake()

    def _watch_loop(self) -> None:
        while not self.stopped.is_set():
            proc = self.proc
            if proc is not None and proc.stdout is not None:
                while os.read(proc.stdout.fileno(), 4096):  # a notice: the outbox made releases
                    self.ctx.wake.set()
                code = proc.wait()
                if self.stopped.is_set():
                    return
                for pipe in (proc.stdin, proc.stdout):
                    with contextlib.suppress(OSError):
                        pipe.close()
                log.warning("inbox worker exited with %s; restarting it", code)
            time.sleep(RESTART_DELAY_S)
            if self.stopped.is_set():
                return
            self.restarts += 1
            try:
                self._spawn()
            except OSError as e:
                log.error("cannot start the inbox worker (retrying): %s", e)
                with self._lock:
                    self.proc = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close its wake pipe (it finishes the delivery in hand and exits); kill it if it lingers."""
        self.stopped.set()
        with self._lock:
            proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
