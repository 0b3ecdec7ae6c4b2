"""The inbox worker: drains the webhook inbox and dispatches the outbox in a process of its own,
so processing deliveries never competes with the webhook intake for one interpreter lock.

`modelcd serve` starts one (``inbox.supervise.WorkerProcess``) as ``python -m modelcd.worker
--channel --parent <pid>``: stdin wakes it (a byte per batch of new deliveries; end of file
means the service is gone, and on Linux the kernel kills it with the service as well), stdout
tells the service when the outbox produced work for its runner. Run alone (no ``--channel``)
it polls. Only one worker works a home at a time: it holds ``$MODELCD_HOME/inbox-worker.lock``
(released by the kernel however it ends), and a second one waits for it, so a worker left
over from a killed service can never process a delivery at the same time as a new one."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import event

from modelcd.config import HOME_SETTINGS, Settings, load_settings
from modelcd.context import Context, build_context
from modelcd.inbox.processor import process_due
from modelcd.releases.dispatcher import dispatch_outbox
from modelcd.sources.connect import reload_sources

log = logging.getLogger("modelcd.worker")

LOCK_NAME = "inbox-worker.lock"
POLL_S = 0.5


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        raise SystemExit(0)


class Channel:
    """The worker's end of the pipes to `modelcd serve` (stdin: wake-ups; stdout: notices)."""

    def __init__(self, wake_fd: int | None, notify_fd: int | None) -> None:
        self.wake_fd, self.notify_fd = wake_fd, notify_fd
        self.closed = False

    def wait(self, timeout_s: float) -> None:
        """Until woken or ``timeout_s``; sets ``closed`` when the service has gone."""
        if self.wake_fd is None:
            time.sleep(timeout_s)
            return
        ready, _, _ = select.select([self.wake_fd], [], [], timeout_s)
        if ready and not os.read(self.wake_fd, 4096):
            self.closed = True

    def notify(self) -> None:
        if self.notify_fd is not None:
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self.notify_fd, b"w")


@contextlib.contextmanager
def worker_lock(home: Path, channel: Channel) -> Iterator[bool]:
    """Hold the home's worker lock; yield False if the service went away while waiting for it."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_NAME, "a+b") as f:
        waited = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.warning("another inbox worker holds %s; waiting for it to finish", home / LOCK_NAME)
                    waited = True
                channel.wait(0.2)
                if channel.closed:
                    yield False
                    return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def leave_checkpoints_to_the_service(ctx: Context) -> None:
    """Commits of this process never checkpoint the WAL (the service's checkpointer does it
    outside any write lock), so a checkpoint never holds up the service's webhook intake."""
    if not ctx.db.is_sqlite:
        return

    @event.listens_for(ctx.db.engine, "connect")
    def _no_autocheckpoint(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")

    ctx.db.engine.dispose()  # connections made before this listener


class SettingsFile:
    """``$MODELCD_HOME/settings.yaml`` as last seen: ``modelcd sources connect`` rewrites it while
    this process runs, and the importer must use the new tracking URI without a restart."""

    def __init__(self, home: Path) -> None:
        self.path = home / HOME_SETTINGS
        self.seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def changed(self) -> bool:
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        return True


def drain(ctx: Context, channel: Channel, poll_s: float = POLL_S) -> None:
    """Process due deliveries and dispatch the outbox until the channel closes."""
    def dispatch() -> None:  # at once, so the service's runner rarely finds an event to dispatch itself
        if dispatch_outbox(ctx):
            channel.notify()

    saved = SettingsFile(ctx.settings.home)
    while not channel.closed:
        try:
            if saved.changed():
                reload_sources(ctx)
            processed = process_due(ctx, ctx.inbox, after_each=dispatch)
            dispatch()  # also events that others (native registrations) left
        except Exception:
            log.exception("inbox worker")
            processed = 0
        if not processed:
            channel.wait(poll_s)


def run_worker(settings: Settings, channel: Channel | None = None, nice: int = 0) -> None:
    """Work the inbox of ``settings.home`` until the channel closes (or forever, polling)."""
    channel = channel or Channel(None, None)
    if nice:
        os.nice(nice)
    with worker_lock(settings.home, channel) as locked:
        if not locked:
            return
        ctx = build_context(settings)
        if channel.wake_fd is not None:
            leave_checkpoints_to_the_service(ctx)
        try:
            drain(ctx, channel)
        finally:
            ctx.db.dispose()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m modelcd.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--channel", action="store_true", help="stdin wakes, stdout notifies (as `modelcd serve` runs it)")
    ap.add_argument("--parent", type=int, help="exit when this process (the service) ends")
    ap.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by this much")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.parent:
        die_with_parent(args.parent)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    channel = Channel(0, 1) if args.channel else None
    if channel is not None:
        os.set_blocking(1, False)
        sys.stdout = sys.stderr  # fd 1 carries notices to the service, nothing else
    try:
        run_worker(load_settings(), channel, args.nice)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
