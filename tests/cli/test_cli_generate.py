"""`lorakit generate` / `lorakit chat`, lorakit.generation and models.inference, on a tiny random Llama saved to disk."""

from __future__ import annotations

import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import PeftModel, cli
from lorakit.generation import generate
from lorakit.models.inference import load_for_inference

PROMPTS = ["hello", "book a table for two at seven pm please", "friday"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def reference(model, tokenizer, prompt: str, max_new_tokens: int = 6) -> str:
    """One prompt alone through transformers' generate: no batching, no padding."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def base(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)


def test_batched_left_padded_equals_one_by_one(base):
    model, tokenizer = base
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)  # one padded batch
    assert batched == [reference(model, tokenizer, p) for p in PROMPTS]
    assert len(set(batched)) > 1  # the prompts really differ, so order mix-ups would show


def test_cli_generate_base(capsys, tiny_dir, base):
    model, tokenizer = base
    code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_dir), "--prompt", PROMPTS[1],
                           "--max-new-tokens", "6")
    assert code == 0
    assert out == reference(model, tokenizer, PROMPTS[1]) + "\n"


def test_cli_generate_with_adapter(capsys, tiny_dir, adapter_dir, base):
    model, tokenizer = base
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dir).eval()
    expected = reference(tuned, tokenizer, PROMPTS[1])
    assert expected != reference(model, tokenizer, PROMPTS[1])  # the adapter matters
    # no --model: the adapter's recorded base (tiny_dir) is used
    code, out, _ = run_cli(capsys, "generate", "--adapter", str(adapter_dir), "--prompt", PROMPTS[1],
                           "--max-new-tokens", "6")
    assert code == 0 and out == expected + "\n"


def test_cli_several_adapters_side_by_side(capsys, tiny_dir, adapter_dir, adapter_dir_2, base):
    model, tokenizer = base
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(tiny_dir), "--adapter", str(adapter_dir), "--adapter",
        str(adapter_dir_2), "--with-base", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
        "--max-new-tokens", "6", "--json",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["adapter"], r["prompt"]) for r in rows] == [
        (a, p) for a in (None, "alpha", "beta") for p in PROMPTS[:2]
    ]
    for name, path in [(None, None), ("alpha", adapter_dir), ("beta", adapter_dir_2)]:
        one = model if path is None else PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_dir), path).eval()
        for row in (r for r in rows if r["adapter"] == name):
            assert row["text"] == reference(one, tokenizer, row["prompt"]), name


def test_prompt_file_and_plain_text_mode(capsys, tiny_dir, tmp_path, base):
    model, tokenizer = base
    file = tmp_path / "prompts.txt"
    file.write_text("hello world\n\nfriday\n")
    code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_dir), "--prompt-file", str(file),
                           "--no-chat", "--max-new-tokens", "4", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello world", "friday"]
    ids = tokenizer("friday", return_tensors="pt").input_ids  # raw text, no template
    with torch.no_grad():
        raw = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert rows[1]["text"] == tokenizer.decode(raw[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_sampling_is_seeded_and_restores_the_rng(base):
    model, tokenizer = base
    kwargs = dict(max_new_tokens=8, temperature=1.5, top_p=0.95)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, PROMPTS, seed=7, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, tokenizer, PROMPTS, seed=7, **kwargs) == first
    assert any(generate(model, tokenizer, PROMPTS, seed=s, **kwargs) != first for s in (8, 9))


def test_bad_decoding_values_are_named(base):
    model, tokenizer = base
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tokenizer, ["hello"], top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, ["hello"], max_new_tokens=0)
    with pytest.raises(ValueError, match="adapter_names has 1 entries for 2 prompts"):
        generate(model, tokenizer, ["a", "b"], adapter_names=["__base__"])


def test_without_a_chat_template_prompts_are_raw_text(tiny_dir, base):
    model, _ = base
    plain = AutoTokenizer.from_pretrained(tiny_dir)
    plain.chat_template = None
    assert generate(model, plain, ["friday"], max_new_tokens=4) == generate(
        model, base[1], ["friday"], max_new_tokens=4, chat=False)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        generate(model, plain, [[{"role": "user", "content": "hello"}]])


def test_load_for_inference_names_adapters_by_folder(tiny_dir, adapter_dir, adapter_dir_2):
    model, _ = load_for_inference(str(tiny_dir), [adapter_dir, adapter_dir_2, adapter_dir])
    assert list(model.peft_config) == ["alpha", "beta", "alpha-2"]


def chat_session(capsys, monkeypatch, tiny_dir, adapter_dir, lines: str) -> list[str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    code, out, _ = run_cli(capsys, "chat", "--model", str(tiny_dir), "--adapter", str(adapter_dir),
                           "--max-new-tokens", "5")
    assert code == 0
    return out.splitlines()


def test_chat_keeps_history_and_resets(capsys, monkeypatch, tiny_dir, adapter_dir):
    replies = chat_session(capsys, monkeypatch, tiny_dir, adapter_dir,
                           "hello\nbook a table\n/reset\nbook a table\n/exit\nfriday\n")
    assert len(replies) == 4 and replies[2] == "(conversation cleared)"  # nothing after /exit
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": replies[0]},
               {"role": "user", "content": "book a table"}]
    assert replies[0] == reference(tuned, tokenizer, "hello", 5)
    assert replies[1] == generate(tuned, tokenizer, [history], max_new_tokens=5)[0]
    assert replies[3] == reference(tuned, tokenizer, "book a table", 5)  # fresh after /reset
    assert replies[1] != replies[3]  # the history changed the answer


def test_chat_ends_at_end_of_input(capsys, monkeypatch, tiny_dir, adapter_dir):
    assert len(chat_session(capsys, monkeypatch, tiny_dir, adapter_dir, "hello\n\n")) == 1
