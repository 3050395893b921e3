"""lorakit's GGUF files in llama.cpp itself (llama-cpp-python), against lorakit on the same tokens.

For the embedded SmolLM2-135M (its Q4_1 GGUF, written by llama.cpp's converter) and tiny random
Llama, Qwen2, Gemma, Gemma 2 and Gemma 3 models (f32 base GGUFs written by lorakit), each with a
LoRA adapter (SmolLM2: a short fine-tune of the demo task, or with --steps 0 a random one; tiny
models: random nonzero A and B):

  adapter   the base GGUF + lorakit's exported adapter GGUF (llama.cpp's --lora) against lorakit's
            base + adapter: the adapter's change to the logits (with minus without, each side on
            its own base) correlates >= 0.99, the top-1 token agrees at every position whose
            lorakit margin is above llama.cpp's own noise there (`decided`; the table shows how
            many are), and the residual
            |llama.cpp - lorakit| is set beside that noise, measured on the base alone
  merged    lorakit's merged f16 and q8_0 GGUFs the same way (the "without" side: the base written
            in the same type)
  tokenize  each merged f16 GGUF's tokenizer in llama.cpp against the transformers tokenizer it
            was written from, on a few texts (spaces, digits, accents, CJK: byte fallback), and the
            same for tiny models whose tokenizers are SentencePiece-style (Llama 2's, Gemma's)
  demo      a greedy continuation of held-out demo prompts: the same text (and JSON) from lorakit,
            from the merged f16 GGUF and from the base GGUF + adapter GGUF in llama.cpp

Prints one markdown table (docs/gguf.md, "Verified against llama.cpp") and exits 1 if a check
fails. `make interop` builds llama-cpp-python once and runs this.

    python benchmarks/interop.py                  # everything (~15 minutes on 2 idle cores)
    python benchmarks/interop.py --tiny-only      # skip SmolLM2 and the demo fine-tune
    python benchmarks/interop.py --steps 0        # SmolLM2 with a random adapter, no demo fine-tune
    python benchmarks/interop.py --dry-run        # write every file, check it with gguf-py; no llama.cpp
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
MIN_CORRELATION = 0.99
TOKENIZE_TEXTS = ("the quick brown fox", "Table for 2 on sat at 8pm, name Ada Li.", " leading space",
                  "two  spaces\nand a newline", "Zebra 42 café über ünïcödé ✓ 漢字")
TINY_FAMILIES = ("llama", "qwen2", "gemma", "gemma2", "gemma3_text")
TINY_TOKENS = 32  # longer than the Gemma 2/3 sliding window (8): both attention kinds are exercised
DEMO_PROMPTS = 3
DEMO_NEW_TOKENS = 40  # the demo's own budget (demo.task.MAX_NEW_TOKENS)


# -- the figures (pure) -------------------------------------------------------------------------
def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays' entries (nan when either is constant)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denom if denom else float("nan")


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a, np.float64)))))


def top1_agreement(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """Fraction of positions (rows; those in mask `where`) whose argmax over the vocabulary is the same."""
    same = np.argmax(a, axis=-1) == np.argmax(b, axis=-1)
    return float(np.mean(same if where is None else same[where])) if where is None or where.any() else float("nan")


def decided(reference: np.ndarray, lk_base: np.ndarray, cpp_base: np.ndarray) -> np.ndarray:
    """Positions whose top-1 token llama.cpp's own noise cannot flip: `reference`'s margin between its
    first and second logit exceeds twice the largest |llama.cpp - lorakit| on the base at that position
    (each of the two logits may move by that much)."""
    top2 = np.sort(reference, axis=-1)[:, -2:]
    noise = np.max(np.abs(cpp_base - lk_base), axis=-1)
    return (top2[:, 1] - top2[:, 0]) > 2 * noise


@dataclass
class Row:
    """One check: lorakit (`lk_*`) against llama.cpp (`cpp_*`), base and with the adapter."""

    model: str
    check: str
    correlation: float = float("nan")  # of the adapter's change to the logits, lorakit vs llama.cpp
    top1: float = float("nan")  # positions whose top-1 token agrees (with the adapter)
    top1_decided: float = float("nan")  # the same over the positions llama.cpp's noise cannot flip
    n_decided: int = 0
    n_positions: int = 0
    residual: float = float("nan")  # rms(llama.cpp - lorakit), with the adapter
    noise: float = float("nan")  # rms(llama.cpp - lorakit) on the base alone
    delta: float = float("nan")  # rms of lorakit's change: the size of what is compared
    text: str = ""  # demo rows: what was generated
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def compare(model: str, check: str, lk_base, lk_tuned, cpp_base, cpp_tuned) -> Row:
    """The logit figures of one check and whether it passes (correlation, every top-1 token)."""
    lk_delta, cpp_delta = lk_tuned - lk_base, cpp_tuned - cpp_base
    sure = decided(lk_tuned, lk_base, cpp_base)
    row = Row(model, check, correlation(lk_delta, cpp_delta), top1_agreement(lk_tuned, cpp_tuned),
              top1_agreement(lk_tuned, cpp_tuned, sure), int(sure.sum()), len(sure),
              rms(cpp_tuned - lk_tuned), rms(cpp_base - lk_base), rms(lk_delta))
    if not row.correlation >= MIN_CORRELATION:
        row.failures.append(f"adapter change correlation {row.correlation:.4f} < {MIN_CORRELATION}")
    if not row.n_decided:
        row.failures.append(f"none of the {row.n_positions} positions has a top-1 margin above llama.cpp's "
                            "noise: the top-1 check says nothing")
    elif row.top1_decided < 1.0:
        row.failures.append(f"top-1 tokens agree at {row.top1_decided:.1%} of the {row.n_decided} positions "
                            "whose margin is above llama.cpp's noise")
    return row


def compare_texts(model: str, check: str, reference: list[str], got: list[str]) -> Row:
    """A demo row: every continuation equal to lorakit's."""
    same = sum(r == g for r, g in zip(reference, got, strict=True))
    row = Row(model, check, top1=same / len(reference), text=json.dumps(got[0]))
    for r, g in zip(reference, got, strict=True):
        if r != g:
            row.failures.append(f"continuation differs: lorakit {r!r}, llama.cpp {g!r}")
    return row


def _num(value: float, digits: int = 4) -> str:
    if value != value:  # nan
        return ""
    return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}"


def format_table(rows: list[Row]) -> str:
    """The rows as the markdown table docs/gguf.md quotes."""
    lines = ["| model | check | Δ-logit corr | top-1 agree: all (above noise) | residual rms | base noise rms "
             "| Δ rms | result |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "ok" if r.passed else "FAIL"
        if r.text:
            result += f": {r.text[:60]}"
        top1 = f"{r.top1:.1%}" if r.top1 == r.top1 else ""
        if r.n_positions:
            top1 += f" ({r.top1_decided:.0%} of {r.n_decided}/{r.n_positions})"
        lines.append(f"| {r.model} | {r.check} | {_num(r.correlation)} | {top1} | "
                     f"{_num(r.residual)} | {_num(r.noise)} | {_num(r.delta)} | {result} |")
    return "\n".join(lines)


# -- llama.cpp's side ---------------------------------------------------------------------------
def _llama(model_path: Path, lora_path: Path | None, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("benchmarks/interop.py needs llama-cpp-python (make interop builds and installs it); "
                 "--dry-run writes and checks the files without it")
    return Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=n_ctx,
                 n_batch=n_ctx, n_threads=int(os.environ.get("INTEROP_THREADS", "2")), logits_all=True,
                 verbose=False, seed=0)


def llama_logits(model_path: Path, ids: list[int], lora_path: Path | None = None) -> np.ndarray:
    """llama.cpp's logits (n, vocab) for `ids`, every position."""
    llm = _llama(model_path, lora_path, n_ctx=max(64, len(ids)))
    try:
        llm.eval(ids)
        return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    finally:
        llm.close()


def llama_greedy(model_path: Path, prompts: list[list[int]], stop: set[int], lora_path: Path | None = None,
                 n: int = DEMO_NEW_TOKENS) -> list[list[int]]:
    """Greedy continuations of each prompt (argmax of llama.cpp's logits), up to a stop token."""
    llm = _llama(model_path, lora_path, n_ctx=max(len(p) for p in prompts) + n + 8)
    out = []
    try:
        for prompt in prompts:
            llm.reset()
            llm.eval(prompt)
            new: list[int] = []
            while len(new) < n:
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if token in stop:
                    break
                new.append(token)
                llm.eval([token])
            out.append(new)
    finally:
        llm.close()
    return out


def llama_tokenize(model_path: Path, texts: Sequence[str]) -> list[list[int]]:
    """llama.cpp's token ids for each text (its vocabulary only; BOS where the file says to add one)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in texts]
    finally:
        llm.close()


# -- lorakit's side -----------------------------------------------------------------------------
def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def torch_greedy(model, prompts: list[list[int]], stop: set[int], n: int = DEMO_NEW_TOKENS) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids, new = list(prompt), []
        while len(new) < n:
            token = int(np.argmax(torch_logits(model, ids)[-1]))
            if token in stop:
                break
            new.append(token)
            ids.append(token)
        out.append(new)
    return out


# -- the models ---------------------------------------------------------------------------------
def tiny_tokenizer():
    """A byte-level BPE tokenizer with ChatML specials (what lorakit's GGUF vocab writer takes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r")]
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet + ["".join(m) for m in merges])},
                                merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")


def spm_tokenizer(prepend_space: bool):
    """tests/ggufmodels.py's SentencePiece-style tokenizer (Llama 2 style, or Gemma's without the
    prefix space): trained there on a few sentences, byte fallback."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ggufmodels", _HERE.parent / "tests" / "ggufmodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.spm_tokenizer(prepend_space)


def tiny_model(family: str, tokenizer, vocab_size: int = 272):
    """A tiny random model of `family`, norms and biases non-trivial so that their handling shows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=family.startswith("gemma") or family == "qwen2",
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    extra = {"llama": {}, "qwen2": dict(rope_theta=1e6), "gemma": dict(head_dim=16),
             "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
             "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                 layer_types=["sliding_attention", "full_attention"])}[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.endswith("bias") or family.startswith("gemma")
                                                     else 1.0))
    return model


def random_adapter(model, out: Path, seed: int = 1, scale: float = 0.05) -> Path:
    """A rank-4 adapter on every linear layer, A and B random (B's std `scale` sets the change's size)."""
    import torch

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft.save_pretrained(out)
    return out


@dataclass
class Case:
    """One model with its files: the base on both sides, the adapter, the GGUFs written from them."""

    name: str
    folder: Path  # where its files go
    tuned: object  # lorakit PeftModel: the base (fp32) with the adapter; disable_adapter() gives the base
    base_gguf: Path  # the base llama.cpp runs the adapter GGUF on
    base_files: dict[str, Path]  # outtype -> the base written by lorakit in it (the merged rows' "without")
    adapter_dir: Path
    model_ref: str  # what merge_adapter_to_gguf takes as the base (a dir or built-in name)
    tokenizer: object
    ids: list[int]


def write_bases(model, tokenizer, folder: Path, outtypes=("f16", "q8_0")) -> dict[str, Path]:
    """The plain base `model` as a GGUF in each outtype (before any adapter wraps it)."""
    from lorakit.export.gguf_model import write_gguf_model

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for outtype in outtypes:
        files[outtype] = folder / f"base-{outtype}.gguf"
        write_gguf_model(model, tokenizer, files[outtype], outtype)
    return files


def tiny_case(family: str, work: Path) -> Case:
    import torch

    from lorakit.lora.peft_model import PeftModel

    folder = work / family
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, tokenizer)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    bases = write_bases(model, tokenizer, folder, ("f32", "f16", "q8_0"))
    adapter_dir = random_adapter(tiny_model(family, tokenizer), folder / "adapter")
    tuned = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.randint(0, len(tokenizer), (TINY_TOKENS,), generator=torch.Generator().manual_seed(2)).tolist()
    return Case(f"tiny {family}", folder, tuned, bases.pop("f32"), bases, adapter_dir, str(folder / "model"),
                tokenizer, ids)


def demo_prompts(tokenizer) -> tuple[list[list[int]], list[str]]:
    from lorakit.demo.run import find_data_dir, read_heldout

    prompts, references = read_heldout(find_data_dir() / "heldout.jsonl")
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts[:DEMO_PROMPTS]]
    ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
    return ids, references[:DEMO_PROMPTS]


def demo_adapter(folder: Path, steps: int) -> Path:
    """The demo task's recipe fine-tuned for `steps` steps (warmup no longer than the run)."""
    from lorakit.demo.run import demo_train_config, find_data_dir
    from lorakit.models.inference import quiet_loading
    from lorakit.train import train

    config = demo_train_config(find_data_dir(), folder / "adapter", max_steps=steps, quiet=True)
    print(f"fine-tuning SmolLM2-135M on the demo task: {steps} steps of {config.batch_size}", file=sys.stderr)
    with quiet_loading():
        result = train(config)
    return Path(result.adapter_dir)


def smollm_case(work: Path, steps: int) -> Case:
    """SmolLM2-135M: its own Q4_1 GGUF as the base; the adapter the demo task fine-tuned for `steps`
    steps, or (steps 0) a random rank-4 one."""
    from lorakit.models.embedded import builtin_gguf_path
    from lorakit.models.inference import load_for_inference

    folder = work / "smollm2"
    # the GGUFs written from the dense conversion (the same values as the blocks); the run compared
    # with llama.cpp is on the packed base, the default
    base, tokenizer = load_for_inference("smollm2-135m", [], dtype="float32", device="cpu", packed=False)
    bases = write_bases(base, tokenizer, folder)
    # a random adapter's change is made as large as a fine-tune's (logit rms ~3): the Q4_1 base's own
    # noise in llama.cpp (its activations are rounded to 8 bits) is ~0.3 rms
    adapter_dir = demo_adapter(folder, steps) if steps else random_adapter(base, folder / "adapter", scale=0.2)
    del base
    tuned, _ = load_for_inference("smollm2-135m", [adapter_dir], dtype="float32", device="cpu")
    tuned.eval()
    prompts, _ = demo_prompts(tokenizer)
    answer = '{"name":"Ada Byrne","guests":3,"day":"Sunday","time":"8:00pm"}<|im_end|>'
    ids = prompts[0] + tokenizer(answer, add_special_tokens=False)["input_ids"]
    name = f"SmolLM2-135M ({f'demo, {steps} steps' if steps else 'random r=4'})"
    return Case(name, folder, tuned, builtin_gguf_path("smollm2-135m"), bases, adapter_dir, "smollm2-135m",
                tokenizer, ids)


# -- the checks ---------------------------------------------------------------------------------
def base_logits(case: Case) -> np.ndarray:
    with case.tuned.disable_adapter():
        return torch_logits(case.tuned, case.ids)


def check_case(case: Case, dry_run: bool) -> list[Row]:
    from lorakit.export.gguf_adapter import export_gguf_adapter
    from lorakit.export.gguf_model import merge_adapter_to_gguf

    adapter_gguf = export_gguf_adapter(case.adapter_dir, case.folder / "adapter.gguf", base=case.base_gguf,
                                       overwrite=True)
    # check -> (the base llama.cpp runs alone, the model it runs with the adapter, the adapter GGUF)
    files = {"adapter": (case.base_gguf, case.base_gguf, adapter_gguf),
             "adapter, f16 base": (case.base_files["f16"], case.base_files["f16"], adapter_gguf)}
    for outtype, base in case.base_files.items():
        merged = merge_adapter_to_gguf(case.model_ref, case.adapter_dir, case.folder / f"merged-{outtype}.gguf",
                                       outtype=outtype, overwrite=True, modelfile=False).path
        files[f"merged {outtype}"] = (base, merged, None)
    if dry_run:
        return [dry_row(case.name, check, paths) for check, paths in files.items()]
    lk_base, lk_tuned = base_logits(case), torch_logits(case.tuned, case.ids)
    rows = []
    for check, (base, model, lora) in files.items():
        cpp_base = llama_logits(base, case.ids)
        cpp_tuned = llama_logits(model, case.ids, lora_path=lora)
        rows.append(compare(case.name, check, lk_base, lk_tuned, cpp_base, cpp_tuned))
    rows.append(tokenize_row(case.name, case.folder / "merged-f16.gguf", case.tokenizer))
    return rows


def tokenize_row(model: str, path: Path, tokenizer) -> Row:
    """The GGUF's tokenizer in llama.cpp against the transformers tokenizer it was written from."""
    got = llama_tokenize(path, TOKENIZE_TEXTS)
    want = [tokenizer(text).input_ids for text in TOKENIZE_TEXTS]
    row = Row(model, f"tokenize {path.stem}", top1=sum(g == w for g, w in zip(got, want)) / len(want))
    for text, g, w in zip(TOKENIZE_TEXTS, got, want):
        if g != w:
            row.failures.append(f"{text!r}: llama.cpp {tokenizer.convert_ids_to_tokens(g)}, "
                                f"transformers {tokenizer.convert_ids_to_tokens(w)}")
    return row


def sentencepiece_rows(work: Path, dry_run: bool) -> list[Row]:
    """Merged GGUFs of tiny models with SentencePiece-style tokenizers (llama.cpp's "llama" vocabulary):
    Llama 2's (a prefix space) and Gemma's (none); llama.cpp must tokenize as transformers does."""
    from lorakit.export.gguf_model import write_gguf_model

    rows = []
    for family, prepend in (("llama", True), ("gemma", False)):
        tokenizer = spm_tokenizer(prepend)
        path = work / f"spm-{family}" / "model-f16.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf_model(tiny_model(family, tokenizer, vocab_size=len(tokenizer)), tokenizer, path, "f16")
        name = f"tiny {family} (SentencePiece vocab)"
        rows.append(dry_row(name, "tokenize", (path,)) if dry_run else tokenize_row(name, path, tokenizer))
    return rows


def dry_row(name: str, check: str, paths: tuple[Path | None, ...]) -> Row:
    """--dry-run: each file opens with gguf-py and holds tensors; llama.cpp is not run."""
    import gguf

    row = Row(name, check + " (dry run)")
    for path in filter(None, paths):
        reader = gguf.GGUFReader(path)
        if not reader.tensors:
            row.failures.append(f"{path} holds no tensors")
    return row


def demo_rows(case: Case) -> list[Row]:
    """The demo prompts continued greedily by lorakit and by llama.cpp (merged f16; base + adapter)."""
    from lorakit.demo.task import score

    prompts, references = demo_prompts(case.tokenizer)
    ends = (case.tokenizer.eos_token_id, case.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    stop = {t for t in ends if t is not None}

    def text(runs):
        return [case.tokenizer.decode(r) for r in runs]

    reference = text(torch_greedy(case.tuned, prompts, stop))
    hits = sum(score(r, ref) for r, ref in zip(reference, references))
    print(f"demo: lorakit's greedy continuations ({hits}/{len(references)} are the reference JSON):", file=sys.stderr)
    for line in reference:
        print(f"  {line}", file=sys.stderr)
    merged, adapter = case.folder / "merged-f16.gguf", case.folder / "adapter.gguf"
    return [compare_texts(case.name, "demo greedy: merged f16", reference, text(llama_greedy(merged, prompts, stop))),
            compare_texts(case.name, "demo greedy: base + adapter", reference,
                          text(llama_greedy(case.base_gguf, prompts, stop, lora_path=adapter)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="write and check the files; do not run llama.cpp")
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny random models")
    parser.add_argument("--smollm-only", action="store_true", help="only SmolLM2 (and the demo check)")
    parser.add_argument("--steps", type=int, default=30,
                        help="demo fine-tune steps for SmolLM2 (default 30, half the recipe; "
                             "0: a random adapter, no demo check)")
    parser.add_argument("--work", type=Path, default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args(argv)
    if not args.dry_run:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("benchmarks/interop.py: llama_cpp is not importable; `make interop` builds llama-cpp-python, "
                  "or pass --dry-run", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="lorakit-interop-") as tmp:
        work = args.work or Path(tmp)
        rows: list[Row] = []
        for family in () if args.smollm_only else TINY_FAMILIES:
            print(f"tiny {family} ...", file=sys.stderr)
            rows += check_case(tiny_case(family, work), args.dry_run)
        if not args.smollm_only:
            print("tiny SentencePiece vocabularies ...", file=sys.stderr)
            rows += sentencepiece_rows(work, args.dry_run)
        if not args.tiny_only:
            case = smollm_case(work, args.steps)
            rows += check_case(case, args.dry_run)
            if args.steps and not args.dry_run:
                rows += demo_rows(case)
    print(format_table(rows))
    failed = [f"{r.model} / {r.check}: {f}" for r in rows for f in r.failures]
    for line in failed:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
