"""What `make demo` checks before starting a local Ray head: whether one already answers on the dashboard port."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from cluster.runtime import local_services
from cluster.runtime.local_services import free_port


def serve(status: int) -> HTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status, up", [(200, True), (401, True), (500, False)])
def test_a_head_that_answers_counts_as_running_even_when_it_asks_for_a_token(monkeypatch, status, up):
    server = serve(status)
    try:
        monkeypatch.setattr(local_services, "DASHBOARD_URL", f"http://127.0.0.1:{server.server_port}")
        assert local_services.ray_head_is_up() is up
    finally:
        server.shutdown()


def test_nothing_listening_is_not_a_head(monkeypatch):
    monkeypatch.setattr(local_services, "DASHBOARD_URL", f"http://127.0.0.1:{free_port()}")
    assert not local_services.ray_head_is_up()
