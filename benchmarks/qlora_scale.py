"""QLoRA at scale: an 8B-shaped (or 1B-shaped) Llama fine-tuned on a CPU machine, load and step memory.

The checkpoint has random bf16 weights (normal, std 0.02; norms 1) in the published shapes, written
once to --dir as safetensors shards of about 2 GB, generated shard by shard (never the whole model
in memory), with an index, a config.json and a tiny tokenizer (the batch is random token ids):

- `8b`: meta-llama/Llama-3.1-8B's config.json (hidden 4096, intermediate 14336, 32 layers, 32 heads,
  8 kv heads, vocab 128256, rope_theta 500000, llama3 rope_scaling, untied head): 16 GB.
- `1b`: meta-llama/Llama-3.2-1B's config.json (hidden 2048, intermediate 8192, 16 layers, 32 heads,
  8 kv heads, vocab 128256, llama3 rope_scaling factor 32, tied embeddings): 2.5 GB.
- `tiny`: the same layout at toy size, for the smoke test.

Each contender runs in its own process: LoRA r=16, alpha 32 on q/k/v/o, batch 1 x 512 random
tokens, gradient checkpointing, AdamW (lr 2e-4), --steps steps (default 2), the first step timed
too (there is no warm-up at this size). Reported: load seconds and the peak RSS at the end of
loading, the median step seconds and the peak RSS of the whole run (ru_maxrss), beside
`lorakit.estimate`'s figure for the same run. A contender killed (out of memory: the kernel's
OOM killer sends SIGKILL), failing or past --time-limit is a row saying so.

- `lorakit-qlora`: `lorakit.load_model(dir, dtype="bfloat16", quantization=QuantConfig("nf4",
  double_quant=True))` (streamed: never the bf16 model), `get_peft_model`, each step
  `fast.loss.causal_lm_loss` (the fused chunked head loss lorakit's trainer uses).
- `lorakit-bf16`: the same with the bf16 base loaded whole.
- `peft-bnb`: transformers `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
  quant, bf16 compute), device_map="cpu")`, transformers' gradient checkpointing and
  `enable_input_require_grads` (no fp32 upcast of embeddings and head), `peft.get_peft_model`,
  transformers' own loss from `labels`.

    python benchmarks/qlora_scale.py --shape 1b --dir /data/llama-1b-shaped        # ~2.5 GB written once
    python benchmarks/qlora_scale.py --shape 8b --dir /data/llama-8b-shaped        # ~16 GB written once
    python benchmarks/qlora_scale.py --shape 8b --dir DIR --only lorakit-qlora --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import _plain_step  # noqa: E402  (the forward of a PEFT user's loop)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA, LR = 16, 32, 2e-4
SEQ = 512
STD = 0.02
GB = 1e9

_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
           "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
           "initializer_range": 0.02, "max_position_embeddings": 131072, "mlp_bias": False, "pretraining_tp": 1,
           "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "use_cache": True,
           "vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8}
# meta-llama/Llama-3.1-8B and meta-llama/Llama-3.2-1B, config.json as published on the Hugging Face hub
SHAPES: dict[str, dict] = {
    "8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "tie_word_embeddings": False,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
           "tie_word_embeddings": True,
           "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    "tiny": {**_LLAMA3, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1,
             "max_position_embeddings": 1024, "tie_word_embeddings": False,
             "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 256, "rope_type": "llama3"}},
}
SHARD_BYTES = {"8b": 2 * 10**9, "1b": 2 * 10**9, "tiny": 100_000}


# -- the checkpoint ------------------------------------------------------------------------------
def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama checkpoint, in transformers' order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def plan_shards(shapes: dict[str, tuple[int, ...]], limit: int) -> list[list[str]]:
    """Consecutive tensors grouped into shards of at most `limit` bf16 bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(shape: str, directory: Path) -> bool:
    """Write the `shape` checkpoint into `directory` unless it is there complete; True when written.

    Shards are written beside and renamed in, config.json last, so a killed run resumes where it
    stopped (each shard's random numbers come from its own seed: the same bytes either way).
    """
    import torch
    from safetensors.torch import save_file

    config = SHAPES[shape]
    shapes = tensor_shapes(config)
    shards = plan_shards(shapes, SHARD_BYTES[shape])
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    if _complete(directory, config, names):
        return False
    if (directory / "config.json").is_file():
        raise SystemExit(f"{directory} holds another checkpoint (its config.json differs); choose another --dir")
    directory.mkdir(parents=True, exist_ok=True)
    for k, (keys, name) in enumerate(zip(shards, names)):
        if (directory / name).is_file():
            continue
        gen = torch.Generator().manual_seed(k)
        tensors = {key: _random(shapes[key], key, gen) for key in keys}  # one shard (~2 GB) at a time
        save_file(tensors, directory / f".{name}.tmp", metadata={"format": "pt"})
        os.replace(directory / f".{name}.tmp", directory / name)
        del tensors
        print(f"wrote {name} ({k + 1}/{len(shards)})", file=sys.stderr, flush=True)
    weight_map = {key: name for keys, name in zip(shards, names) for key in keys}
    total = sum(2 * _numel(s) for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _write_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return True


def _complete(directory: Path, config: dict, names: list[str]) -> bool:
    path = directory / "config.json"
    return (path.is_file() and json.loads(path.read_text()) == config
            and all((directory / n).is_file() for n in names))


def _random(shape: tuple[int, ...], key: str, gen) -> "torch.Tensor":  # noqa: F821
    import torch

    if key.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    for row in range(0, shape[0], 1024):  # fp32 noise a block of rows at a time
        block = out[row : row + 1024]
        block.copy_(torch.randn(block.shape, generator=gen).mul_(STD))
    return out


def _write_tokenizer(directory: Path) -> None:
    """A byte-level tokenizer (the batch is random ids; load_model wants a tokenizer beside the model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="Ā", pad_token="Ā").save_pretrained(directory)


# -- contenders: each loads its model and returns the step's loss ----------------------------------
StepLoss = Callable[[], "torch.Tensor"]  # noqa: F821


def _batch(vocab: int) -> dict:
    import torch

    ids = torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _lorakit_load(quantize: bool):
    def load(directory: str):
        from lorakit import QuantConfig, load_model

        config = QuantConfig(quant_type="nf4", double_quant=True) if quantize else None
        return load_model(directory, dtype="bfloat16", device="cpu", quantization=config)[0]
    return load


def _lorakit_train(base, batch: dict) -> StepLoss:
    """lorakit as its trainer runs a step: CPU allocator, checkpointing, the fused chunked loss."""
    import torch

    from lorakit import LoraConfig, get_peft_model
    from lorakit.fast.allocator import prepare_cpu_training
    from lorakit.fast.loss import causal_lm_loss

    prepare_cpu_training(gradient_checkpointing=True)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
    n_target = int((batch["labels"][:, 1:] != -100).sum())
    return lambda: causal_lm_loss(model, batch, chunk=256)[0] / n_target


def _bnb_load(directory: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb, dtype=torch.bfloat16,
                                                device_map="cpu")


def _peft_train(base, batch: dict) -> StepLoss:
    import peft
    import torch

    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                      lora_dropout=0.0))
    return _plain_step(model, batch)


@dataclass(frozen=True)
class Contender:
    label: str
    load: Callable[[str], object]  # directory -> the base model
    train: Callable[..., StepLoss]  # (base, batch) -> the step's loss
    method: str  # lorakit.estimate's method for the same run


CONTENDERS = {
    "lorakit-qlora": Contender("lorakit QLoRA (streamed NF4 + double quant)", _lorakit_load(True), _lorakit_train,
                               "qlora"),
    "lorakit-bf16": Contender("lorakit LoRA, bf16 base", _lorakit_load(False), _lorakit_train, "lora"),
    "peft-bnb": Contender("PEFT + transformers + bitsandbytes NF4", _bnb_load, _peft_train, "qlora"),
}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _emit(record: dict) -> None:
    """One JSON line per finished phase, so a run killed later still reports what it did."""
    print(json.dumps(record), flush=True)


def run_contender(name: str, directory: str, steps: int) -> None:
    import torch

    contender = CONTENDERS[name]
    start = time.perf_counter()
    base = contender.load(directory)
    _emit({"phase": "load", "load_s": time.perf_counter() - start, "load_peak_gb": _peak_gb()})
    base.train()
    step_loss = contender.train(base, _batch(base.config.vocab_size))
    params = [p for p in base.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t)
    _emit({"phase": "train", "step_s": statistics.median(times), "peak_gb": _peak_gb(), "losses": losses,
           "trainable": sum(p.numel() for p in params)})


# -- the parent: one process per contender, then the table ---------------------------------------
def measure(name: str, directory: Path, steps: int, time_limit: float) -> dict:
    """The contender's figures; `status` says how it ended ("ok", "killed (out of memory?)", ...)."""
    cmd = [sys.executable, __file__, "--contender", name, "--dir", str(directory), "--steps", str(steps)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=time_limit)
        stdout, stderr, code = out.stdout, out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, code = "", None
    result: dict = {"name": name}
    for line in stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    if code is None:
        result["status"] = f"over the time limit ({time_limit:.0f} s)"
    elif code < 0:
        result["status"] = "killed (out of memory?)" if code == -9 else f"killed by signal {-code}"
    elif code != 0:
        last = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        result["status"] = "failed: " + (last[-1][:120] if last else f"exit {code}")
        if "out of memory" in stderr.lower() or "MemoryError" in stderr:
            result["status"] = "out of memory: " + result["status"].removeprefix("failed: ")
    else:
        result["status"] = "ok"
    return result


def estimate_gb(directory: Path, method: str) -> float:
    from lorakit import estimate

    est = estimate(str(directory), method, rank=RANK, alpha=ALPHA, targets=TARGETS, batch_size=1, seq_len=SEQ,
                   dtype="bf16", optimizer="adamw", gradient_checkpointing=True)
    return est.memory.total / GB


def table(results: list[dict]) -> str:
    def fig(r: dict, key: str, fmt: str = ".2f") -> str:
        return format(r[key], fmt) if key in r else "–"

    lines = ["| contender | result | load (s) | load peak RSS (GB) | step (s) | training peak RSS (GB) "
             "| `lorakit estimate` (GB) | losses |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        losses = " ".join(f"{x:.4f}" for x in r.get("losses", []))
        lines.append(f"| {CONTENDERS[r['name']].label} | {r['status']} | {fig(r, 'load_s', '.1f')} "
                     f"| {fig(r, 'load_peak_gb')} | {fig(r, 'step_s', '.1f')} | {fig(r, 'peak_gb')} "
                     f"| {fig(r, 'estimate_gb')} | {losses} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="1b", help="checkpoint shape (default: 1b)")
    parser.add_argument("--dir", required=True, type=Path, help="where the checkpoint is (written once if absent)")
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS), help="run only these contenders")
    parser.add_argument("--steps", type=int, default=2, help="training steps per contender (default: 2)")
    parser.add_argument("--time-limit", type=float, default=3600, metavar="S",
                        help="seconds a contender may run before it is stopped and reported (default: 3600)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)  # internal: run one, print JSON lines
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.contender:
        run_contender(args.contender, str(args.dir), args.steps)
        return 0
    if write_checkpoint(args.shape, args.dir):
        print(f"wrote the {args.shape}-shaped checkpoint to {args.dir}", file=sys.stderr)
    results = []
    for name in args.only or list(CONTENDERS):
        print(f"running {name} …", file=sys.stderr, flush=True)
        result = measure(name, args.dir, args.steps, args.time_limit)
        result["estimate_gb"] = estimate_gb(args.dir, CONTENDERS[name].method)
        results.append(result)
    print(f"{args.shape}-shaped Llama, LoRA r={RANK} on {', '.join(TARGETS)}, batch 1 x {SEQ}, gradient "
          f"checkpointing, AdamW, {args.steps} steps")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
