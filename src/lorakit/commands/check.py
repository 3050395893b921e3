"""`lorakit check`: the rules serving engines and loaders enforce on an adapter, checked before deployment."""

from __future__ import annotations

import argparse
import json

HELP = "check an adapter against what vLLM, LoRAX, llama.cpp, Ollama and PEFT accept (exit 1 if a rule fails)"
EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.export.check import TARGET_NAMES

    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory")
    parser.add_argument("--target", action="append", choices=[*TARGET_NAMES, "all"], metavar="TARGET",
                        help=f"where it will be served: {', '.join(TARGET_NAMES)} (repeat for several; "
                             "default: all)")
    parser.add_argument("--max-lora-rank", type=int, metavar="N",
                        help="vLLM: the --max-lora-rank the server runs with (default: vLLM's, 16)")
    parser.add_argument("--model-type", metavar="TYPE",
                        help="the base model's config.model_type (llama, qwen2, ...) when the adapter's "
                             "base_model_name_or_path cannot be read locally")
    parser.add_argument("--base", metavar="DIR", help="the base model directory (its config.json is read)")
    parser.add_argument("--json", action="store_true", help="print the findings as one JSON object")


def run(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lorakit.export.check import Options, check_adapter, check_targets, read_adapter

    targets = check_targets(args.target)
    adapter = read_adapter(args.adapter, model_type=args.model_type, base=args.base)
    findings = check_adapter(adapter, targets, Options(max_lora_rank=args.max_lora_rank))
    failed = sorted({f.target for f in findings if f.error})
    if args.json:
        print(json.dumps({"adapter": args.adapter, "model_type": adapter.model_type, "targets": targets,
                          "failed": failed, "findings": [asdict(f) for f in findings]}, indent=2))
    else:
        for finding in findings:
            print(finding.line())
        for target in targets:
            if target not in failed:
                print(f"{target}: ok")
    return EXIT_FAILED if failed else 0
