import json
import subprocess
import sys

import pytest

from lorakit.data import DataError, load_records

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
ALPACA = {"instruction": "add", "input": "1 2", "output": "3"}
PAIR = {"prompt": "p", "completion": "c"}
TEXT = {"text": "plain"}
RECORDS = [CHAT, ALPACA, PAIR, TEXT]


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in RECORDS[:2]] + ["", "  "]
                       + [json.dumps(r) for r in RECORDS[2:]])
    assert load_records(path) == RECORDS


@pytest.mark.parametrize("wrap", [lambda r: r, lambda r: {"data": r}, lambda r: {"train": r}])
def test_json_list_or_wrapped(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(wrap(RECORDS)))
    assert load_records(path) == RECORDS


def test_json_object_without_records(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": RECORDS}))
    with pytest.raises(DataError, match=r"'data' or 'train'.*keys: rows"):
        load_records(path)


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nadd,"1 2",3\n"say\nhi",,hello\n')
    assert load_records(path) == [ALPACA, {"instruction": "say\nhi", "input": "", "output": "hello"}]


def test_csv_error_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\nq,a\n")
    with pytest.raises(DataError, match=rf"{path}:2: record fits no format \(keys: prompt, answer\)"):
        load_records(path)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT]), path)
    assert load_records(path) == [CHAT, CHAT]


@pytest.mark.parametrize("as_dict", [False, True])
def test_saved_dataset_directory(tmp_path, as_dict):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list([ALPACA, {**ALPACA, "input": ""}])
    if as_dict:
        data = datasets.DatasetDict({"train": data, "test": data.select([0])})
    data.save_to_disk(str(tmp_path / "ds"))
    assert load_records(tmp_path / "ds") == [ALPACA, {**ALPACA, "input": ""}]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "a"', r"d.jsonl:2: bad JSON: Expecting ',' delimiter"),
        ('{"question": "q", "answer": "a"}', r"d.jsonl:2: record fits no format \(keys: question, answer\)"),
        ('{"messages": [{"role": "user"}]}', r"d.jsonl:2: message 0 has no 'content' \(keys: role\)"),
        ('{"messages": [{"content": "x"}]}', r"d.jsonl:2: message 0 has no 'role'"),
        ('{"prompt": "p", "completion": 3}', r"d.jsonl:2: .*'completion', but it is a int"),
        ('["text"]', r"d.jsonl:2: record is a list"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(TEXT), line, json.dumps(TEXT)])
    with pytest.raises(DataError, match=message):
        load_records(path)


def test_forced_format_is_checked_per_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(PAIR), json.dumps(TEXT)])
    with pytest.raises(DataError, match=r"d.jsonl:2: format 'prompt_completion' needs .*'prompt'"):
        load_records(path, fmt="prompt_completion")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        load_records(tmp_path / "d.txt")


def test_columnar_libraries_load_only_when_needed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(TEXT)])
    code = (
        "import sys; from lorakit.data import load_records; "
        f"load_records({str(path)!r}); "
        "print(sorted(m for m in ('pyarrow', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
