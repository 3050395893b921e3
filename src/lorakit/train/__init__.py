"""Fine-tuning: a TrainConfig in, an adapter (or model), metrics and checkpoints out.

    from lorakit.train import TrainConfig, train
    result = train(TrainConfig(data="train.jsonl", max_steps=100, output_dir="runs/a"))
    result.adapter_dir  # runs/a/adapter, loadable with PeftModel.from_pretrained

    config = load_train_config("recipe.yaml", ["lr=1e-3", "resume=latest"])

Under `torchrun --nproc-per-node N -m lorakit train …` every process runs `train` on its share of
each step (DDP, or FSDP with `distributed: fsdp`); see docs/distributed.md.
"""

from .config import ConfigError, TrainConfig, load_train_config
from .loop import RanksLost, TrainingDiverged, TrainResult, evaluate_loss, train
from .schedule import lr_factor, warmup_steps_for

__all__ = [
    "ConfigError",
    "RanksLost",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "evaluate_loss",
    "load_train_config",
    "lr_factor",
    "train",
    "warmup_steps_for",
]
