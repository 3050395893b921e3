"""Training on the GGUF blocks: the packed base against the dense cached conversion.

The embedded SmolLM2-135M Q4_1 GGUF is loaded two ways: `dense` converts it to fp32 tensors (the
cached conversion, `load_model("smollm2-135m")`), `packed` keeps every decoder linear as the file's
Q4_1 blocks and de-quantizes inside the products (`load_model("smollm2-135m", packed=True)`,
`bases.gguf_linear`). Both train the same LoRA as benchmarks/train_speed.py's `lorakit` row (its
helpers: r=16, alpha=32, all seven projections, batch 4 x 256, AdamW, lorakit's trainer step),
each contender in its own fresh process, rounds alternating, medians reported.

Figures: step time, CPU seconds a step (process time, all threads: steadier on a shared machine),
peak RSS of the process, and the load's resident memory (RSS after the load and one short forward,
which reads every weight, minus RSS before the load; and the bytes the model's tensors hold), the
load time, and greedy decoding speed (the bare base, batch 1, 32 new tokens). `packed_step_vs_dense`
is the packed step's median over the dense one's: the issue's rule makes packed the default when it
is at most 1.10.

    python benchmarks/packed_speed.py                         # 3 rounds, 2 warm-up + 5 timed steps
    python benchmarks/packed_speed.py --rounds 1 --warmup 1 --steps 2   # a quick look
    python benchmarks/packed_speed.py --threads 1   # torch on one thread in both contenders

On a machine whose cores are busy with other work, every parallel operation waits at the thread
pool's barrier for a descheduled thread (a time slice each), which swamps the work itself; with
`--threads 1` there are no barriers and the CPU seconds a step are the work it does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _train_speed():
    """benchmarks/train_speed.py as a module: its batch, adapter, trainer step and figures."""
    spec = importlib.util.spec_from_file_location("train_speed", _HERE / "train_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ts = _train_speed()

DECODE_TOKENS = 32  # greedy tokens timed per contender (batch 1)
CONTENDERS = {
    "dense": "dense cached conversion (fp32 weights)",
    "packed": "packed GGUF base (Q4_1 blocks, de-quantized in the products)",
}


def _rss_bytes() -> int:
    """The process's resident memory now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _run(name: str, adapter_dir: str, steps: int, warmup: int, model: str, threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from lorakit.models import load_model
    from lorakit.models.gguf_packed import storage_bytes

    torch.manual_seed(0)
    import transformers  # noqa: F401 (imported before the first reading: its own memory is no load's)

    before = _rss_bytes()
    start = time.perf_counter()
    base = load_model(model, dtype="float32", device="cpu", packed=name == "packed")[0]
    load_s = time.perf_counter() - start
    with torch.no_grad():  # every weight read once: a lazily mapped checkpoint's pages count too
        base(torch.tensor([[1, 2, 3, 4]]))
    load_rss = _rss_bytes() - before
    weights = storage_bytes(base)
    decode = _decode_tokens_per_s(base)
    base.train()
    batch = ts._batch(base.config.vocab_size)
    step_loss = ts._lorakit()(base, batch, adapter_dir)
    params = [p for p in base.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    times, cpu_times, losses = [], [], []
    for step in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    result = ts._result(name, times, cpu_times, losses)
    return {**result, "load_s": load_s, "load_rss_gb": load_rss / 1024**3, "weights_gb": weights / 1024**3,
            "decode_tok_s": decode}


def _decode_tokens_per_s(base, new_tokens: int = DECODE_TOKENS) -> float:
    """Greedy decoding speed of the bare base (batch 1, KV cache): new tokens a second, after a warm-up."""
    import torch

    prompt = torch.tensor([list(range(100, 116))])
    with torch.no_grad():
        base.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        base.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return new_tokens / (time.perf_counter() - start)


def _median(runs: list[dict]) -> dict:
    merged = ts._median_run(runs)
    for key in ("load_s", "load_rss_gb", "weights_gb", "decode_tok_s"):
        merged[key] = statistics.median(r[key] for r in runs)
    return merged


def table(results: dict[str, dict]) -> str:
    lines = ["| base | step (s) | CPU s/step | peak RSS (GB) | load RSS (GB) | model tensors (GB) | load (s) "
             "| decode (tok/s) | losses |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        losses = " ".join(f"{x:.4f}" for x in r["losses"])
        lines.append(f"| {CONTENDERS[name]} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_gb']:.2f} "
                     f"| {r['load_rss_gb']:.2f} | {r['weights_gb']:.3f} | {r['load_s']:.1f} | {r['decode_tok_s']:.1f} "
                     f"| {losses} |")
    return "\n".join(lines)


def summary(results: dict[str, dict]) -> str:
    """The ratios the docs quote: packed over dense (step, CPU, peak RSS, load RSS, decoding speed),
    the largest relative difference of their losses."""
    p, d = results["packed"], results["dense"]
    loss_diff = ts._loss_rel_diff(d["losses"], p["losses"])
    return (f"packed_step_vs_dense={p['step_s'] / d['step_s']:.2f} packed_cpu_vs_dense={p['cpu_s'] / d['cpu_s']:.2f} "
            f"packed_peak_vs_dense={p['peak_rss_gb'] / d['peak_rss_gb']:.2f} "
            f"packed_load_rss_vs_dense={p['load_rss_gb'] / d['load_rss_gb']:.2f} "
            f"packed_decode_vs_dense={p['decode_tok_s'] / d['decode_tok_s']:.2f} loss_rel_diff={loss_diff:.1e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=ts.WARMUP, help="untimed steps first (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians (default %(default)s)")
    parser.add_argument("--model", default=ts.MODEL, help="a .gguf file or built-in model (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each contender (default: torch's)")
    parser.add_argument("--contender", choices=list(CONTENDERS), help=argparse.SUPPRESS)  # internal: one, as JSON
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.contender:
        print(json.dumps(_run(args.contender, args.adapter_dir, args.steps, args.warmup, args.model, args.threads)))
        return 0

    runs: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        ts._make_initial_adapter(tmp, args.model)
        for round_ in range(args.rounds):
            order = list(CONTENDERS) if round_ % 2 == 0 else list(reversed(CONTENDERS))
            for name in order:
                print(f"round {round_ + 1}/{args.rounds}: {name} …", file=sys.stderr, flush=True)
                runs[name].append(ts.run_contender(__file__, name, [
                    "--adapter-dir", tmp, "--steps", str(args.steps), "--warmup", str(args.warmup),
                    "--model", args.model, *(["--threads", str(args.threads)] if args.threads else [])]))
    results = {name: _median(rs) for name, rs in runs.items()}
    print(table(results))
    print(summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
