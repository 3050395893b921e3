"""benchmarks/packed_speed.py's table and summary: packed over dense, from each contender's figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "packed_speed.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("packed_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


packed_speed = _load_script()


def _result(step_s: float, cpu_s: float, peak: float, load_rss: float, losses: list[float], decode: float) -> dict:
    return {"step_s": step_s, "cpu_s": cpu_s, "tokens_per_s": 1024 / step_s, "peak_rss_gb": peak,
            "load_rss_gb": load_rss, "weights_gb": load_rss, "load_s": 1.0, "losses": losses, "decode_tok_s": decode}


def test_summary_is_packed_over_dense():
    results = {"dense": _result(5.0, 10.0, 2.0, 0.5, [10.0, 8.0], 20.0),
               "packed": _result(5.5, 10.5, 1.5, 0.25, [10.0, 8.08], 8.0)}
    figures = dict(part.split("=") for part in packed_speed.summary(results).split())
    assert float(figures["packed_step_vs_dense"]) == pytest.approx(1.1)
    assert float(figures["packed_cpu_vs_dense"]) == pytest.approx(1.05)
    assert float(figures["packed_peak_vs_dense"]) == pytest.approx(0.75)
    assert float(figures["packed_load_rss_vs_dense"]) == pytest.approx(0.5)
    assert float(figures["loss_rel_diff"]) == pytest.approx(0.01)
    assert float(figures["packed_decode_vs_dense"]) == pytest.approx(0.4)
    table = packed_speed.table(results)
    assert all(label in table for label in packed_speed.CONTENDERS.values())
    assert "| 5.50 | 10.50 | 1.50 |" in table


def test_it_reuses_train_speeds_workload():
    assert packed_speed.ts.BATCH == 4 and packed_speed.ts.SEQ == 256
    assert packed_speed.ts.TARGETS == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
