"""`lorakit serve`: argument checks in-process, and one real server started as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lorakit.commands.serve import check_port_free, parse_adapter_spec


def test_adapter_spec_parsing(tmp_path):
    (tmp_path / "support-bot").mkdir()
    assert parse_adapter_spec(f"sb={tmp_path / 'support-bot'}") == ("sb", str(tmp_path / "support-bot"))
    assert parse_adapter_spec(str(tmp_path / "support-bot")) == ("support-bot", str(tmp_path / "support-bot"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        parse_adapter_spec(f"x={tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapter_spec("=")


def test_port_in_use_is_one_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*--port"):
            check_port_free("127.0.0.1", port)


def test_bad_adapter_fails_before_loading_the_model(tmp_path, capsys):
    from lorakit.cli import main

    status = main(["serve", "--adapter", f"x={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert status == 2
    assert "nowhere" in err and len(err.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_serve_command_end_to_end(serve_model_dir, adapter_dirs):
    port = _free_port()
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(serve_model_dir), "--model-name", "tiny",
           "--adapter", f"a0={adapter_dirs['a0']}", "--port", str(port), "--max-adapters", "1",
           "--log-level", "warning"]
    env = {**os.environ, "LORAKIT_API_KEY": "k1"}
    # Ctrl-C must work even if this test runs where SIGINT is ignored (background jobs inherit that)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    stopped = False
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer k1"}
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from the environment
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert [m["id"] for m in models["data"]] == ["tiny", "a0"]
        reply = httpx.post(url + "/v1/completions", headers=headers,
                           json={"model": "a0", "prompt": "w1 w2", "max_tokens": 3, "temperature": 0}).json()
        assert 1 <= reply["usage"]["completion_tokens"] <= 3
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops the engine (main thread) and the HTTP thread
        assert proc.wait(timeout=20) == 0
        stopped = True
    finally:
        if not stopped:
            proc.kill()
            proc.wait()
