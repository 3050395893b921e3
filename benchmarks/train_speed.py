"""Training step speed and memory: lorakit against PEFT + transformers, side by side.

Wall-clock figures on a shared machine move with its load; the CPU seconds of each step
(process time, all threads) are the steadier comparison and are printed beside them.

Each contender runs in its own fresh process (so each peak RSS is its own) on the same data,
seed and initial adapter weights: SmolLM2-135M (the embedded model) in fp32, r=16, alpha=32 on
all seven projections, dropout 0, batch 4 x 256 tokens, AdamW, 2 warm-up steps then the median
of the timed steps.

    python benchmarks/train_speed.py            # all contenders, prints the markdown table
    python benchmarks/train_speed.py --steps 5  # timed steps per contender (default 5)
    python benchmarks/train_speed.py --only peft-bf16 lorakit-bf16 --warmup 1 --steps 1  # slow bf16 CPUs
    python benchmarks/train_speed.py --rounds 3 # each contender 3 times, alternating; medians
    python benchmarks/train_speed.py --prompt-share 0.65  # instruction tuning: no loss on the
                                                          # first 65 % of each row (a prompt)

`lorakit-medium` is lorakit with the frozen base weights' products at torch's matmul precision
"medium" (`lorakit.frozen_matmul_precision`: bf16 operands, fp32 accumulation, on CPUs with AMX;
TF32 on NVIDIA GPUs); `--matmul-precision` instead sets torch's own process-wide precision for
every contender.

`lorakit-plain` is lorakit used only through PEFT's API, as a PEFT user's loop is written:
`model = get_peft_model(base, config)`, then each step `model(input_ids=..., attention_mask=...,
labels=...).loss.backward()`, `optimizer.step()`, `optimizer.zero_grad()` (AdamW over the trainable
parameters); the library does the rest (the fused head + loss, and the CPU caching allocator at
the first training forward). `peft` already is that loop with `import peft` (it loads the initial
adapter from its file instead of calling `get_peft_model`, outside the timed steps), so it is the
reference for `lorakit-plain`; `plain_vs_train_step` compares lorakit's plain step with its
trainer's (`lorakit`).

`trainer` is transformers.Trainer through `lorakit.integrations.Trainer` over `get_peft_model`,
`peft-trainer` PEFT in the plain transformers.Trainer: the same batch (its 4 rows are the dataset),
fp32, AdamW at the loop's settings (constant lr 2e-4, weight decay 0.01, no clipping), each step
timed by a callback from `on_step_begin` to `on_step_end`.

`peft-bf16`, `lorakit-bf16` and `lorakit-plain-bf16` are `peft`, `lorakit` and `lorakit-plain` with
the base loaded in bfloat16; the adapters stay fp32 in all three (PEFT's autocast_adapter_dtype).
Their losses differ from the fp32 ones by bf16 rounding; `bf16_loss_rel_diff` compares lorakit's with
PEFT's, both in bf16. The summary line shows a ratio when a contender it is about ran, nan where
the other one did not.

QLoRA rows: `lorakit-qlora` and `lorakit-plain-qlora` (trainer step and plain API loop) run on
lorakit's own 4-bit base, `load_model(..., quantization=QuantConfig("nf4", double_quant=True,
compute_dtype=bfloat16))`: every decoder linear in NF4 with double quant, blocksize 64, the head
and embeddings kept dense. `peft-qlora` is PEFT + transformers + bitsandbytes at the same settings
(`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=bfloat16)`, device_map="cpu"), its adapter loaded from the same initial
file, the plain loop; no `prepare_model_for_kbit_training` (it would upcast the kept weights to
fp32 and turn on gradient checkpointing, which no other row has). The model's kept weights
(embeddings, norms, head) are in the compute dtype: bf16 for these three, fp32 for their `-fp32`
twins (`lorakit-qlora-fp32`, `lorakit-plain-qlora-fp32`, `peft-qlora-fp32`, compute fp32). Both
libraries quantize the same weights to the same bytes; their losses differ by how each rounds the
de-quantized weight and the products (bf16 noise), so `qlora_loss_rel_diff` compares lorakit's
with PEFT's at each compute dtype. On a CPU without 16-bit matrix instructions lorakit multiplies
bf16 values in fp32 (`bases.compute`) while bitsandbytes calls bf16 kernels, which such a CPU
emulates slowly: `--only peft-qlora --warmup 0 --steps 1` then takes minutes.

By default every position has a label (the workload of issue #4). With --prompt-share, as in
instruction tuning with the prompt masked out (the demo's data: 35 % of tokens are answers),
the first part of each row has label -100 for every contender.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, WARMUP = 4, 256, 2


def _batch(vocab: int, prompt_share: float = 0.0):
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, : round(prompt_share * SEQ)] = -100  # the prompt: no loss there
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _fresh_adapter(base):
    """`get_peft_model(base, config)` from lorakit at seed 0, as a user calls it: the initial adapter.

    `_make_initial_adapter` saves what this returns, so `lorakit-plain` (which calls it too) starts
    from the same weights as the contenders that load the file.
    """
    import torch

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))


# -- loading the base: dense, or in 4 bits (each contender names its loader) --------------------
MODEL = "smollm2-135m"  # --model: another one (a tiny model directory for a quick check)


def _dense(model: str, dtype: str):
    from lorakit.models import load_model

    return load_model(model, dtype=dtype, device="cpu", packed=False)[0]


def _lorakit_4bit(model: str, dtype: str):
    """lorakit's NF4 + double quant base (QuantConfig's defaults), products in `dtype`."""
    from lorakit import QuantConfig
    from lorakit.models import load_model

    config = QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=dtype)
    return load_model(model, dtype=dtype, device="cpu", quantization=config)[0]


def _bitsandbytes_4bit(model: str, dtype: str):
    """transformers + bitsandbytes' NF4 + double quant base, products in `dtype` (bitsandbytes on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.models.load import resolve_model_path

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=getattr(torch, dtype))
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(model), quantization_config=config,
                                                dtype=getattr(torch, dtype), device_map="cpu")


def _make_initial_adapter(directory: str, model_name: str = MODEL) -> None:
    """The adapter every LoRA contender starts from (lorakit's init, saved in PEFT's format)."""
    from lorakit.models import load_model

    model, _ = load_model(model_name, dtype="float32", device="cpu", packed=False)
    _fresh_adapter(model).save_pretrained(directory)


# -- contenders: each builds its model in place on the base and returns the step's loss ----------
# The loss is the mean next-token cross-entropy over the positions with a label, for every one.
StepLoss = Callable[[], "torch.Tensor"]  # noqa: F821 (torch is imported in the contender's process)


def _plain_step(model, batch: dict) -> StepLoss:
    """The forward of a PEFT user's loop: transformers' own loss from `labels`."""
    return lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss


def _peft(gradient_checkpointing: bool = False):
    """PEFT from the initial adapter's file; a PEFT user's plain loop (fp32 adapters on any base)."""
    def build(base, batch: dict, adapter_dir: str) -> StepLoss:
        import peft

        if gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)  # autocast_adapter_dtype
        return _plain_step(model, batch)
    return build


def _lorakit(memory: bool = False, level: str = "highest"):
    """lorakit as its trainer runs a step: CPU allocator, fused chunked loss, precision scope."""
    def build(base, batch: dict, adapter_dir: str) -> StepLoss:
        from lorakit import PeftModel, frozen_matmul_precision
        from lorakit.fast.allocator import prepare_cpu_training
        from lorakit.fast.loss import causal_lm_loss

        prepare_cpu_training(gradient_checkpointing=memory)  # as lorakit's trainer does
        if memory:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        n_target = int((batch["labels"][:, 1:] != -100).sum())

        def step_loss():
            with frozen_matmul_precision(level):  # backward keeps the level its forward ran at
                return causal_lm_loss(model, batch, chunk=256)[0] / n_target
        return step_loss
    return build


def _lorakit_plain(base, batch: dict, adapter_dir: str) -> StepLoss:
    """lorakit through PEFT's API only: `get_peft_model`, then the same loop as PEFT's contender."""
    return _plain_step(_fresh_adapter(base), batch)


def _full(base, batch: dict, adapter_dir: str) -> StepLoss:
    for p in base.parameters():
        p.requires_grad_(True)
    return _plain_step(base, batch)


def _floor(base, batch: dict, adapter_dir: str) -> StepLoss:
    for p in base.parameters():
        p.requires_grad_(False)
    embed = base.get_input_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}

    def step_loss():
        embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
        return base(inputs_embeds=embeds, **inputs).loss
    return step_loss


# -- transformers.Trainer contenders: the whole loop is Trainer's, timed step by step ---------------
def _trainer(lorakit: bool):
    """transformers.Trainer on the same batch (its 4 rows are the dataset: one epoch a step), AdamW at the loop's
    settings (lr 2e-4, weight decay 0.01, constant lr, no clipping): `lorakit.integrations.Trainer`
    over `get_peft_model`, or the plain `transformers.Trainer` over PEFT from the initial adapter."""
    def run(base, batch: dict, adapter_dir: str, steps: int) -> tuple[list[float], list[float], list[float]]:
        import transformers

        if lorakit:
            from lorakit.integrations import Trainer
            model = _fresh_adapter(base)
        else:
            import peft
            Trainer = transformers.Trainer
            model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        rows = [{k: v[i].tolist() for k, v in batch.items()} for i in range(BATCH)]
        out = tempfile.TemporaryDirectory()
        args = transformers.TrainingArguments(
            out.name, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=2e-4,
            weight_decay=0.01, lr_scheduler_type="constant", max_grad_norm=0.0, optim="adamw_torch",
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False)
        clock = _step_clock()
        with out:
            Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock]).train()
        return clock.times, clock.cpu_times, clock.losses
    return run


def _step_clock():
    import transformers

    class StepClock(transformers.TrainerCallback):
        """Each optimizer step's wall and CPU seconds, and the losses Trainer logs."""

        def __init__(self) -> None:
            self.times, self.cpu_times, self.losses = [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start[0])
            self.cpu_times.append(time.process_time() - self._start[1])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
    return StepClock()


@dataclass(frozen=True)
class Contender:
    label: str  # the table's row name
    build: Callable[..., StepLoss] | None  # (base, batch, adapter_dir) -> the step's loss
    dtype: str = "float32"  # the base's (a 4-bit base's compute dtype); adapters are fp32 in every LoRA contender
    load: Callable[[str, str], "nn.Module"] = _dense  # noqa: F821 (model, dtype) -> the base model
    # instead of build, a whole loop: (base, batch, adapter_dir, steps) -> (step s, CPU s, losses) per step
    loop: Callable[..., tuple[list[float], list[float], list[float]]] | None = None


CONTENDERS = {
    "peft": Contender("PEFT 0.21 + transformers (reference)", _peft()),
    "lorakit": Contender("lorakit default", _lorakit()),
    "lorakit-memory": Contender("lorakit memory mode (checkpointing + chunked loss)", _lorakit(memory=True)),
    "lorakit-medium": Contender("lorakit, frozen products at matmul precision medium (bf16 on AMX)",
                                _lorakit(level="medium")),
    "peft-gc": Contender("PEFT + transformers gradient checkpointing", _peft(gradient_checkpointing=True)),
    "full": Contender("full fine-tuning (transformers)", _full),
    "floor": Contender("floor: frozen base forward + backward to inputs", _floor),
    "lorakit-plain": Contender("lorakit plain API (get_peft_model, the loop PEFT's row runs)", _lorakit_plain),
    "peft-bf16": Contender("PEFT + transformers, bf16 base, fp32 adapters", _peft(), "bfloat16"),
    "lorakit-bf16": Contender("lorakit default, bf16 base, fp32 adapters", _lorakit(), "bfloat16"),
    "lorakit-plain-bf16": Contender("lorakit plain API, bf16 base, fp32 adapters", _lorakit_plain, "bfloat16"),
    "peft-qlora": Contender("PEFT + bitsandbytes QLoRA (NF4, double quant, bf16 compute)", _peft(), "bfloat16",
                            _bitsandbytes_4bit),
    "lorakit-qlora": Contender("lorakit QLoRA (NF4, double quant, bf16 compute)", _lorakit(), "bfloat16",
                               _lorakit_4bit),
    "lorakit-plain-qlora": Contender("lorakit QLoRA plain API (NF4, double quant, bf16 compute)", _lorakit_plain,
                                     "bfloat16", _lorakit_4bit),
    "peft-qlora-fp32": Contender("PEFT + bitsandbytes QLoRA (NF4, double quant, fp32 compute)", _peft(), "float32",
                                 _bitsandbytes_4bit),
    "lorakit-qlora-fp32": Contender("lorakit QLoRA (NF4, double quant, fp32 compute)", _lorakit(), "float32",
                                    _lorakit_4bit),
    "lorakit-plain-qlora-fp32": Contender("lorakit QLoRA plain API (NF4, double quant, fp32 compute)",
                                          _lorakit_plain, "float32", _lorakit_4bit),
    "trainer": Contender("lorakit in transformers.Trainer (lorakit.integrations.Trainer)", None, loop=_trainer(True)),
    "peft-trainer": Contender("PEFT in transformers.Trainer", None, loop=_trainer(False)),
}


def _run(name: str, adapter_dir: str, steps: int, prompt_share: float = 0.0, precision: str = "highest",
         warmup: int = WARMUP, model: str = MODEL) -> dict:
    import torch

    contender = CONTENDERS[name]
    torch.set_float32_matmul_precision(precision)  # the same for every contender
    torch.manual_seed(0)
    base = contender.load(model, contender.dtype)
    base.train()
    batch = _batch(base.config.vocab_size, prompt_share)
    if contender.loop is not None:
        times, cpu_times, losses = contender.loop(base, batch, adapter_dir, warmup + steps)
        return _result(name, times[warmup:], cpu_times[warmup:], losses)
    step_loss = contender.build(base, batch, adapter_dir)

    params = [p for p in base.parameters() if p.requires_grad]  # both libraries adapt the base in place
    optimizer = torch.optim.AdamW(params, lr=2e-4) if params else None
    times, cpu_times, losses = [], [], []
    for step in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step_loss()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        value = float(loss)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(value)
        if step >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    return _result(name, times, cpu_times, losses)


def _result(name: str, times: list[float], cpu_times: list[float], losses: list[float]) -> dict:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_s = statistics.median(times)
    return {
        "name": name,
        "step_s": step_s,
        "cpu_s": statistics.median(cpu_times),
        "tokens_per_s": BATCH * SEQ / step_s,
        "peak_rss_gb": peak_kb / 1024**2,
        "losses": losses,
    }


def _median_run(runs: list[dict]) -> dict:
    """One contender over several rounds: the median of each figure, the first round's losses."""
    merged = dict(runs[0])
    for key in ("step_s", "cpu_s", "tokens_per_s", "peak_rss_gb"):
        merged[key] = statistics.median(r[key] for r in runs)
    return merged


def _table(results: dict[str, dict]) -> str:
    lines = [
        "| contender | tokens/s | step (s) | CPU s/step | peak RSS (GB) | losses (warm-up, then timed) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        losses = " ".join(f"{x:.4f}" for x in r["losses"])
        lines.append(
            f"| {CONTENDERS[name].label} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['cpu_s']:.2f} "
            f"| {r['peak_rss_gb']:.2f} | {losses} |"
        )
    return "\n".join(lines)


def _loss_rel_diff(reference: list[float], other: list[float]) -> float:
    """The largest relative difference of two loss curves, step by step."""
    return max(abs(a - b) / abs(a) for a, b in zip(reference, other))


def _summary(results: dict[str, dict]) -> str:
    """The ratios docs quote: each shows when a contender it is about ran, nan where the other did not."""
    def fig(name: str, key: str) -> float:
        return results[name][key] if name in results else math.nan

    def speed(a: str, b: str) -> float:
        return fig(a, "tokens_per_s") / fig(b, "tokens_per_s")

    def peak(a: str, b: str) -> float:
        return fig(a, "peak_rss_gb") / fig(b, "peak_rss_gb")

    def step(a: str, b: str) -> float:
        return fig(a, "step_s") / fig(b, "step_s")

    def cpu(a: str, b: str) -> float:
        return fig(a, "cpu_s") / fig(b, "cpu_s")

    def loss(a: str, reference: str) -> float:
        if a not in results or reference not in results:
            return math.nan
        return _loss_rel_diff(results[reference]["losses"], results[a]["losses"])

    figures = [  # (key, the contenders that call for it, value, format)
        ("speed_vs_peft", ("lorakit",), speed("lorakit", "peft"), ".2f"),
        ("memory_vs_peft", ("lorakit",), peak("lorakit", "peft"), ".2f"),
        ("floor_ratio", ("lorakit",), step("lorakit", "floor"), ".2f"),
        ("loss_rel_diff", ("lorakit",), loss("lorakit", "peft"), ".1e"),
        ("cpu_speed_vs_peft", ("lorakit",), cpu("peft", "lorakit"), ".2f"),
        ("cpu_floor_ratio", ("lorakit",), cpu("lorakit", "floor"), ".2f"),
        ("medium_speed_vs_peft", ("lorakit-medium",), speed("lorakit-medium", "peft"), ".2f"),
        ("medium_loss_rel_diff", ("lorakit-medium",), loss("lorakit-medium", "peft"), ".1e"),
        ("memory_mode_vs_peft", ("lorakit-memory",), peak("lorakit-memory", "peft"), ".2f"),
        ("memory_mode_speed_vs_peft_gc", ("lorakit-memory", "peft-gc"), speed("lorakit-memory", "peft-gc"), ".2f"),
        ("plain_speed_vs_peft", ("lorakit-plain",), speed("lorakit-plain", "peft"), ".2f"),
        ("plain_memory_vs_peft", ("lorakit-plain",), peak("lorakit-plain", "peft"), ".2f"),
        ("plain_vs_train_step", ("lorakit-plain",), step("lorakit-plain", "lorakit"), ".2f"),
        ("plain_loss_rel_diff", ("lorakit-plain",), loss("lorakit-plain", "peft"), ".1e"),
        ("trainer_speed_vs_peft_trainer", ("trainer",), speed("trainer", "peft-trainer"), ".2f"),
        ("trainer_memory_vs_peft_trainer", ("trainer",), peak("trainer", "peft-trainer"), ".2f"),
        ("trainer_vs_train_step", ("trainer",), step("trainer", "lorakit"), ".2f"),
        ("trainer_loss_rel_diff", ("trainer",), loss("trainer", "peft-trainer"), ".1e"),
        ("bf16_speed_vs_peft", ("lorakit-bf16", "peft-bf16"), speed("lorakit-bf16", "peft-bf16"), ".2f"),
        ("bf16_memory_vs_peft", ("lorakit-bf16", "peft-bf16"), peak("lorakit-bf16", "peft-bf16"), ".2f"),
        ("bf16_loss_rel_diff", ("lorakit-bf16", "peft-bf16"), loss("lorakit-bf16", "peft-bf16"), ".1e"),
        ("plain_bf16_speed_vs_peft", ("lorakit-plain-bf16",), speed("lorakit-plain-bf16", "peft-bf16"), ".2f"),
        ("plain_bf16_memory_vs_peft", ("lorakit-plain-bf16",), peak("lorakit-plain-bf16", "peft-bf16"), ".2f"),
        ("plain_bf16_vs_train_step", ("lorakit-plain-bf16",), step("lorakit-plain-bf16", "lorakit-bf16"), ".2f"),
        ("plain_bf16_loss_rel_diff", ("lorakit-plain-bf16",), loss("lorakit-plain-bf16", "peft-bf16"), ".1e"),
    ]
    # QLoRA at bf16 and fp32 compute: lorakit's trainer step and plain loop against PEFT + bitsandbytes
    for suffix in ("", "-fp32"):
        ref, key = f"peft-qlora{suffix}", suffix.replace("-", "_")
        for mode, label in (("", "lorakit"), ("plain_", "lorakit-plain")):
            me = f"{label}-qlora{suffix}"
            figures += [
                (f"{mode}qlora{key}_speed_vs_peft", (me,), speed(me, ref), ".2f"),
                (f"{mode}qlora{key}_memory_vs_peft", (me,), peak(me, ref), ".2f"),
                (f"{mode}qlora{key}_loss_rel_diff", (me,), loss(me, ref), ".1e"),
            ]
    return " ".join(f"{key}={value:{fmt}}" for key, about, value, fmt in figures if results.keys() & set(about))


def run_contender(script: str, name: str, argv: list[str]) -> dict:
    """`script --contender name argv...` in a fresh process (its peak RSS its own): the JSON figures it
    prints last; its stderr and a SystemExit naming it when it fails."""
    out = subprocess.run([sys.executable, script, "--contender", name, *argv], capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(f"contender {name} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from lorakit.fast.precision import LEVELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps first (default %(default)s)")
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS), help="run only these contenders")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every contender this many times, alternating, and report the medians")
    parser.add_argument("--prompt-share", type=float, default=0.0,
                        help="share of each row (from its start) without labels, as a masked prompt")
    parser.add_argument("--matmul-precision", choices=LEVELS, default="highest",
                        help="torch.set_float32_matmul_precision for every contender (medium: bf16 products "
                             "on CPUs with AMX, TF32 on NVIDIA GPUs)")
    parser.add_argument("--model", default=MODEL, help="the base model (default %(default)s; the docs' tables use it)")
    parser.add_argument("--contender", help=argparse.SUPPRESS)  # internal: run one, print JSON
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 <= args.prompt_share < 1:
        parser.error(f"--prompt-share {args.prompt_share}: must be at least 0 and below 1 (some positions need labels)")

    if args.contender:
        print(json.dumps(_run(args.contender, args.adapter_dir, args.steps, args.prompt_share, args.matmul_precision,
                              args.warmup, args.model)))
        return 0

    names = args.only or list(CONTENDERS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        _make_initial_adapter(tmp, args.model)
        for round_ in range(args.rounds):
            for name in names:
                print(f"round {round_ + 1}/{args.rounds}: running {name} …", file=sys.stderr, flush=True)
                runs[name].append(run_contender(__file__, name, [
                    "--adapter-dir", tmp, "--steps", str(args.steps), "--warmup", str(args.warmup),
                    "--model", args.model, "--prompt-share", str(args.prompt_share),
                    "--matmul-precision", args.matmul_precision]))
    results = {name: _median_run(rs) for name, rs in runs.items()}
    print(_table(results))
    summary = _summary(results)
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
