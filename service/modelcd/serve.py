"""``modelcd serve``: the control plane — API and webhook intake (uvicorn: hooks answered on
the event loop, the rest by Flask on threads), outbox dispatcher, local runner, the supervisor
of the data plane (router process, deployments), and the inbox worker process it starts."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO

import uvicorn

from modelcd.app import create_app
from modelcd.app.asgi import ControlPlaneASGI
from modelcd.app.http_limits import HEADER_TIMEOUT_S, limited_protocol
from modelcd.auth import ensure_token
from modelcd.config import HOME_SETTINGS, Settings
from modelcd.context import Context, build_context
from modelcd.domain import DeploymentState
from modelcd.errors import ConfigError
from modelcd.fsutil import clean_temporaries
from modelcd.lifecycle import stop_data_plane
from modelcd.releases.deployments import runner_started
from modelcd.releases.external import ExternalDriver
from modelcd.releases.idle import IdleSleeper, write_wake_file
from modelcd.releases.reconcile import reconcile
from modelcd.releases.runner import LocalRunner
from modelcd.releases.watch import ProductionWatch

log = logging.getLogger("modelcd.serve")
SERVE_LOCK = "serve.lock"


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"MODELCD_PORT: port {port} on {host} is already in use (another `modelcd "
                                  "serve`?); stop it or choose another port with --port / MODELCD_PORT",
                                  field="port") from e
            raise ConfigError(f"MODELCD_HOST: cannot listen on {host}:{port}: {e.strerror}", field="host") from e


def make_home_private(home: Path) -> None:
    """Everything this process (and its children: worker, router, deployments) creates is for
    its user only (umask 077); the home folder and the files an older version may have left
    readable are tightened (folder 0700, database, token and settings 0600)."""
    os.umask(0o077)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    for name in ("modelcd.db", "modelcd.db-wal", "modelcd.db-shm", "modelcd.db-writer.lock", "token",
                 HOME_SETTINGS):
        path = home / name
        if path.is_file():
            os.chmod(path, 0o600)


def hold_serve_lock(home: Path) -> IO[bytes]:
    """A shared lock on ``$MODELCD_HOME/serve.lock`` for as long as the returned file stays
    open (this process; not its children): `modelcd shutdown` sees that a service works here."""
    f = open(home / SERVE_LOCK, "a+b")  # noqa: SIM115 - kept open on purpose
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    return f


class Supervisor(threading.Thread):
    """Keeps the data plane up: restarts a dead router; re-adopts or restarts deployments."""

    def __init__(self, ctx: Context, every_s: float = 1.0, reconcile_every: int = 10) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.ctx = ctx
        self.every_s = every_s
        self.reconcile_every = reconcile_every
        self.stopped = threading.Event()
        self.pause_requested = threading.Event()  # `modelcd shutdown`: leave the data plane down
        self.parked = threading.Event()  # set by this thread once paused: no tick runs any more

    def run(self) -> None:
        ticks = 0
        while not self.stopped.wait(self.every_s):
            ticks += 1
            if self._parked():
                continue
            try:
                if self.ctx.router.supervise():
                    log.warning("router was down; restarted it")
                if ticks % self.reconcile_every == 0 or self._deployment_exited():
                    reconcile(self.ctx, log.warning)
            except Exception:
                log.exception("supervisor")

    def _parked(self) -> bool:
        if self.pause_requested.is_set():
            self.parked.set()
        return self.parked.is_set()

    def stop_data_plane(self) -> list[str]:
        """Stop the router and every deployment, and supervise neither again until the service
        restarts (waits for a tick in progress first, so nothing is restarted behind us)."""
        self.pause_requested.set()
        if self.is_alive():
            self.parked.wait(60)
        return list(stop_data_plane(self.ctx.settings))

    def _deployment_exited(self) -> bool:
        """A serving or standby deployment whose process is gone: restart it now, not at the
        next reconcile tick (the router already sends its traffic to the others meanwhile)."""
        for d in self.ctx.deployments.list(live_only=True):
            if d.state in (DeploymentState.SERVING, DeploymentState.STANDBY) and not runner_started(d) \
                    and not d.sleeping and self.ctx.target(d.target).exited(d):
                log.warning("deployment %s (%s v%s, pid %s) exited; starting it again", d.id, d.model, d.version,
                            d.pid)
                return True
        return False


def serve(settings: Settings, echo: Callable[[str], None] = print) -> None:
    """Run until SIGTERM/SIGINT. The data plane keeps running after this returns."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    make_home_private(settings.home)
    _check_port(settings.host, settings.port)
    serve_lock = hold_serve_lock(settings.home)  # noqa: F841 - held (shared) until this process ends
    token, created = ensure_token(settings)
    for path in clean_temporaries(settings.home):  # what an interrupted upload or build left behind
        echo(f"removed a leftover temporary: {path}")
    ctx = build_context(settings)
    ctx.redact.add(token)
    if created:
        echo(f"API token (shown once; also in {settings.home / 'token'}, mode 0600): {token}")
    report = reconcile(ctx, echo)
    echo(f"data plane: router {settings.router_url} (generation synced: {report.router_synced}); "
         f"deployments adopted {len(report.adopted)}, restarted {len(report.restarted)}, failed {len(report.failed)}")
    from modelcd.releases.retirement import resume_interrupted

    resume_interrupted(ctx, echo)  # a retire / archive job a dead process left running
    from modelcd.jobs.statistics import fail_interrupted

    fail_interrupted(ctx, echo)  # statistics jobs a dead process left open: their upload is gone
    from modelcd.jobs.evaluation import fail_interrupted as fail_interrupted_evaluations

    fail_interrupted_evaluations(ctx, echo)  # evaluate jobs a dead process left open: nothing was stored
    from modelcd.jobs.images import fail_interrupted as fail_interrupted_prunes

    fail_interrupted_prunes(ctx, echo)  # image prunes a dead process left running
    from modelcd.batch.scheduler import BatchScheduler
    from modelcd.batch.scheduler import fail_interrupted as fail_interrupted_batch

    fail_interrupted_batch(ctx, echo)  # batch runs a dead process left running: no output was committed
    batch_scheduler = BatchScheduler(ctx).start()  # durable schedules: claims due occurrences, runs batch jobs
    # pipelines' releases are started and watched; watched endpoints' live traffic judged
    wake_secret = write_wake_file(ctx.router, settings.host, settings.port)  # the router's way to wake a sleeper
    if wake_secret:
        ctx.redact.add(wake_secret)
    # idle deployments of policies with `idle` sleep (releases.idle)
    runner = LocalRunner(ctx, also=[ExternalDriver(ctx).tick, ProductionWatch(ctx).tick, IdleSleeper(ctx).tick])
    runner.start()
    supervisor = Supervisor(ctx)
    supervisor.start()
    from modelcd.inbox.supervise import WorkerProcess

    inbox_worker = WorkerProcess(ctx).start()
    from modelcd.inbox.pollers import MlflowPoller, S3Poller

    pollers = [cls(ctx) for cls, interval in ((MlflowPoller, settings.mlflow_poll_interval_s),
                                              (S3Poller, settings.s3_poll_interval_s)) if interval > 0]
    for poller in pollers:
        poller.start()

    ctx.inbox.start_group_commit()
    flask_app = create_app(ctx, token)
    flask_app.extensions["modelcd_data_plane_stop"] = supervisor.stop_data_plane  # POST /api/v1/data-plane/stop
    from modelcd.app import wake

    flask_app.register_blueprint(wake.bp)  # POST /-/wake/<id>: the router wakes a sleeping deployment
    app = ControlPlaneASGI(flask_app)
    server = http_server(app, settings.host, settings.port, settings.http_header_timeout_s)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    echo(f"modelcd serving on http://{settings.host}:{settings.port} (home {settings.home.resolve()})")
    echo("API reads need no token (MODELCD_OPEN_READS=" + settings.open_reads + "); writes need one"
         if settings.reads_open else
         "API reads and writes need a token (MODELCD_OPEN_READS=" + settings.open_reads + ")")
    sys.stdout.flush()
    try:
        server.run()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        supervisor.stopped.set()
        for poller in pollers:
            poller.stopped.set()
        runner.stop()
        batch_scheduler.stop()
        app.close()
        ctx.inbox.stop_group_commit()
        inbox_worker.stop()
        echo("modelcd control plane stopped; the router and deployments keep serving")


def http_server(app: ControlPlaneASGI, host: str, port: int,
                header_timeout_s: float = HEADER_TIMEOUT_S) -> uvicorn.Server:
    """uvicorn (httptools with request line, header and header-time limits; uvloop where
    installed) serving ``app``; ``run()`` blocks until a signal. Access logs off: the API
    counts requests in /metrics."""
    config = uvicorn.Config(app, host=host, port=port, http=limited_protocol(header_timeout_s), loop="auto",
                            lifespan="off", ws="none",
                            access_log=False, log_config=None, log_level="warning", server_header=False,
                            proxy_headers=False, timeout_keep_alive=30, timeout_graceful_shutdown=10, backlog=2048)
    return uvicorn.Server(config)
