"""The demo task: its metric, and the data generator behind examples/demo/*.jsonl."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from lorakit.demo.task import accuracy, score
from lorakit.train import load_train_config

DEMO_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo"
REF = '{"name":"Alice Moreno","guests":4,"day":"Friday","time":"7:30pm"}'


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", DEMO_DIR / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requests(rows: list[dict]) -> set[str]:
    return {row["messages"][0]["content"] for row in rows}


def name_words(rows: list[dict]) -> set[str]:
    return {w for row in rows for w in json.loads(row["messages"][1]["content"])["name"].split()}


@pytest.mark.parametrize(
    "prediction",
    [
        REF,
        '  {"name":"Alice Moreno","guests":4,"day":"Friday","time":"7:30pm"}\n',
        '{"name": "Alice Moreno", "guests": 4, "day": "Friday", "time": "7:30pm"}',
        '{"time":"7:30pm","day":"Friday","guests":4,"name":"Alice Moreno"}',
    ],
)
def test_score_accepts_the_same_object(prediction):
    assert score(prediction, REF)


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        "Sure! I booked a table for 4 on Friday at 7:30pm for Alice Moreno.",
        'Here you go: {"name":"Alice Moreno","guests":4,"day":"Friday","time":"7:30pm"}',
        '{"name":"Alice Moreno","guests":4,"day":"Friday","time":"7:30pm"} Enjoy!',
        '{"name":"Alice Moreno","guests":4,"day":"Friday","time":"7:30pm"',  # cut off
        '{"name":"Alice Moreno","guests":"4","day":"Friday","time":"7:30pm"}',  # "4" is not 4
        '{"name":"Alice Moreno","guests":4.0,"day":"Friday","time":"7:30pm"}',
        '{"name":"Alice Moreno","guests":4,"day":"Friday","time":"7.30 pm"}',  # not normalised
        '{"name":"Alice Moreno","guests":5,"day":"Friday","time":"7:30pm"}',
        '{"name":"alice moreno","guests":4,"day":"Friday","time":"7:30pm"}',
        '{"name":"Alice Moreno","guests":4,"day":"Friday"}',  # missing key
        '{"name":"Alice Moreno","guests":4,"day":"Friday","time":"7:30pm","notes":""}',
        '[{"name":"Alice Moreno","guests":4,"day":"Friday","time":"7:30pm"}]',
    ],
)
def test_score_rejects_wrong_or_broken_answers(prediction):
    assert not score(prediction, REF)


def test_score_refuses_a_bad_reference():
    with pytest.raises(ValueError):
        score(REF, "not json")


def test_accuracy_is_the_fraction_scored():
    assert accuracy([REF, "nope", REF, "{}"], [REF] * 4) == 0.5
    with pytest.raises(ValueError):
        accuracy([REF], [REF, REF])


def test_generator_is_deterministic_and_matches_the_committed_files():
    make_data = load_make_data()
    train, heldout = make_data.make_splits()
    assert (train, heldout) == make_data.make_splits()
    assert make_data.make_splits(seed=make_data.SEED + 1)[0] != train
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        on_disk = [json.loads(line) for line in (DEMO_DIR / name).read_text().splitlines()]
        assert on_disk == rows, f"{name} is stale: run examples/demo/make_data.py"


def test_splits_are_disjoint_and_heldout_names_are_unseen():
    make_data = load_make_data()
    train, heldout = make_data.make_splits()
    assert len(requests(train)) == len(train) == make_data.N_TRAIN
    assert len(requests(heldout)) == len(heldout) == make_data.N_HELDOUT
    assert not requests(train) & requests(heldout)
    assert not name_words(train) & name_words(heldout)


def test_every_reference_is_well_formed_and_scores_itself():
    make_data = load_make_data()
    for row in sum(make_data.make_splits(), []):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        answer = json.loads(assistant["content"])
        assert list(answer) == ["name", "guests", "day", "time"]
        assert answer["name"] in user["content"]
        assert answer["day"][:3].lower() in user["content"].lower()
        assert 2 <= answer["guests"] <= 12
        assert re.fullmatch(r"(1[012]|[1-9]):[0-5][0-9]pm", answer["time"])
        assert score(assistant["content"], assistant["content"])


def test_recipe_fits_the_data():
    make_data = load_make_data()
    recipe = load_train_config(DEMO_DIR / "recipe.yaml")
    assert recipe.max_steps * recipe.batch_size == recipe.epochs * make_data.N_TRAIN
    assert recipe.warmup_steps < recipe.max_steps
    assert set(recipe.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
