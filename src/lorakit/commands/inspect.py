"""`lorakit inspect`: what an adapter directory holds, for people (table) or scripts (--json)."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "describe an adapter: config, ranks, adapted modules, parameter count, size on disk"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER", help="adapter directory, or a llama.cpp LoRA adapter .gguf file")
    parser.add_argument("--json", action="store_true", help="print the facts as one JSON object")


def run(args: argparse.Namespace) -> int:
    from lorakit.export import inspect_adapter

    info = inspect_adapter(args.adapter)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def format_info(info: dict[str, Any]) -> str:
    """The facts as aligned `label  value` lines."""
    if info.get("format") == "gguf":
        return _aligned(_gguf_rows(info))
    targets = info["target_modules"]
    rows = [
        ("adapter", info["path"]),
        ("base model", info["base_model"] or "(not recorded)"),
        ("r / lora_alpha", f"{info['r']} / {info['lora_alpha']:g}"
                           + ("  (rsLoRA)" if info["use_rslora"] else "")),
        ("ranks in file", ", ".join(map(str, info["ranks"])) or "none"),
        ("target modules", ", ".join(targets) if isinstance(targets, list) else str(targets)),
        ("adapted modules", str(info["n_modules"])),
        ("dropout", f"{info['lora_dropout']:g}"),
        ("DoRA", "yes" if info["use_dora"] else "no"),
        ("bias", info["bias"]),
        ("parameters", f"{info['n_parameters']:,} in {info['n_tensors']} tensors ({', '.join(info['dtypes'])})"),
        ("size on disk", f"{_size(info['size_on_disk_bytes'])} (weights {_size(info['size_bytes'])})"),
    ]
    if info["modules_to_save"]:
        rows.insert(9, ("modules to save", ", ".join(info["modules_to_save"])))
    if info["other_adapters"]:
        rows.append(("other adapters", ", ".join(info["other_adapters"]) + " (in sub-folders)"))
    return _aligned(rows)


def _gguf_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """A llama.cpp LoRA adapter GGUF: names and types are the base GGUF's."""
    blocks = info["blocks"]
    return [
        ("adapter", f"{info['path']} (GGUF LoRA adapter)"),
        ("architecture", info["architecture"] or "(not recorded)"),
        ("base model", info["base_model"] or "(not recorded)"),
        ("r / lora_alpha", f"{info['r']} / {info['lora_alpha']:g}  (llama.cpp scales each tensor by alpha / its rank)"),
        ("ranks in file", ", ".join(map(str, info["ranks"])) or "none"),
        ("target tensors", ", ".join(info["target_modules"])
                           + (f"  (blocks {blocks[0]}-{blocks[1]})" if blocks else "")),
        ("adapted tensors", str(info["n_modules"])),
        ("outtype", f"{info['outtype'] or '(not recorded)'}  (tensor types {', '.join(info['dtypes'])})"),
        ("parameters", f"{info['n_parameters']:,} in {info['n_tensors']} tensors"),
        ("size on disk", _size(info["size_bytes"])),
    ]


def _aligned(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
