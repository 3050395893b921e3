"""`train(config)`: the training loop, from a TrainConfig to an adapter (or model) on disk.

One optimizer step = `grad_accum` micro-batches on each of the world's ranks; each micro-batch's
summed token loss is divided by the target tokens of the *whole* step (all ranks), so the step's
gradient and loss do not depend on how it is split across micro-batches or ranks. The device is
synchronised only when something is logged, evaluated or saved; that is also when the ranks
exchange their losses (one all-reduce). Only rank 0 writes files; the others wait for it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lorakit.fast.allocator import prepare_cpu_training
from lorakit.data import Example, collate, pad_token_id
from lorakit.lora.io import atomic_dir, atomic_write_bytes
from lorakit.fast.loss import causal_lm_loss
from lorakit.models import load_model, pick_device, pick_dtype
from lorakit.fast.precision import frozen_matmul_precision

from . import parallel
from . import setup
from .batches import StepPlan, count_targets
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsLog, Progress, keep_until, read_metrics
from .plot import plot_losses
from .rundir import check_output_dir, prepare_output_dir, remove
from .schedule import lr_factor, warmup_steps_for
from .world import World, all_sum, barrier, join_process_group, launched_world, train_device


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


class RanksLost(ConnectionError):
    """Another process of a multi-process run died or stopped answering; the message says how to resume."""


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
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, in eval mode (FSDP: sharded)
    rank: int = 0  # this process's rank; only rank 0 wrote the files
    world_size: int = 1


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.data`; see TrainConfig for every option.

    Started by torchrun, every process calls this with the same config; they train one model together.
    """
    started = time.perf_counter()
    world = launched_world(config.distributed)
    device = train_device(config.device, world)
    if device.type == "cpu":
        prepare_cpu_training(config.gradient_checkpointing)
    join_process_group(world, device, config.dist_timeout)
    with frozen_matmul_precision(config.frozen_matmul_precision):
        return _train(config, world, device, started)


def _train(config: TrainConfig, world: World, device: torch.device, started: float) -> TrainResult:
    out = Path(config.output_dir)
    resume_from = setup.resume_path(config)
    saved_world = None
    if resume_from is not None:
        saved_world = setup.check_resumable(config, resume_from, world.size)
    resuming = resume_from is not None
    # refuse early, on every rank alike; the old run's files are removed only once all input is read
    check_output_dir(out, overwrite=config.overwrite, resuming=resuming)
    train_records, eval_records = setup.read_records(config)

    setup.seed_everything(config.seed)
    dtype = pick_dtype(config.dtype, device)
    # FSDP: the whole base goes to the CPU first, so that only each rank's shards reach the device
    base, tokenizer = load_model(config.model, dtype=dtype, quantization=config.quant_config(),
                                 packed=config.packed_base(),
                                 device=torch.device("cpu") if world.strategy == "fsdp" else device)
    data = setup.tokenize(config, tokenizer, train_records, eval_records)
    model = setup.prepare_model(base, config)
    trainable, n_params = setup.count_parameters(model)  # counted whole, before any sharding
    forward = parallel.wrap(model, _loss, world, device)
    params = setup.trainable_parameters(model)
    optimizer = setup.build_optimizer(params, config, device)

    plan = StepPlan(len(data.train), config.batch_size, config.grad_accum, config.seed, world.size)
    total = config.max_steps or config.epochs * plan.steps_per_epoch
    warmup = warmup_steps_for(total, config.warmup_steps, config.warmup_ratio)
    stats = {**data.stats, "trainable_params": trainable, "total_params": n_params,
             "device": str(device), "dtype": str(dtype).removeprefix("torch."),
             "steps_per_epoch": plan.steps_per_epoch, "warmup_steps": warmup,
             "world_size": world.size, "strategy": world.strategy, "global_batch": plan.global_batch}

    barrier(world)  # every rank has checked output_dir before rank 0 changes it
    if world.is_main:
        prepare_output_dir(out, overwrite=config.overwrite, resuming=resuming)
        setup.save_rewritten_base(model, config, tokenizer)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, params, optimizer, place=parallel.shard_like).step
        if world.is_main:
            keep_until(out / "metrics.jsonl", start)
    if world.is_main:
        atomic_write_bytes(out / "config.yaml", config.to_yaml().encode())

    progress = Progress(total, start, config.quiet, enabled=world.is_main)
    progress.message(_describe(config, stats, total, out, resume_from, start, world, saved_world))
    run = _Run(config, world, _Parts(model, forward, tokenizer, params, optimizer, plan, data.train, data.eval,
                                     total, warmup, out, device, progress))
    try:
        try:
            run.steps(start)
        finally:
            progress.close()
            run.metrics.close()
        adapter_dir, model_dir, plot_path = _save_final(config, world, forward, tokenizer, params, out)
    except RuntimeError as err:
        if not world.distributed or not _lost_contact(err):
            raise
        last = latest_checkpoint(out / "checkpoints")
        raise RanksLost(
            f"rank {world.rank}: lost contact with the other processes after step {run.done} ({_gist(err)}); "
            + (f"resume=latest continues from {last}" if last else "no checkpoint was written (see save_every)")
        ) from err
    model.eval()
    return TrainResult(
        output_dir=out, adapter_dir=adapter_dir, model_dir=model_dir, metrics_path=out / "metrics.jsonl",
        plot_path=plot_path, last_checkpoint=latest_checkpoint(out / "checkpoints"), steps=total,
        train_loss=run.last_loss, eval_loss=run.last_eval_loss,
        tokens_per_s=run.global_tokens / run.train_time if run.train_time else 0.0,
        train_time_s=run.train_time, wall_time_s=time.perf_counter() - started, stats=stats, model=model,
        rank=world.rank, world_size=world.size,
    )


def _save_final(config: TrainConfig, world: World, forward: nn.Module, tokenizer: Any,
                params: list[tuple[str, nn.Parameter]], out: Path) -> tuple[Path | None, Path | None, Path | None]:
    """Rank 0 writes the adapter (or model) and the plot; every rank gets (adapter dir, model dir, plot)."""
    plot_path = out / "loss.png"
    with parallel.whole_parameters(forward, [name for name, _ in params]) as model:  # FSDP: gathered
        if world.is_main:
            with atomic_dir(out / ("adapter" if config.method == "lora" else "model")) as tmp:
                model.save_pretrained(tmp)
                if config.method != "lora":
                    tokenizer.save_pretrained(tmp)
            if not plot_losses(read_metrics(out / "metrics.jsonl"), plot_path):
                remove(plot_path)  # none this time: not an old run's
    barrier(world)  # no rank returns before the files are there
    lora = config.method == "lora"
    return (out / "adapter" if lora else None, None if lora else out / "model",
            plot_path if plot_path.is_file() else None)


def _loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return causal_lm_loss(model, batch)  # looked up at each call, so tests can wrap it


def _lost_contact(err: RuntimeError) -> bool:
    """Whether `err` is a collective that failed because a peer died or timed out."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(clue in text for clue in ("connection", "timed out", "timeout", "peer", "gloo", "nccl"))


def _gist(err: BaseException) -> str:
    """The first sentence of an error, without the source location gloo and NCCL put in front."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0][:200].rstrip(".")


def _dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout's seed for one step on one rank: a pure function, so a resumed run draws the same masks."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


@dataclass(frozen=True)
class _Parts:
    """What a run is made of, once set up."""

    model: nn.Module
    forward: nn.Module  # micro-batch -> (loss sum, tokens), through DDP/FSDP when distributed
    tokenizer: Any
    params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    plan: StepPlan
    examples: list[Example]
    eval_examples: list[Example]
    total: int  # steps
    warmup: int  # steps
    out: Path
    device: torch.device
    progress: Progress


class _Run:
    """The step loop and what it carries between steps (pending losses, timing, the metrics file)."""

    def __init__(self, config: TrainConfig, world: World, parts: _Parts) -> None:
        self.config, self.world = config, world
        for name in parts.__dataclass_fields__:  # the parts are read as attributes of the run
            setattr(self, name, getattr(parts, name))
        examples, tokenizer = parts.examples, parts.tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.tensors = [p for _, p in parts.params]
        # per-example counts, so a step's normaliser and token count cost no pass over tokens
        self.targets = np.array([count_targets([e]) for e in examples], dtype=np.int64)
        self.lengths = np.array([len(e.input_ids) for e in examples], dtype=np.int64)
        self.metrics = MetricsLog(parts.out / "metrics.jsonl" if world.is_main else None,
                                  config.reporters(), config.to_dict())
        self.pending: list[tuple[int, Tensor, Tensor, float]] = []  # (step, loss, grad norm, lr)
        self.tokens = 0  # this rank's tokens over the whole call
        self.global_tokens = 0  # all ranks' tokens, up to the last log
        self.done = 0  # steps completed
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
            done = self.done = step + 1
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
        torch.manual_seed(_dropout_seed(self.config.seed, step, self.world.rank))
        n_targets = int(self.targets[self.plan.step_indices(step)].sum())  # all ranks' micro-batches
        mine = self.plan.micro_batches(step, self.world.rank)
        # Every rank runs as many micro-batches as rank 0 (which has the most), since DDP and FSDP
        # communicate in each; a rank short of examples at an epoch's end runs a weightless filler.
        count = len(self.plan.micro_batches(step, 0)) if self.world.distributed else len(mine)
        filler = self.plan.step_indices(step)[:1]
        step_loss = torch.zeros((), device=self.device)
        for i in range(count):
            real = i < len(mine)
            indices = mine[i] if real else filler
            batch = collate([self.examples[j] for j in indices], self.pad_id)
            with parallel.gradient_sync(self.forward, enabled=i == count - 1):
                loss_sum, _ = self.forward(_to(batch, self.device))
                # DDP and FSDP average gradients over ranks: scaling by the world size makes that the sum
                (loss_sum / n_targets * (self.world.size if real else 0)).backward()
            if real:
                step_loss += loss_sum.detach()
                self.tokens += int(self.lengths[indices].sum())
        grad_norm = parallel.clip_gradients(self.tensors, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.append((step + 1, step_loss / n_targets, grad_norm, lr))

    def _log(self, evaluate: bool) -> None:
        """One device sync: fetch the pending losses, stop on NaN/inf, write and show a record."""
        pending, self.pending = self.pending, []
        start, tokens_before = self._window
        # this rank's share of each step's loss, and its tokens since the last log: summed over ranks
        tokens = torch.tensor(float(self.tokens - tokens_before), dtype=torch.float64, device=self.device)
        shares = all_sum(torch.stack([loss.double() for _, loss, _, _ in pending] + [tokens]), self.world).tolist()
        losses, window_tokens = shares[:-1], int(shares[-1])
        norms = torch.stack([norm.float().to(self.device) for _, _, norm, _ in pending]).tolist()
        self.global_tokens += window_tokens
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
        step = pending[-1][0]
        record: dict[str, Any] = {
            "step": step,
            "epoch": round(step / self.plan.steps_per_epoch, 4),
            "loss": sum(losses) / len(losses),
            "lr": pending[-1][3],
            "tokens_per_s": window_tokens / max(now - start, 1e-9),
            "grad_norm": norms[-1],
        }
        self.last_loss = record["loss"]
        if evaluate:
            record["eval_loss"] = self.last_eval_loss = _evaluate(
                self.forward, self.model, self.eval_examples, self.config.batch_size, self.pad_id, self.device,
                self.world)
        self.metrics.write(record)
        self.progress.step(self._unlogged, {**record, "total_steps": self.total})
        self._unlogged = 0
        self._window = (time.perf_counter(), self.tokens)

    def _save(self, step: int) -> None:
        """Rank 0 writes the checkpoint (FSDP: of tensors gathered whole on every rank); all wait for it."""
        tick = time.perf_counter()
        epoch, index = self.plan.position(step)
        state = {"epoch": epoch, "index_in_epoch": index, "total_steps": self.total,
                 "schedule": {"kind": self.config.scheduler, "peak_lr": self.config.lr,
                              "warmup_steps": self.warmup, "total_steps": self.total},
                 "world_size": self.world.size, "global_batch": self.plan.global_batch}
        names = [name for name, _ in self.params]
        optimizer_state = parallel.full_state(self.optimizer.state_dict())
        with parallel.whole_parameters(self.forward, names):
            if self.world.is_main:
                current = dict(self.model.named_parameters())
                export = None
                if self.config.method == "lora":
                    def export(directory: Path) -> None:
                        self.model.save_pretrained(directory / "adapter")
                save_checkpoint(self.out / "checkpoints", step, [(name, current[name]) for name in names],
                                optimizer_state, state, self.config.to_yaml(), self.config.keep_checkpoints, export)
        barrier(self.world)
        self._window = (self._window[0] + time.perf_counter() - tick, self._window[1])


def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  device: torch.device) -> float:
    """Mean loss per target token over `examples`, in eval mode (no dropout), then back to train mode."""
    return _evaluate(lambda batch: causal_lm_loss(model, batch), model, examples, batch_size, pad_id, device, World())


@torch.no_grad()
def _evaluate(loss_of: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]], model: nn.Module,
              examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device, world: World) -> float:
    """`evaluate_loss` with the batches shared out over the ranks (each runs as many; fillers count 0)."""
    was_training = model.training
    model.eval()
    try:
        batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
        mine = batches[world.rank :: world.size]
        count = math.ceil(len(batches) / world.size)
        sums = torch.zeros(2, device=device, dtype=torch.float64)  # (loss sum, target tokens)
        for i in range(count):
            loss_sum, n = loss_of(_to(collate(mine[i] if i < len(mine) else batches[0], pad_id), device))
            if i < len(mine):
                sums[0] += loss_sum.double()
                sums[1] += n
        total, count_tokens = all_sum(sums, world).tolist()
        return total / max(count_tokens, 1)
    finally:
        model.train(was_training)


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _describe(config: TrainConfig, stats: dict[str, Any], total: int, out: Path,
              resume_from: Path | None, start: int, world: World = World(), saved_world: int | None = None) -> str:
    """The run in a few lines: model and method, data, processes and the global batch, steps, output."""
    method = (f"LoRA r={config.r} alpha={config.lora_alpha}" + (" DoRA" if config.use_dora else "")
              if config.method == "lora" else "full fine-tuning")
    share = 100 * stats["trainable_params"] / max(stats["total_params"], 1)
    if config.quantize != "none":
        method = f"Q{method} on a {config.quantize.upper()} base" + (" (double quant)" if config.double_quant else "")
    rounds = config.loftq_rounds()
    if rounds:
        method += f", LoftQ start ({rounds} round{'s' if rounds > 1 else ''}" + (
            f"; base saved in {out / setup.LOFTQ_BASE})" if config.rewrites_base() else ")")
    level = config.frozen_matmul_precision
    precision = "" if level == "highest" else f", frozen products at {level} precision"
    per_rank = f"batch_size {config.batch_size} x grad_accum {config.grad_accum}"
    lines = [
        f"{config.model} on {stats['device']} ({stats['dtype']}{precision}), {method}: "
        f"{stats['trainable_params']:,} of {stats['total_params']:,} parameters train ({share:.2f}%)",
        f"data: {stats['train_examples']} examples ({stats['truncated']} truncated to {config.max_seq_len} "
        f"tokens, {stats['dropped']} dropped with nothing to learn)"
        + (f", {stats['eval_examples']} for eval" if stats.get("eval_examples") else "")
        + (f", packed into {stats['train_rows']} rows" if "train_rows" in stats else ""),
    ]
    if world.distributed:
        lines.append(f"{world.size} processes ({world.strategy}): global batch {stats['global_batch']} = "
                     f"{per_rank} x {world.size} processes")
    else:
        lines.append(f"global batch {stats['global_batch']} = {per_rank}")
    lines.append(
        f"{total} steps ({stats['steps_per_epoch']} per epoch), output: {out}"
        + (f"; resuming from {resume_from} at step {start}" if resume_from else ""))
    if saved_world is not None and saved_world != world.size:
        lines.append(f"note: the checkpoint was written by {saved_world} process(es), this run has {world.size}: "
                     "same batches, but dropout masks (if any) differ from the original run's")
    return "\n".join(lines)
