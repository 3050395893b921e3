"""`make demo`: fine-tune the built-in SmolLM2 on the booking task and show the difference.

Offline and CPU-sized: score the held-out split with the base model, fine-tune with LoRA using
the recipe beside the data through the trainer API, score again with the saved adapter, and
report both scores, a few answers side by side, the fine-tune's wall time and where the adapter is.

`quantize="nf4"` (`lorakit demo --quantize nf4`) is QLoRA: the base is stored in 4 bits before
the first score, trained on and scored with the adapter, and the report compares the memory its
weights take with the 16- and 32-bit base's.

The recipe and data live in the repository (`examples/demo/{recipe.yaml,train.jsonl,heldout.jsonl}`);
an installed wheel does not carry them, so outside a checkout pass `data_dir` (`lorakit demo --data-dir DIR`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .memory import BaseMemory, base_memory
from .task import MAX_NEW_TOKENS, accuracy, score

DEFAULT_OUTPUT = Path("runs/demo")
RECIPE = "recipe.yaml"  # a `lorakit train` recipe
DATA_FILES = (RECIPE, "train.jsonl", "heldout.jsonl")


@dataclass
class DemoResult:
    before: float  # held-out accuracy of the base model
    after: float  # ... and with the fine-tuned adapter
    train_seconds: float  # wall time of the fine-tune alone
    adapter_dir: Path
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    before_answers: list[str] = field(default_factory=list)
    after_answers: list[str] = field(default_factory=list)
    eval_seconds: float = 0.0  # both held-out evaluations together
    train_info: dict[str, Any] = field(default_factory=dict)
    memory: BaseMemory | None = None  # the base's weights in memory (QLoRA: 4-bit vs 16/32-bit)
    gguf: GGUFExport | None = None  # the adapter exported for llama.cpp and Ollama


@dataclass
class GGUFExport:
    """The adapter as llama.cpp's LoRA GGUF, with an Ollama Modelfile beside it."""

    adapter: Path  # the .gguf adapter file
    modelfile: Path
    base: Path | None  # the base's GGUF file, when the base came from one (the built-in model does)

    def lines(self, prompt: str) -> list[str]:
        base = self.base or "BASE.gguf"
        return [
            f"GGUF:     {self.adapter} (llama.cpp's LoRA adapter) and {self.modelfile} (Ollama)",
            f"llama.cpp: llama-cli -m {base} --lora {self.adapter} -p '{prompt}'",
            f"Ollama:    ollama create lorakit-demo -f {self.modelfile} && ollama run lorakit-demo",
        ]


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory with the demo's recipe and train/heldout files: `data_dir`, else the repo's examples/demo."""
    if data_dir is not None:
        candidates = [Path(data_dir)]
    else:
        repo = Path(__file__).resolve().parents[3]  # src/lorakit/demo/run.py -> the checkout
        candidates = [repo / "examples" / "demo", Path.cwd() / "examples" / "demo"]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in DATA_FILES):
            return candidate
    where = candidates[0] if data_dir is not None else "examples/demo of the lorakit repository"
    raise FileNotFoundError(
        f"demo data ({', '.join(DATA_FILES[:-1])} and {DATA_FILES[-1]}) not found in {where}; "
        "run from a lorakit checkout or pass --data-dir"
    )


def read_heldout(path: Path) -> tuple[list[list[dict[str, str]]], list[str]]:
    """(conversations up to the answer, reference answers) of a chat-format JSONL file."""
    from ..data import load_records

    prompts, references = [], []
    for record in load_records(path):
        messages = record["messages"]
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{path}: every held-out record must end with the assistant's answer")
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"])
    return prompts, references


def evaluate(model: Any, tokenizer: Any, prompts: list, references: list[str]) -> tuple[float, list[str]]:
    """(accuracy, answers): greedy, batched, left-padded generation with the recipe's token budget."""
    from ..generation import generate

    answers = generate(
        model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, batch_size=len(prompts),
    )
    return accuracy(answers, references), answers


def run_demo(
    *,
    data_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT,
    model: str | None = None,
    max_steps: int | None = None,
    frozen_matmul_precision: str = "highest",
    quantize: str = "none",
    gguf_base: str = "auto",
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Evaluate, fine-tune, evaluate again; the adapter is left in `output_dir` (replaced each run).

    `model` and `max_steps` default to the recipe's. `quantize` ("nf4", "fp4"): QLoRA, every score
    and the fine-tune on the base stored in 4 bits. `gguf_base` is the recipe key: with the packed
    base (auto's choice for the built-in model) the scores and the fine-tune use the GGUF file's own
    blocks, and the report gives the memory that saves.
    """
    from ..lora.peft_model import PeftModel
    from ..models.inference import load_for_inference, quiet_loading
    from ..train import train

    data = find_data_dir(data_dir)
    prompts, references = read_heldout(data / "heldout.jsonl")
    out = Path(output_dir)
    # a progress bar only where someone watches it; a log file gets plain lines
    config = demo_train_config(data, out, model, max_steps, quiet=not sys.stderr.isatty(),
                               frozen_matmul_precision=frozen_matmul_precision, quantize=quantize,
                               gguf_base=gguf_base)
    packed = config.packed_base()
    log(f"loading {config.model} " + ("(its GGUF blocks kept as the frozen base)" if packed
                                      else "(converted from its GGUF on first use)"))
    base, tokenizer = load_for_inference(config.model, [], packed=packed)
    memory = None
    if packed:  # the trainer loads the same blocks: both scores use the base the adapter trains on
        memory = base_memory(base)
        log(f"training on the GGUF file's blocks: {memory.saved_line()} ({memory.line()})")
    if config.quantize != "none":
        from ..models.quantize import quantize_model

        # the trainer quantizes the same weights alike: both scores use the base the adapter trains on
        dense = base_memory(base)
        quantize_model(base, config.quant_config())
        memory = base_memory(base, dense)
        log(f"stored its linear layers in {config.quantize.upper()}: {memory.line()}")

    log(f"scoring the base model on {len(prompts)} held-out requests")
    start = time.perf_counter()
    before, before_answers = evaluate(base, tokenizer, prompts, references)
    eval_seconds = time.perf_counter() - start
    log(f"  held-out accuracy before: {before:.0%} ({eval_seconds:.0f} s)")

    what = ("LoRA (" if memory is None else "LoRA (packed GGUF base, " if packed
            else f"QLoRA ({config.quantize.upper()} base, ")
    log(f"fine-tuning with {what}r={config.r}, {config.max_steps} steps of {config.batch_size}) -> {out}")
    start = time.perf_counter()
    with quiet_loading():
        result = train(config)
    train_seconds = time.perf_counter() - start
    result.model = None  # free it: the evaluation below uses the adapter as saved

    log("scoring the fine-tuned model")
    start = time.perf_counter()
    tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    after, after_answers = evaluate(tuned, tokenizer, prompts, references)
    eval_seconds += time.perf_counter() - start
    return DemoResult(
        before, after, train_seconds, result.adapter_dir, [p[-1]["content"] for p in prompts],
        references, before_answers, after_answers, eval_seconds,
        {"steps": result.steps, "train_loss": result.train_loss, "train_time_s": result.train_time_s}, memory,
        export_gguf(Path(result.adapter_dir), config.model, log),
    )


def export_gguf(adapter_dir: Path, model: str, log: Callable[[str], None]) -> GGUFExport | None:
    """The adapter as `adapter.gguf` + `Modelfile` beside its directory, checked against the base's
    GGUF; a base llama.cpp's adapter format cannot describe is one logged line, not a failed demo."""
    from ..export import export_gguf_adapter
    from ..models.load import packed_gguf_path

    try:
        out = export_gguf_adapter(adapter_dir, adapter_dir.parent / "adapter.gguf", base=model, overwrite=True,
                                  modelfile=True)
    except (ValueError, FileNotFoundError) as err:
        log(f"no GGUF export of the adapter: {err}")
        return None
    try:
        base = packed_gguf_path(model)
    except ValueError:  # a model dir or hub id: llama.cpp needs its own GGUF of it
        base = None
    return GGUFExport(out, out.parent / "Modelfile", base)


def format_report(result: DemoResult, examples: int = 3) -> str:
    """What `make demo` prints at the end: scores, a few answers before/after, time, adapter path."""
    lines = [
        "",
        "=" * 72,
        f"held-out accuracy (exact JSON match, {len(result.references)} unseen requests):",
        f"  before fine-tuning: {result.before:6.1%}",
        f"  after fine-tuning:  {result.after:6.1%}",
        f"fine-tune wall time: {result.train_seconds:.0f} s"
        + (f" ({result.train_info['train_time_s']:.0f} s of training steps)" if result.train_info else "")
        + (f"; evaluation: {result.eval_seconds:.0f} s" if result.eval_seconds else ""),
        *([f"base weights in memory: {result.memory.line()}", f"memory saved: {result.memory.saved_line()}"]
          if result.memory else []),
        "",
    ]
    for i in pick_examples(result, examples):
        lines += [
            f"request:  {result.prompts[i]}",
            f"  before: {_clip(result.before_answers[i])}",
            f"  after:  {_clip(result.after_answers[i])}  "
            + ("[correct]" if score(result.after_answers[i], result.references[i]) else "[wrong]"),
            "",
        ]
    adapter = result.adapter_dir
    prompt = "Table for 3 on Sunday at 8pm, name Ada Byrne."
    lines += [
        f"adapter: {adapter}/ (PEFT format)",
        f"try it:  lorakit generate --adapter {adapter} --prompt '{prompt}'",
        *(result.gguf.lines(prompt) if result.gguf else []),
        "=" * 72,
    ]
    return "\n".join(lines)


def pick_examples(result: DemoResult, n: int) -> list[int]:
    """Up to n held-out rows to show: the first ones, preferring rows the fine-tune got right."""
    right = [i for i, a in enumerate(result.after_answers) if score(a, result.references[i])]
    wrong = [i for i in range(len(result.after_answers)) if i not in set(right)]
    return sorted((right + wrong)[:n])


def _clip(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


# -- the trainer's side ----------------------------------------------------------------------
def demo_train_config(
    data_dir: Path, output_dir: Path, model: str | None = None, max_steps: int | None = None,
    quiet: bool = False, frozen_matmul_precision: str = "highest", quantize: str = "none", gguf_base: str = "auto",
) -> Any:
    """The recipe in `data_dir` as a TrainConfig on the train.jsonl beside it (None: the recipe's value).

    A shorter run (`max_steps`) keeps its warmup no longer than the run.
    """
    from ..train import load_train_config

    config = load_train_config(
        Path(data_dir) / RECIPE, data=str(Path(data_dir) / "train.jsonl"), output_dir=str(output_dir),
        overwrite=True, quiet=quiet, frozen_matmul_precision=frozen_matmul_precision, model=model,
        max_steps=max_steps, quantize=quantize, gguf_base=gguf_base,
    )
    if config.max_steps is not None and config.warmup_steps > config.max_steps:
        config = dataclasses.replace(config, warmup_steps=config.max_steps)
    return config
