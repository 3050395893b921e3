"""The PEFT-compatible LoRA engine: config, targeting, math, layers by kind, model, handles, files."""
