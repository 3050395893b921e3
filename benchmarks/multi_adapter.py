"""Mixed-adapter batches: one `generate` where each row uses its own adapter, lorakit vs PEFT.

SmolLM2-135M fp32, batch 32, 8 adapters of r=16 on all linear layers (each row i uses adapter
i % 8), 16-token prompts, 16 new tokens, greedy. Contenders run interleaved in one process over
several rounds (so machine load hits them alike); the median time of each is reported.

    python benchmarks/multi_adapter.py [--rounds 3] [--batch 32] [--adapters 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    import peft
    import torch

    from lorakit import LoraConfig, PeftModel, get_peft_model
    from lorakit.models import load_model

    def fresh():
        return load_model("smollm2-135m", dtype="float32", device="cpu", packed=False)[0].eval()

    names = [f"a{i}" for i in range(args.adapters)]
    rows = [names[i % len(names)] for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            torch.manual_seed(i)
            config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
            get_peft_model(fresh(), config).save_pretrained(Path(tmp) / name)
        ours = PeftModel.from_pretrained(fresh(), Path(tmp) / names[0], adapter_name=names[0])
        theirs = peft.PeftModel.from_pretrained(fresh(), Path(tmp) / names[0], adapter_name=names[0])
        for name in names[1:]:
            ours.load_adapter(Path(tmp) / name, adapter_name=name)
            theirs.load_adapter(Path(tmp) / name, adapter_name=name)
    base = fresh()
    ours.eval(), theirs.eval()
    ids = torch.randint(0, 49152, (args.batch, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    runs = {
        "base model": lambda: base.generate(ids, **kwargs),
        "lorakit, one adapter": lambda: ours.generate(ids, **kwargs),
        f"lorakit, mixed {args.adapters} adapters": lambda: ours.generate(ids, adapter_names=rows, **kwargs),
        "PEFT, one adapter": lambda: theirs.generate(ids, **kwargs),
        f"PEFT, mixed {args.adapters} adapters": lambda: theirs.generate(ids, adapter_names=rows, **kwargs),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        outputs = {name: run() for name, run in runs.items()}  # warm-up, and outputs to compare
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.new_tokens
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base_t = median["base model"]
    print(f"| batch {args.batch}, {args.new_tokens} new tokens | tokens/s | time vs base |")
    print("|---|---:|---:|")
    for name, t in median.items():
        print(f"| {name} | {tokens / t:.1f} | {t / base_t:.2f} |")
    mixed_ours = median[f"lorakit, mixed {args.adapters} adapters"]
    mixed_peft = median[f"PEFT, mixed {args.adapters} adapters"]
    same = torch.equal(outputs[f"lorakit, mixed {args.adapters} adapters"], outputs[f"PEFT, mixed {args.adapters} adapters"])
    print(f"mixed_vs_base={mixed_ours / base_t:.2f} speed_vs_peft_mixed={mixed_peft / mixed_ours:.2f} same_tokens_as_peft={same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
