"""What ``POST /hooks/<source>`` does, whichever HTTP server runs it: verify the delivery with
its source adapter, store it (committed before any answer), and say what to answer."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

from modelcd.context import Context
from modelcd.sources.base import Accepted, HookRequest, Respond, Source, get_source

# Sources whose ``receive`` may wait on the network (SNS certificate fetches, subscription
# confirmations): an event loop runs them on a thread.
MAY_BLOCK = frozenset({"sagemaker"})


class Intake:
    """Verify and store webhook deliveries; adapters are built once per source."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._adapters: dict[str, Source] = {}
        self._lock = threading.Lock()

    def adapter(self, source: str) -> Source:
        """The adapter of ``source``; NotFound (listing the known ones) for an unknown name."""
        adapter = self._adapters.get(source)
        if adapter is None:
            adapter = get_source(source, self.ctx.settings)
            with self._lock:
                adapter = self._adapters.setdefault(source, adapter)
        return adapter

    def verify(self, source: str, method: str, headers: Mapping[str, str], query: Mapping[str, str], body: bytes,
               now: float) -> Accepted | Respond:
        """Authenticate a delivery (raises the source's ModelcdError when it is refused)."""
        return self.adapter(source).receive(HookRequest(method=method, headers=headers, query=query, body=body), now)

    def store(self, source: str, accepted: Accepted, body: bytes) -> Future[bool]:
        """Store an authentic delivery: True once committed, False for a duplicate."""
        return self.ctx.inbox.submit(source, accepted.delivery_id, dict(accepted.kept_headers), body)

    async def store_async(self, source: str, accepted: Accepted, body: bytes) -> bool:
        """``store`` awaited on an event loop."""
        return await self.ctx.inbox.submit_async(source, accepted.delivery_id, dict(accepted.kept_headers), body)

    def stored(self, new: bool) -> None:
        """After the commit: a new delivery wakes the inbox worker."""
        if new:
            self.ctx.inbox_wake.set()

    @staticmethod
    def acknowledgement(accepted: Accepted, new: bool) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of the answer to a stored delivery."""
        return (202 if new else 200), {"status": "accepted" if new else "duplicate",
                                       "delivery_id": accepted.delivery_id}
