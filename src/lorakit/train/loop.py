"""`train(config)`: the training loop, from a TrainConfig to an adapter (or model) on disk.

One optimizer step = `grad_accum` micro-batches per rank; each micro-batch's summed token loss
is divided by the target tokens of the *whole* step, so the step's gradient and loss do not
depend on how it is split (across micro-batches now, across ranks later). The device is
synchronised only when something is logged, evaluated or saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lorakit.data import Example, collate, pad_token_id
from lorakit.io import atomic_write_bytes
from lorakit.loss import causal_lm_loss
from lorakit.models import load_model, pick_device, pick_dtype

from . import setup
from .batches import StepPlan, count_targets
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsLog, Progress, keep_until, read_metrics
from .plot import plot_losses
from .rundir import atomic_dir, check_output_dir, prepare_output_dir
from .schedule import lr_factor, warmup_steps_for
from .world import World, resolve_world


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None  # method lora: PEFT adapter directory
    model_dir: Path | None  # method full: transformers model directory (with tokenizer)
    metrics_path: Path
    plot_path: Path | None
    last_checkpoint: Path | None
    steps: int
    train_loss: float | None  # last logged
    eval_loss: float | None  # last evaluated
    tokens_per_s: float  # over the steps this call ran
    train_time_s: float  # the steps only
    wall_time_s: float  # the whole call: loading, tokenising, training, saving
    stats: dict[str, Any] = field(default_factory=dict)  # data counts, parameter counts, device
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, in eval mode


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.data`; see TrainConfig for every option."""
    started = time.perf_counter()
    world = resolve_world(config.distributed)
    out = Path(config.output_dir)
    resume_from = setup.resume_path(config)
    if resume_from is not None:
        setup.check_resumable(config, resume_from)
    resuming = resume_from is not None
    if world.is_main:  # refuse early; the old run's files are removed only once all input is read
        check_output_dir(out, overwrite=config.overwrite, resuming=resuming)
    train_records, eval_records = setup.read_records(config)

    setup.seed_everything(config.seed)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    base, tokenizer = load_model(config.model, dtype=dtype, device=device)
    data = setup.tokenize(config, tokenizer, train_records, eval_records)
    model = setup.prepare_model(base, config)
    params = setup.trainable_parameters(model)
    optimizer = setup.build_optimizer(params, config, device)

    plan = StepPlan(len(data.train), config.batch_size, config.grad_accum, config.seed, world.size)
    total = config.max_steps or config.epochs * plan.steps_per_epoch
    warmup = warmup_steps_for(total, config.warmup_steps, config.warmup_ratio)
    trainable, n_params = setup.count_parameters(model)
    stats = {**data.stats, "trainable_params": trainable, "total_params": n_params,
             "device": str(device), "dtype": str(dtype).removeprefix("torch."),
             "steps_per_epoch": plan.steps_per_epoch, "warmup_steps": warmup}

    if world.is_main:
        prepare_output_dir(out, overwrite=config.overwrite, resuming=resuming)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, params, optimizer).step
        if world.is_main:
            keep_until(out / "metrics.jsonl", start)
    if world.is_main:
        atomic_write_bytes(out / "config.yaml", config.to_yaml().encode())

    progress = Progress(total, start, config.quiet, enabled=world.is_main)
    progress.message(_describe(config, stats, total, out, resume_from, start))
    run = _Run(config, world, model, tokenizer, params, optimizer, plan, data.train, data.eval,
               total, warmup, out, device, progress)
    try:
        run.steps(start)
    finally:
        progress.close()
        run.metrics.close()

    adapter_dir = model_dir = plot_path = None
    if world.is_main:
        if config.method == "lora":
            adapter_dir = out / "adapter"
            with atomic_dir(adapter_dir) as tmp:
                model.save_pretrained(tmp)
        else:
            model_dir = out / "model"
            with atomic_dir(model_dir) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        records = read_metrics(out / "metrics.jsonl")
        plot_path = out / "loss.png" if plot_losses(records, out / "loss.png") else None
    model.eval()
    return TrainResult(
        output_dir=out, adapter_dir=adapter_dir, model_dir=model_dir, metrics_path=out / "metrics.jsonl",
        plot_path=plot_path, last_checkpoint=latest_checkpoint(out / "checkpoints"), steps=total,
        train_loss=run.last_loss, eval_loss=run.last_eval_loss,
        tokens_per_s=run.tokens / run.train_time if run.train_time else 0.0,
        train_time_s=run.train_time, wall_time_s=time.perf_counter() - started, stats=stats, model=model,
    )


class _Run:
    """The step loop and what it carries between steps (pending losses, timing, the metrics file)."""

    def __init__(self, config: TrainConfig, world: World, model: nn.Module, tokenizer: Any,
                 params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer, plan: StepPlan,
                 examples: list[Example], eval_examples: list[Example], total: int, warmup: int,
                 out: Path, device: torch.device, progress: Progress) -> None:
        self.config, self.world, self.model, self.params = config, world, model, params
        self.optimizer, self.plan, self.examples, self.eval_examples = optimizer, plan, examples, eval_examples
        self.total, self.warmup, self.out, self.device, self.progress = total, warmup, out, device, progress
        self.pad_id = pad_token_id(tokenizer)
        self.tensors = [p for _, p in params]
        # per-example counts, so a step's normaliser and token count cost no pass over tokens
        self.targets = np.array([count_targets([e]) for e in examples], dtype=np.int64)
        self.lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
        self.metrics = MetricsLog(out / "metrics.jsonl" if world.is_main else None)
        self.pending: list[tuple[int, Tensor, Tensor, float]] = []  # (step, loss, grad norm, lr)
        self.tokens = 0  # this rank's tokens over the whole call
        self.train_time = 0.0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self._window = (time.perf_counter(), 0)  # (start time, tokens) since the last log
        self._unlogged = 0

    def steps(self, start: int) -> None:
        config = self.config
        for step in range(start, self.total):
            tick = time.perf_counter()
            self._step(step)
            self.train_time += time.perf_counter() - tick
            done = step + 1
            evaluate = bool(self.eval_examples) and (
                done == self.total or (config.eval_every is not None and done % config.eval_every == 0))
            save = config.save_every is not None and done % config.save_every == 0
            self._unlogged += 1
            if done % config.log_every == 0 or done == self.total or evaluate or save:
                self._log(evaluate)
            if save:
                self._save(done)

    def _step(self, step: int) -> None:
        lr = self.config.lr * lr_factor(step, self.total, self.warmup, self.config.scheduler)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_targets = int(self.targets[self.plan.step_indices(step)].sum())  # all ranks' micro-batches
        step_loss = torch.zeros((), device=self.device)
        for indices in self.plan.micro_batches(step, self.world.rank):
            batch = collate([self.examples[i] for i in indices], self.pad_id)
            loss_sum, _ = causal_lm_loss(self.model, _to(batch, self.device))
            (loss_sum / n_targets).backward()
            step_loss += loss_sum.detach()
            self.tokens += int(self.lengths[indices].sum())
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.tensors, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.append((step + 1, step_loss / n_targets, grad_norm, lr))

    def _log(self, evaluate: bool) -> None:
        """One device sync: fetch the pending losses, stop on NaN/inf, write and show a record."""
        pending, self.pending = self.pending, []
        fetched = torch.stack([torch.stack([loss.float(), norm.float()]) for _, loss, norm, _ in pending]).tolist()
        losses, norms = [pair[0] for pair in fetched], [pair[1] for pair in fetched]
        for (step, *_), loss, norm in zip(pending, losses, norms):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
                last = latest_checkpoint(self.out / "checkpoints")
                raise TrainingDiverged(
                    f"{what} is {value} at step {step}; training stopped. "
                    + (f"Last good checkpoint: {last}" if last else "No checkpoint was written yet")
                    + " (try a lower lr, warmup, or max_grad_norm)"
                )
        now = time.perf_counter()
        start, tokens_before = self._window
        step = pending[-1][0]
        record: dict[str, Any] = {
            "step": step,
            "epoch": round(step / self.plan.steps_per_epoch, 4),
            "loss": sum(losses) / len(losses),
            "lr": pending[-1][3],
            "tokens_per_s": (self.tokens - tokens_before) / max(now - start, 1e-9),
            "grad_norm": norms[-1],
        }
        self.last_loss = record["loss"]
        if evaluate:
            record["eval_loss"] = self.last_eval_loss = evaluate_loss(
                self.model, self.eval_examples, self.config.batch_size, self.pad_id, self.device)
        self.metrics.write(record)
        self.progress.step(self._unlogged, {**record, "total_steps": self.total})
        self._unlogged = 0
        self._window = (time.perf_counter(), self.tokens)

    def _save(self, step: int) -> None:
        if not self.world.is_main:
            return
        epoch, index = self.plan.position(step)
        state = {"epoch": epoch, "index_in_epoch": index, "total_steps": self.total,
                 "schedule": {"kind": self.config.scheduler, "peak_lr": self.config.lr,
                              "warmup_steps": self.warmup, "total_steps": self.total},
                 "world_size": self.world.size}
        export = None
        if self.config.method == "lora":
            def export(directory: Path) -> None:
                self.model.save_pretrained(directory / "adapter")
        tick = time.perf_counter()
        save_checkpoint(self.out / "checkpoints", step, self.params, self.optimizer, state,
                        self.config.to_yaml(), self.config.keep_checkpoints, export)
        self._window = (self._window[0] + time.perf_counter() - tick, self._window[1])


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  device: torch.device) -> float:
    """Mean loss per target token over `examples`, in eval mode (no dropout), then back to train mode."""
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = 0
        for i in range(0, len(examples), batch_size):
            loss_sum, n = causal_lm_loss(model, _to(collate(examples[i : i + batch_size], pad_id), device))
            total += loss_sum.double()
            count += n
        return float(total) / max(count, 1)
    finally:
        model.train(was_training)


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _describe(config: TrainConfig, stats: dict[str, Any], total: int, out: Path,
              resume_from: Path | None, start: int) -> str:
    """The run in three lines: model and method, data and steps, where it goes."""
    method = (f"LoRA r={config.r} alpha={config.lora_alpha}" + (" DoRA" if config.use_dora else "")
              if config.method == "lora" else "full fine-tuning")
    share = 100 * stats["trainable_params"] / max(stats["total_params"], 1)
    lines = [
        f"{config.model} on {stats['device']} ({stats['dtype']}), {method}: "
        f"{stats['trainable_params']:,} of {stats['total_params']:,} parameters train ({share:.2f}%)",
        f"data: {stats['train_examples']} examples ({stats['truncated']} truncated to {config.max_seq_len} "
        f"tokens, {stats['dropped']} dropped with nothing to learn)"
        + (f", {stats['eval_examples']} for eval" if stats.get("eval_examples") else "")
        + (f", packed into {stats['train_rows']} rows" if "train_rows" in stats else ""),
        f"{total} steps of {config.batch_size * config.grad_accum} ({stats['steps_per_epoch']} per epoch), "
        f"output: {out}" + (f"; resuming from {resume_from} at step {start}" if resume_from else ""),
    ]
    return "\n".join(lines)
