"""One HTTP port for Prometheus ``/metrics``, ``/healthz`` (alive) and ``/readyz`` (ready to serve)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, MetricsHandler


def serve_http(host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]) -> ThreadingHTTPServer:
    """Start the server on a daemon thread; ``server.server_address`` holds the bound port."""

    class Handler(MetricsHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            path = self.path.split("?", 1)[0]
            if path in ("/healthz", "/readyz"):
                ok = path == "/healthz" or ready()
                body = b"ok\n" if ok else b"not ready\n"
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif path == "/metrics":
                super().do_GET()
            else:
                self.send_error(404)

    Handler.registry = registry
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
