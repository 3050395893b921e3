"""Two torchrun launches on 127.0.0.1, acting as two machines (c10d rendezvous), train one model together.

This is what a user runs on each machine, `torchrun --nnodes 2 … -m lorakit train CONFIG.yaml`,
and it must train what one process trains with the same global batch.
"""

from __future__ import annotations

import subprocess

from dist_helpers import assert_same_run, child_env, free_port, torchrun


def test_two_nodes_train_together(dist_files, reference, tmp_path):
    out = tmp_path / "run"
    port = free_port()
    command = ["-m", "lorakit", "train", str(dist_files["recipe"]), f"output_dir={out}", "batch_size=2"]
    nodes = [subprocess.Popen([*torchrun(1, port, nnodes=2, node_rank=rank, run_id="two-nodes"), *command],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=150)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-5000:]}"
    assert sum("2 processes (ddp): global batch 4" in output for output in outputs) == 1  # rank 0's
    assert_same_run(out, reference, range(1, 9))
