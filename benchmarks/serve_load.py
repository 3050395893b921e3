"""Load test of `lorakit serve`: concurrent HTTP requests over several adapters vs transformers' generate.

    .venv/bin/python benchmarks/serve_load.py                 # 32 requests, 4 adapters, 32 new tokens
    .venv/bin/python benchmarks/serve_load.py --threads 1 --check-solo

The server runs in this process on a free loopback port as `lorakit serve` runs it (the
engine in the main thread, FastAPI + uvicorn in a side thread); the clients, in another
thread, are 32 concurrent `httpx` requests to /v1/completions, each for one of 4 random
LoRA adapters (r=16 on every linear layer of the body), with chat-formatted prompts.
Baselines, each one batched, left-padded `generate` call on the same 32 prompts:

- transformers, base model: no adapters at all, so strictly less work than the server does;
- transformers + PEFT, the same 4 adapters mixed in one batch (`adapter_names=`), the same work.

Everyone generates exactly `--new-tokens` tokens per prompt (greedy; `ignore_eos` on the
server, `min_new_tokens` in generate). Rounds alternate between contenders so that a busy
machine slows all alike. Prints a markdown table (the one docs/serve.md quotes) and ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_name: str, root: Path, count: int, rank: int) -> dict[str, str]:
    """`count` random adapters (small non-zero B) for the base model, saved as PEFT directories."""
    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import load_model

    paths = {}
    for i in range(count):
        model, _ = load_model(model_name, packed=False)
        torch.manual_seed(1000 + i)
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                init_lora_weights=False))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)  # keep the model's text readable; speed does not depend on it
        paths[f"adapter{i}"] = str(root / f"adapter{i}")
        peft.save_pretrained(paths[f"adapter{i}"])
    return paths


def prompts(n: int) -> list[str]:
    """Short chat-formatted prompts (user turn + assistant header, no system prompt)."""
    colours = ["red", "green", "blue", "amber", "violet", "silver", "black", "white"]
    return [
        f"<|im_start|>user\nWhy does parcel {i} have a {colours[i % 8]} label?<|im_end|>\n<|im_start|>assistant\n"
        for i in range(n)
    ]


def run_generate(model, tokenizer, texts: list[str], new_tokens: int, **kwargs) -> tuple[float, list[list[int]]]:
    """One batched, left-padded greedy `generate` call; returns (seconds, new token ids per prompt)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, **kwargs)
    seconds = time.perf_counter() - start
    return seconds, out[:, batch.input_ids.shape[1]:].tolist()


def peft_model(model_name: str, paths: dict[str, str]):
    """The base model with every adapter loaded through Hugging Face PEFT."""
    from peft import PeftModel
    from lorakit.models import load_model

    base, _ = load_model(model_name, packed=False)
    names = list(paths)
    model = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    return model.eval()


async def _load(url: str, jobs: list[tuple[str, str]], new_tokens: int) -> tuple[float, list[float], list[dict]]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(jobs))) as client:
        async def one(model: str, prompt: str) -> tuple[float, dict]:
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()

        start = time.perf_counter()
        results = await asyncio.gather(*(one(m, p) for m, p in jobs))
        wall = time.perf_counter() - start
    return wall, [r[0] for r in results], [r[1] for r in results]


def run_server_load(engine, url: str, jobs: list[tuple[str, str]], new_tokens: int) -> tuple[float, list[float], list[dict]]:
    """The clients in a side thread while the engine serves in this (the main) thread, as `lorakit serve` runs it."""
    result: list = []

    def clients() -> None:
        try:
            result.append(asyncio.run(_load(url, jobs, new_tokens)))
        finally:
            engine.close()

    thread = threading.Thread(target=clients)
    thread.start()
    engine.run()
    thread.join()
    if not result:
        raise SystemExit("the load test failed (see the error above)")
    return result[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each contender; medians shown")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for everyone (default: torch's)")
    parser.add_argument("--no-peft", action="store_true", help="skip the transformers + PEFT baseline")
    parser.add_argument("--check-solo", action="store_true",
                        help="also run every request alone and count identical outputs (slow)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lorakit.models import load_model
    from lorakit.serve import AdapterRegistry, Engine, create_app
    from lorakit.serve.server import serving

    texts = prompts(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(args.model, Path(tmp), args.adapters, args.rank)
        names = list(paths)
        rows = [names[i % len(names)] for i in range(args.requests)]
        base, tokenizer = load_model(args.model, packed=False)
        peft = None if args.no_peft else peft_model(args.model, paths)
        model, _ = load_model(args.model, packed=False)
        registry = AdapterRegistry(model, args.model)
        for name, path in paths.items():
            registry.add(name, path)
        engine = Engine(model, tokenizer, registry, max_batch_size=args.requests)
        app = create_app(engine, args.model)
        jobs = list(zip(rows, texts))
        prompt_tokens = [len(tokenizer(t).input_ids) for t in texts]

        times: dict[str, list[float]] = {"base": [], "peft": []}
        server_runs = []
        with serving(app, log_level="error") as url:
            run_generate(base, tokenizer, texts[:2], 2)  # warm-up
            run_server_load(engine, url, jobs[:2], 2)
            for _ in range(args.rounds):
                times["base"].append(run_generate(base, tokenizer, texts, args.new_tokens)[0])
                if peft is not None:
                    times["peft"].append(run_generate(peft, tokenizer, texts, args.new_tokens, adapter_names=rows)[0])
                before = dataclasses.replace(engine.stats)
                wall, latencies, replies = run_server_load(engine, url, jobs, args.new_tokens)
                steps = engine.stats.decode_steps - before.decode_steps
                step_seconds = (engine.stats.decode_seconds - before.decode_seconds) / max(1, steps)
                prefill = (engine.stats.prefills - before.prefills, engine.stats.prefill_seconds - before.prefill_seconds)
                server_runs.append((wall, latencies, replies, steps, step_seconds, prefill))
            solo_same = None
            if args.check_solo:
                solo = [run_server_load(engine, url, [job], args.new_tokens)[2][0] for job in jobs]
                batched = server_runs[-1][2]
                solo_same = sum(a["choices"][0]["text"] == b["choices"][0]["text"] for a, b in zip(solo, batched))

    tokens = args.requests * args.new_tokens
    walls = [r[0] for r in server_runs]
    wall, latencies, replies, steps, step_seconds, prefill = server_runs[walls.index(statistics.median_low(walls))]
    completion = sum(r["usage"]["completion_tokens"] for r in replies)
    assert completion == tokens, f"expected {tokens} tokens, the server generated {completion}"
    print(f"\n{args.requests} requests x {args.new_tokens} new tokens, {args.adapters} adapters (r={args.rank}, "
          f"all linear layers of the body), prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens, "
          f"{args.model} fp32, {torch.get_num_threads()} torch threads; medians of {args.rounds} alternating rounds\n")
    print("| | tokens/s | wall s | p50 latency s | p95 latency s | wall s / new tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    labels = {"base": f"transformers `generate`, base model, one batch of {args.requests}",
              "peft": f"transformers `generate` + PEFT, {args.adapters} adapters mixed in one batch"}
    for key, label in labels.items():
        if times[key]:
            t = statistics.median(times[key])
            print(f"| {label} | {tokens / t:.1f} | {t:.2f} | {t:.2f} | {t:.2f} | {t / args.new_tokens:.3f} |")
    print(f"| `lorakit serve`, {args.requests} concurrent HTTP requests over {args.adapters} adapters | "
          f"{tokens / wall:.1f} | {wall:.2f} | {percentile(latencies, 50):.2f} | {percentile(latencies, 95):.2f} | "
          f"{wall / args.new_tokens:.3f} |")
    print()
    short = {"base": "transformers generate (base model)", "peft": "transformers generate + PEFT (same adapters)"}
    for key in ("base", "peft"):
        if times[key]:
            print(f"throughput ratio, lorakit serve vs {short[key]}: {statistics.median(times[key]) / wall:.2f}x")
    print(f"all rounds, seconds: {({k: [round(x, 2) for x in v] for k, v in times.items() if v})}, "
          f"serve {[round(w, 2) for w in walls]}")
    print(f"shown serve round: {steps} decode steps ({step_seconds:.3f} s each), {prefill[0]} prefill "
          f"forwards ({prefill[1]:.1f} s), the rest HTTP and waiting")
    print(f"sample reply ({rows[0]}): {replies[0]['choices'][0]['text'][:80]!r}")
    if solo_same is not None:
        print(f"outputs identical to the same request run alone: {solo_same}/{args.requests}")


if __name__ == "__main__":
    main()
