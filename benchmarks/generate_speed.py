"""Generation speed: the base model, a merged adapter and an unmerged adapter (lorakit and PEFT).

SmolLM2-135M fp32, greedy `generate`, one process, contenders interleaved over several rounds
so that load on a shared machine hits them alike; reports the median tokens/s of each.

    python benchmarks/generate_speed.py [--batch 1] [--new-tokens 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import peft
    import torch

    from lorakit import LoraConfig, PeftModel, get_peft_model
    from lorakit.models import load_model

    def fresh():
        return load_model("smollm2-135m", dtype="float32", device="cpu", packed=False)[0].eval()

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        get_peft_model(fresh(), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)).save_pretrained(tmp)
        models = {
            "base": fresh(),
            "lorakit merged": PeftModel.from_pretrained(fresh(), tmp).merge_and_unload(),
            "lorakit unmerged": PeftModel.from_pretrained(fresh(), tmp),
            "PEFT merged": peft.PeftModel.from_pretrained(fresh(), tmp).merge_and_unload(),
            "PEFT unmerged": peft.PeftModel.from_pretrained(fresh(), tmp),
        }
    ids = torch.randint(0, 49152, (args.batch, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    times: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}  # process time: steadier on a shared machine
    outputs = {}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up
            outputs[name] = model.generate(ids, **kwargs)
        for _ in range(args.rounds):
            for name, model in models.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                model.generate(ids, **kwargs)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
    tokens = args.batch * args.new_tokens

    def vs_base(series: dict[str, list[float]], name: str) -> float:
        return statistics.median(series[name]) / statistics.median(series["base"])

    print(f"| model (batch {args.batch}, {args.new_tokens} new tokens) | tokens/s | time vs base | CPU time vs base |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {tokens / statistics.median(ts):.1f} | {vs_base(times, name):.3f} | {vs_base(cpu, name):.3f} |")
    same = all(torch.equal(outputs["lorakit unmerged"], outputs[n]) for n in ("PEFT unmerged",))
    print(
        f"merged_vs_base={vs_base(times, 'lorakit merged'):.3f} unmerged_vs_base={vs_base(times, 'lorakit unmerged'):.3f} "
        f"peft_unmerged_vs_base={vs_base(times, 'PEFT unmerged'):.3f} "
        f"cpu_unmerged_vs_base={vs_base(cpu, 'lorakit unmerged'):.3f} same_tokens_as_peft={same}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
