"""The settings of one router process (``Options``), all from its command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OPEN_SETTING = "MODELCD_ROUTER_ALLOW_OPEN_ENDPOINTS"
MIRROR_WORKER_PRIORITIES = ("idle", "low", "normal")  # ``Options.mirror_worker_priority``


@dataclass(frozen=True)
class Options:
    """Settings of one router process (all from the command line)."""

    table: Path
    host: str = "127.0.0.1"
    port: int = 8700
    max_body: int = 64 * 1024 * 1024  # larger request bodies get 413
    connect_timeout: float = 5.0
    upstream_timeout: float = 300.0  # whole request to a backend; then 504
    client_idle_timeout: float = 75.0  # idle keep-alive client connections are closed after this
    upstream_idle_timeout: float = 4.0  # below common backend keep-alive timeouts (uvicorn: 5 s)
    poll_interval: float = 0.5  # how often the table file's identity is checked
    drain_timeout: float = 30.0  # SIGTERM waits this long for in-flight requests
    max_idle_per_backend: int = 64
    # Request heads are bounded so a hostile client cannot make the router grow or stall.
    max_request_line: int = 8 * 1024  # bytes of URL; longer gets 414
    max_header_bytes: int = 32 * 1024  # all header lines together; more gets 431
    max_headers: int = 100  # header lines; more gets 431
    header_timeout: float = 10.0  # a request head (or a new connection's first) not complete by then gets 408
    backend_down_time: float = 1.0  # a backend that refused a connection is skipped this long (passive health)
    mirror_pending: int = 64  # shadow copies in progress per endpoint; more wait (in the mirror worker)
    mirror_backlog: int = 512  # shadow copies waiting per endpoint (a batch brings many at once); more are dropped
    mirror_pairs: int = 20_000  # pairs of answers kept per endpoint for the control plane
    mirror_timeout: float = 10.0  # a candidate's answer to a copy, at most; then the copy counts as failed
    mirror_body_cap: int = 256 * 1024  # request or answer bodies larger than this are not kept (pair truncated)
    mirror_handoff_bytes: int = 8 * 1024 * 1024  # copies' bytes not yet taken by the mirror worker; more: dropped
    mirror_worker_timeout: float = 10.0  # the mirror worker answers within this, or it is killed and restarted
    # The mirror worker's scheduling priority: "idle" (SCHED_IDLE: only CPU time serving does not
    # want), "low" (nice 5) or "normal". Copies it has no time for are dropped and counted.
    mirror_worker_priority: str = "idle"
    allow_open_endpoints: bool = False  # serve auth "none" endpoints even when exposed (see ``exposed``)
    # Whether clients beyond this machine can reach the router; None: computed from ``host``.
    # Exposed routers refuse open endpoints unless allowed. Set it for a loopback listener
    # that is reachable from outside anyway (a port forward), and in tests.
    exposed: bool | None = None
