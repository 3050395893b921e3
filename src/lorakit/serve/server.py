"""Running the app under uvicorn: in the foreground (the CLI) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_HOST = "127.0.0.1"  # loopback only unless the user asks for more


def _config(app, host: str, port: int, log_level: str):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=5)


def run_server(app, host: str = DEFAULT_HOST, port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted."""
    import uvicorn

    uvicorn.Server(_config(app, host, port, log_level)).run()


@contextmanager
def serving(app, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning",
            start_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` in a background thread; yields its base URL (port 0 picks a free port)."""
    import uvicorn

    server = uvicorn.Server(_config(app, host, port, log_level))
    thread = threading.Thread(target=server.run, name="lorakit-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
