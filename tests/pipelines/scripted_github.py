"""A GitHub Actions REST stand-in on 127.0.0.1 that never runs anything: it answers workflow
dispatches with scripted statuses (then 200 and a run id, as the documented
``return_run_details`` answer) and runs and their jobs with a state the test sets."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.conftest import wait_until


class ScriptedGitHub:
    """Answers dispatches with scripted statuses (then 200 + a run id) and runs with a state."""

    def __init__(self) -> None:
        self.dispatch_statuses: list[int] = []  # consumed one per dispatch; empty: 200
        self.dispatches: list[dict[str, Any]] = []
        self.run_state: dict[int, tuple[str, str | None]] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                status = stub.dispatch_statuses.pop(0) if stub.dispatch_statuses else 200
                stub.dispatches.append({"status": status, "inputs": body.get("inputs", {}),
                                        "auth": self.headers.get("Authorization")})
                if status != 200:
                    self._reply(status, {"message": {401: "Bad credentials"}.get(status, "Server Error")})
                    return
                run_id = len(stub.dispatches)
                stub.run_state[run_id] = ("in_progress", None)
                self._reply(200, {"workflow_run_id": run_id, "run_url": "", "html_url": f"https://gh/{run_id}"})

            def do_GET(self) -> None:
                jobs = re.search(r"/actions/runs/(\d+)/jobs", self.path)
                if jobs:
                    state = stub.run_state.get(int(jobs.group(1)), ("queued", None))
                    self._reply(200, {"total_count": 1, "jobs": [{"id": 1, "name": "build", "status": state[0],
                                                                   "conclusion": state[1], "html_url": ""}]})
                    return
                match = re.search(r"/actions/runs/(\d+)$", self.path)
                state = stub.run_state.get(int(match.group(1))) if match else None
                if state is None:
                    self._reply(404, {"message": "Not Found"})
                    return
                self._reply(200, {"id": int(match.group(1)), "status": state[0], "conclusion": state[1],
                                  "html_url": "https://gh/run", "display_title": "t", "created_at": None})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token_of(self, release_id: str) -> str:
        """The per-release token a dispatch of ``release_id`` carried in its inputs."""
        found = wait_until(lambda: next((d for d in self.dispatches if d["inputs"].get("release_id") == release_id),
                                        None), timeout_s=30)
        return str(found["inputs"]["release_token"])
