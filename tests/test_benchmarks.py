"""benchmarks/train_speed.py's summary line: the ratios docs quote, nan where a contender is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


train_speed = _load_script()


def _result(step_s: float, peak: float, losses: list[float]) -> dict:
    return {"step_s": step_s, "cpu_s": 2 * step_s, "tokens_per_s": 1024 / step_s, "peak_rss_gb": peak,
            "losses": losses}


def _figures(line: str) -> dict[str, str]:
    return dict(part.split("=") for part in line.split())


def test_ratios_from_the_contenders_they_name():
    results = {
        "peft": _result(4.0, 4.0, [10.0, 8.0]),
        "lorakit": _result(2.0, 1.0, [10.0, 8.0]),
        "floor": _result(2.0, 3.0, [10.0, 10.0]),
        "lorakit-plain": _result(2.5, 2.0, [10.0, 8.8]),
        "peft-bf16": _result(3.0, 2.0, [10.0, 8.0]),
        "lorakit-bf16": _result(1.5, 1.5, [10.1, 8.0]),
    }
    figures = _figures(train_speed._summary(results))
    assert figures["speed_vs_peft"] == "2.00"
    assert figures["memory_vs_peft"] == "0.25"
    assert figures["loss_rel_diff"] == "0.0e+00"
    assert figures["plain_speed_vs_peft"] == "1.60"
    assert figures["plain_memory_vs_peft"] == "0.50"
    assert figures["plain_vs_train_step"] == "1.25"
    assert figures["plain_loss_rel_diff"] == "1.0e-01"
    assert figures["bf16_speed_vs_peft"] == "2.00"
    assert figures["bf16_memory_vs_peft"] == "0.75"
    assert figures["bf16_loss_rel_diff"] == "1.0e-02"
    assert "medium_speed_vs_peft" not in figures  # lorakit-medium did not run
    assert "plain_bf16_speed_vs_peft" not in figures


def test_a_missing_reference_gives_nan_and_no_contender_no_line():
    figures = _figures(train_speed._summary({"lorakit-bf16": _result(1.5, 1.5, [10.0])}))
    assert figures == {"bf16_speed_vs_peft": "nan", "bf16_memory_vs_peft": "nan", "bf16_loss_rel_diff": "nan"}
    figures = _figures(train_speed._summary({"lorakit-plain": _result(2.5, 2.0, [10.0])}))
    assert set(figures.values()) == {"nan"} and "plain_vs_train_step" in figures
    assert train_speed._summary({"full": _result(3.0, 4.0, [10.0])}) == ""
