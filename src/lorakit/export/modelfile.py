"""Ollama Modelfiles: ``FROM`` a GGUF, the chat template in Ollama's Go-template syntax, stop tokens.

    text, notes = modelfile_for(tokenizer, "./model.gguf")                        # a merged model
    text, notes = modelfile_for(tokenizer, "./base.gguf", adapter="./lora.gguf")  # base + GGUF adapter

Ollama does not run Jinja, so the tokenizer's chat template is translated. Rather than parsing
Jinja, `turn_format` renders probe conversations with transformers' `apply_chat_template` and
reads off a template of the role-wrapped-turn form every supported family uses (ChatML as in
SmolLM2 and Qwen2, Llama 3's headers): ``prefix + (open role mid content close)* + open assistant mid``,
with a default system prompt when the template inserts one. Ollama prepends the Modelfile's
``SYSTEM`` when a conversation has no system message, exactly that default. The form is accepted only
if it re-renders every probe conversation exactly (`render_go_template`, a renderer of the few Go
constructs emitted here); a template that is not of this form gets no ``TEMPLATE`` line and a note.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_PROBE = {"system": "SYSTEMx7q1", "user": "USERx7q1", "assistant": "ASSISTANTx7q1", "user2": "USERx7q2"}


@dataclass(frozen=True)
class TurnFormat:
    """A chat template of the form prefix + Σ(open + role + mid + content + close) + open + "assistant" + mid."""

    prefix: str
    open: str
    mid: str
    close: str
    default_system: str | None  # inserted by the template when the conversation has no system message

    def go_template(self, *, bos: str | None = None) -> str:
        """Ollama's TEMPLATE; a prefix that is the BOS text the tokenizer adds anyway (`bos`) is left out."""
        prefix = "" if bos is not None and self.prefix == bos else self.prefix
        return (f"{prefix}{{{{ range .Messages }}}}{self.open}{{{{ .Role }}}}{self.mid}{{{{ .Content }}}}"
                f"{self.close}{{{{ end }}}}{self.open}assistant{self.mid}")


_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}")


def render_go_template(template: str, messages: list[dict]) -> str:
    """Fill a Go template made of text, ``{{ range .Messages }}...{{ end }}``, ``{{ .Role }}`` and
    ``{{ .Content }}`` (``{{-`` / ``-}}`` trim the text beside them) as Ollama fills it; any other
    action raises ValueError."""
    texts, actions, pos = [], [], 0
    for match in _ACTION.finditer(template):  # texts[i] precedes actions[i]
        texts.append(template[pos:match.start()])
        actions.append(match)
        pos = match.end()
    texts.append(template[pos:])
    for i, match in enumerate(actions):
        if match.group(1):
            texts[i] = texts[i].rstrip()
        if match.group(3):
            texts[i + 1] = texts[i + 1].lstrip()

    def run(i: int, message: dict | None, out: list[str]) -> int:
        """Emit from texts[i] on; returns the index of the `end` action that stops it (or len)."""
        while True:
            out.append(texts[i])
            if i == len(actions):
                return i
            action = actions[i].group(2)
            if action == "end":
                return i
            if action == "range .Messages":
                end = run(i + 1, {"role": "", "content": ""}, [])  # where the body ends
                for m in messages:
                    run(i + 1, m, out)
                i = end + 1
            elif action in (".Role", ".Content") and message is not None:
                out.append(message[action[1:].lower()])
                i += 1
            else:
                raise ValueError(f"render_go_template: unsupported action {actions[i].group(0)!r}")

    out: list[str] = []
    if run(0, None, out) != len(actions):
        raise ValueError("render_go_template: an {{ end }} without its range")
    return "".join(out)


def ollama_messages(messages: list[dict], system: str | None) -> list[dict]:
    """The messages Ollama fills the template with: the Modelfile's SYSTEM first when the
    conversation does not start with a system message."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return list(messages)


def _apply(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _probes() -> list[list[dict]]:
    p = _PROBE
    s, u, a, u2 = ({"role": r, "content": p[k]} for r, k in
                   (("system", "system"), ("user", "user"), ("assistant", "assistant"), ("user", "user2")))
    return [[s, u, a, u2], [s, u], [u], [u, a, u2]]


def _render(fmt: TurnFormat, messages: list[dict], generation: bool) -> str:
    body = "".join(f"{fmt.open}{m['role']}{fmt.mid}{m['content']}{fmt.close}" for m in messages)
    return fmt.prefix + body + (f"{fmt.open}assistant{fmt.mid}" if generation else "")


def turn_format(tokenizer: PreTrainedTokenizerBase) -> TurnFormat:
    """The tokenizer's chat template as a `TurnFormat`; ValueError saying why when it is not one."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    p = _PROBE
    first = _probes()[0]
    try:
        full, closed = _apply(tokenizer, first, True), _apply(tokenizer, first, False)
        if not full.startswith(closed) or p["user2"] not in closed:
            raise ValueError("the generation prompt is not appended after the last turn")
        close = closed[closed.index(p["user2"]) + len(p["user2"]):]
        between = full[full.index(p["system"]) + len(p["system"]):full.index(p["user"])]
        if not between.startswith(close) or "user" not in between[len(close):]:
            raise ValueError("turns are not wrapped by role the same way")
        open_, mid = between[len(close):].split("user", 1)
        head = full[:full.index(p["system"])]
        if not head.endswith(f"{open_}system{mid}"):
            raise ValueError("the system turn is wrapped differently from the others")
        fmt = TurnFormat(head[:len(head) - len(f"{open_}system{mid}")], open_, mid, close, None)
        # a default system prompt: what the template puts in a system turn nobody wrote
        lone = _apply(tokenizer, [{"role": "user", "content": p["user"]}], True)
        if lone != _render(fmt, [{"role": "user", "content": p["user"]}], True):
            start = f"{fmt.prefix}{open_}system{mid}"
            end = f"{close}{open_}user{mid}{p['user']}"
            if lone.startswith(start) and end in lone:
                fmt = TurnFormat(fmt.prefix, open_, mid, close, lone[len(start):lone.index(end)])
        for messages in _probes():
            for generation in (True, False):
                if not generation and messages[-1]["role"] != "assistant" and messages is not first:
                    continue
                want = _apply(tokenizer, messages, generation)
                got = _render(fmt, ollama_messages(messages, fmt.default_system), generation)
                if got != want:
                    raise ValueError("re-rendering a probe conversation from the turn form differs")
    except ValueError:
        raise
    except Exception as e:  # the template itself raised (e.g. no system role)
        raise ValueError(f"rendering a probe conversation failed: {e}") from e
    return fmt


def stop_tokens(fmt: TurnFormat, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The special tokens that end or open a turn (Ollama's ``PARAMETER stop``), end-of-turn first."""
    specials = sorted({t for t in tokenizer.all_special_tokens} | set(getattr(tokenizer, "added_tokens_encoder", {})),
                      key=len, reverse=True)
    stops: list[str] = []
    for text in (fmt.close, fmt.open, fmt.mid):
        for token in specials:
            if token and token in text and token not in stops:
                stops.append(token)
    return stops or ([fmt.close.strip()] if fmt.close.strip() else [])


def _quoted(value: str, what: str) -> str:
    if '"""' in value:
        raise ValueError(f"the {what} holds '\"\"\"', which a Modelfile cannot quote")
    return f'"""{value}"""'


def modelfile_text(from_: str, *, template: str | None = None, system: str | None = None,
                   stops: list[str] | tuple[str, ...] = (), adapter: str | None = None) -> str:
    """A Modelfile: FROM (a GGUF path or an Ollama model), an optional ADAPTER (a GGUF adapter),
    TEMPLATE, SYSTEM and one PARAMETER stop per token."""
    lines = [f"FROM {from_}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    if template is not None:
        lines.append(f"TEMPLATE {_quoted(template, 'chat template')}")
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system, 'system prompt')}")
    for stop in stops:
        if '"' in stop or "\n" in stop:
            raise ValueError(f"stop token {stop!r} cannot be written as a Modelfile parameter")
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def _local(path: str) -> str:
    return path if path.startswith(("/", "./", "../")) else f"./{path}"


def modelfile_for(tokenizer: PreTrainedTokenizerBase, from_: str, *, adapter: str | None = None
                  ) -> tuple[str, tuple[str, ...]]:
    """(Modelfile text, notes) for a model whose tokenizer is `tokenizer`: FROM `from_` (a path
    relative to the Modelfile, or an Ollama model name), ADAPTER `adapter`. A chat template that
    cannot be translated leaves TEMPLATE out (Ollama then uses the model's default) and says why."""
    from_ = _local(from_) if from_.lower().endswith(".gguf") else from_
    adapter = None if adapter is None else _local(adapter)
    try:
        fmt = turn_format(tokenizer)
    except ValueError as e:
        note = f"the Modelfile has no TEMPLATE: the chat template could not be translated to Ollama's ({e})"
        return modelfile_text(from_, adapter=adapter), (note,)
    adds_bos = tokenizer.bos_token is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    template = fmt.go_template(bos=tokenizer.bos_token if adds_bos else None)
    text = modelfile_text(from_, template=template, system=fmt.default_system,
                          stops=stop_tokens(fmt, tokenizer), adapter=adapter)
    return text, ()
