"""benchmarks/interop.py's figures and table, without llama.cpp: correlation, top-1, pass/fail rules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "interop.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("interop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


interop = _load_script()


def test_correlation_against_numpy_and_by_hand():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    assert interop.correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)
    assert interop.correlation([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert interop.correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(interop.correlation([1, 1, 1], [1, 2, 3]))  # a constant side has no correlation


def test_rms_and_top1():
    assert interop.rms([3.0, -4.0]) == pytest.approx(np.sqrt(12.5))
    a = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    b = np.array([[0.0, 5.0, 1.0], [0.0, 0.0, 3.0]])
    assert interop.top1_agreement(a, b) == 0.5


def test_compare_passes_only_when_the_change_and_every_top1_agree():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 11))
    delta = rng.normal(size=(6, 11))
    noise = 1e-3 * rng.normal(size=(6, 11))
    good = interop.compare("m", "adapter", base, base + delta, base + noise, base + delta + 2 * noise)
    assert good.passed and good.correlation > 0.999 and good.top1 == 1.0
    assert good.noise == pytest.approx(interop.rms(noise)) and good.residual == pytest.approx(interop.rms(2 * noise))
    assert good.delta == pytest.approx(interop.rms(delta))

    unrelated = interop.compare("m", "adapter", base, base + delta, base, base + rng.normal(size=(6, 11)))
    assert not unrelated.passed and "correlation" in unrelated.failures[0]

    flipped = base + delta
    cpp = flipped.copy()
    row = int(np.argmax(flipped[0]))
    cpp[0, row] -= 100.0  # one position's top-1 token changes, where the base shows no noise
    bad = interop.compare("m", "adapter", base, flipped, base, cpp)
    assert any("top-1" in f for f in bad.failures) and bad.n_decided == 6


def test_top1_counts_only_positions_the_noise_cannot_flip():
    lk_base = np.zeros((3, 4))
    lk_tuned = np.array([[0.0, 1.0, 0.99, 0.0],  # margin 0.01: within the noise
                         [0.0, 2.0, 0.0, 0.0],  # margin 2
                         [3.0, 0.0, 0.0, 0.0]])
    cpp_base = lk_base + np.array([[0.02, 0, 0, 0], [0.02, 0, 0, 0], [0.02, 0, 0, 0]])
    assert interop.decided(lk_tuned, lk_base, cpp_base).tolist() == [False, True, True]
    cpp_tuned = lk_tuned.copy()
    cpp_tuned[0, 2] += 0.03  # a near tie flips: not counted against llama.cpp
    row = interop.compare("m", "merged q8_0", lk_base, lk_tuned, cpp_base, cpp_tuned)
    assert row.top1 == pytest.approx(2 / 3) and row.top1_decided == 1.0 and row.n_decided == 2
    assert not any("top-1" in f for f in row.failures)
    assert np.isnan(interop.top1_agreement(lk_tuned, cpp_tuned, np.zeros(3, bool)))  # no positions: no figure


def test_texts_and_table():
    same = interop.compare_texts("m", "demo", ["{}", "a"], ["{}", "a"])
    diff = interop.compare_texts("m", "demo", ["{}", "a"], ["{}", "b"])
    assert same.passed and same.top1 == 1.0
    assert not diff.passed and diff.top1 == 0.5 and "'a'" in diff.failures[0]
    table = interop.format_table([same, diff, interop.compare("x", "merged q8_0", *[np.eye(3)] * 2,
                                                              np.eye(3), np.eye(3) * 2)])
    lines = table.splitlines()
    assert lines[0].startswith("| model | check | Δ-logit corr") and len(lines) == 5
    assert "| 100.0% (100% of 3/3) |" in lines[4]  # no base noise: every position counts
    assert lines[2].endswith('ok: "{}" |') and "FAIL" in lines[3]
    assert all(line.count("|") == 9 for line in lines)
