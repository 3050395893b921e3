"""A rank killed mid-run ends the whole run with a clear error within a bounded time; resume completes it.

The killed rank is on the other "machine" (a second torchrun on 127.0.0.1), so its launcher cannot
stop the surviving rank: that rank itself must notice and say so. The run is then resumed with one
launcher of two processes and must reach the one-process run's losses.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from dist_helpers import WORKER, assert_same_run, child_env, free_port, losses, run, torchrun

KILL_AFTER_STEP = 5  # checkpoint step-4 exists by then; the run is 8 steps


def wait_for(predicate, nodes: list[subprocess.Popen], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(node.poll() is not None for node in nodes):
            raise AssertionError(f"a launcher ended early, before {what} (see node*.log beside the run)")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_killed_rank_stops_the_run_and_resume_completes_it(dist_files, reference, tmp_path):
    out, pids = tmp_path / "run", tmp_path / "pids"
    port = free_port()
    line = f"train {dist_files['recipe']} output_dir={out} batch_size=2 dist_timeout=30"
    nodes: list[subprocess.Popen] = []
    try:
        for node in (0, 1):  # node 0 first: its launcher hosts the rendezvous store and outlives the kill
            env = child_env(DIST_TEST_PIDS=str(pids), DIST_TEST_SLOW="0.25", DIST_TEST_NODE=str(node))
            with open(tmp_path / f"node{node}.log", "w") as log:  # a file: a full pipe would stall the run
                nodes.append(subprocess.Popen(
                    [*torchrun(1, port, nnodes=2, node_rank=node, run_id="killed"), str(WORKER), line],
                    stdout=log, stderr=subprocess.STDOUT, env=env))
            if node == 0:
                wait_for(lambda: listening(port), nodes, 60, "the rendezvous store")
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and max(losses(out), default=0) >= KILL_AFTER_STEP, nodes, 120,
                 f"step {KILL_AFTER_STEP}")
        os.kill(int((pids / "node1").read_text()), signal.SIGKILL)
        killed_at = time.monotonic()
        for node in nodes:
            node.wait(timeout=90)
        stopped_after = time.monotonic() - killed_at
    finally:
        for node in nodes:
            node.kill()
    text = "\n".join((tmp_path / f"node{node}.log").read_text() for node in (0, 1))
    assert all(node.returncode != 0 for node in nodes), text[-4000:]
    assert stopped_after < 45, f"the launchers took {stopped_after:.0f} s to stop"
    lost = r"lorakit: error: rank \d: lost contact with the other processes after step \d"
    assert re.search(lost, text), text[-4000:]
    assert f"resume=latest continues from {out / 'checkpoints' / 'step-4'}" in text
    assert "Signal 9 (SIGKILL)" in text  # the other launcher names the killed rank
    assert max(losses(out)) < 8 and not (out / "adapter").exists()

    result = run([*torchrun(2, free_port()), "-m", "lorakit", "train", str(dist_files["recipe"]),
                  f"output_dir={out}", "batch_size=2", "resume=latest"], timeout=150)
    assert "resuming from" in result.stdout and "at step 4" in result.stdout
    assert_same_run(out, reference, range(1, 9))
    assert not [p for p in Path(out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
