"""Ollama Modelfiles: the chat template translated to Go-template syntax, checked by rendering.

The oracle is transformers' `apply_chat_template`: the emitted TEMPLATE, filled the way Ollama fills
it (its SYSTEM prepended when a conversation has none), must give the same text for conversations
the translation never saw. The expected TEMPLATE text for ChatML is also spelled out, as Ollama's
own ChatML templates read.
"""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from lorakit.export.modelfile import (
    modelfile_for,
    modelfile_text,
    ollama_messages,
    render_go_template,
    stop_tokens,
    turn_format,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke\nabout cats."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]


def tokenizer_with(template: str, specials: list[str], bos: str | None = None) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, additional_special_tokens=specials)
    tok.chat_template = template
    return tok


CASES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], None),
    "smollm2": (SMOLLM2, ["<|im_start|>", "<|im_end|>"], None),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_go_template_renders_like_apply_chat_template(case):
    template, specials, bos = CASES[case]
    tok = tokenizer_with(template, specials, bos)
    fmt = turn_format(tok)
    go = fmt.go_template()
    for conversation in CONVERSATIONS:
        want = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert render_go_template(go, ollama_messages(conversation, fmt.default_system)) == want


def test_chatml_template_text_and_stops():
    tok = tokenizer_with(SMOLLM2, ["<|im_start|>", "<|im_end|>"])
    text, notes = modelfile_for(tok, "model.gguf")
    assert notes == ()
    assert text == (
        'FROM ./model.gguf\n'
        'TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
        '<|im_start|>assistant\n"""\n'
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
    )
    plain = tokenizer_with(CHATML, ["<|im_start|>", "<|im_end|>"])
    assert turn_format(plain).default_system is None
    assert "SYSTEM" not in modelfile_for(plain, "m.gguf")[0]


def test_llama3_stops_and_bos_left_to_the_tokenizer():
    template, specials, bos = CASES["llama3"]
    tok = tokenizer_with(template, specials, bos)
    fmt = turn_format(tok)
    assert fmt.prefix == "<|begin_of_text|>"
    assert stop_tokens(fmt, tok) == ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    # a tokenizer that adds BOS itself gets a template without it, as Ollama's llama3 template reads
    assert fmt.go_template(bos="<|begin_of_text|>").startswith("{{ range .Messages }}<|start_header_id|>")


def test_untranslatable_template_gets_no_template_and_a_note():
    tok = tokenizer_with(GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<bos>")
    text, notes = modelfile_for(tok, "./m.gguf")
    assert text == "FROM ./m.gguf\n"
    assert len(notes) == 1 and "no TEMPLATE" in notes[0] and "System role not supported" in notes[0]
    with pytest.raises(ValueError, match="no chat template"):
        turn_format(tokenizer_with(None, []))


def test_adapter_line_and_ollama_base():
    tok = tokenizer_with(CHATML, ["<|im_start|>", "<|im_end|>"])
    text, _ = modelfile_for(tok, "smollm2:135m", adapter="adapter.gguf")
    assert text.startswith("FROM smollm2:135m\nADAPTER ./adapter.gguf\nTEMPLATE ")
    assert modelfile_text("./base.gguf", adapter="./a.gguf", stops=["<|im_end|>"]) == (
        'FROM ./base.gguf\nADAPTER ./a.gguf\nPARAMETER stop "<|im_end|>"\n')
    with pytest.raises(ValueError, match="cannot quote"):
        modelfile_text("./m.gguf", system='say """ hi')


def test_renderer_trims_and_refuses_what_it_does_not_know():
    msgs = [{"role": "user", "content": "x"}]
    assert render_go_template("a  {{- range .Messages }} [{{ .Role }}] {{- .Content }}{{ end }}", msgs) == "a [user]x"
    assert render_go_template("{{ range .Messages }}{{ .Content }}{{ end }}!", []) == "!"
    with pytest.raises(ValueError, match="unsupported action"):
        render_go_template("{{ if .System }}x{{ end }}", msgs)
