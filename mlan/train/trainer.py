"""The training loop: packed rows in, an exact token budget (budget.py), a token-based LR schedule, DCP
checkpoints of Stateful objects (state.py), export (export.py).

One optimizer step = `grad_accum` micro-batches on every rank; the last step is cut to exactly the budget's
remaining tokens. The loss is the step's summed token loss divided by the step's *global* loss-token count
(all-reduced before backward) and FSDP sums gradients, so world size and grad accumulation do not change it.
Worker entry point: `python -m mlan.commands.train_worker` under torchrun.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from mlan import progress
from mlan.data.loader import ShardError
from mlan.data.loader import make_loader as make_rank_loader
from mlan.errors import MlanError, TrainError
from mlan.families import modeling
from mlan.families.registry import same_modules_inputs
from mlan.mixture.shards import read_manifest
from mlan.mixture.verify import check_build
from mlan.recipe import Recipe, TrainSpec, load_recipe
from mlan.train import checkpoint as ckpt
from mlan.train.budget import deal_budget, resolve_budget, truncate_batch
from mlan.train.export import export
from mlan.train.losses import IGNORE_INDEX, count_loss_tokens, shift_labels, target_loss_sum
from mlan.train.metrics import MetricsLog, Progress, peak_flops, reset_peak_memory, step_telemetry
from mlan.train.model import make_optimizer, prepare_model
from mlan.train.parallel import DistEnv, ParallelConfig, init_distributed, parallelize, resolve_precision
from mlan.train.run_folder import latest_checkpoint, remove_unfinished
from mlan.train.schedule import STAGE_LR, TokenSchedule
from mlan.train.state import Resumable, TrainState, run_state
from mlan.train.trackers import make_trackers


# ---------------------------------------------------------------- one step
@dataclass(frozen=True)
class StepResult:
    """One step's figures, summed over ranks."""

    tokens: int
    tokens_text: int
    tokens_image_text: int
    loss: float
    loss_tokens: int
    grad_norm: float
    text_only_microbatches: int


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def take(it: Iterator, n: int) -> list:
    """Up to `n` items of `it` (fewer at its end)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


class Stepper:
    """Runs one optimizer step over a list of micro-batches; every rank calls it with the same count."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, spec: TrainSpec,
                 real_vocab: int, family_config: dict[str, Any]):
        self.model, self.optimizer, self.env, self.spec = model, optimizer, env, spec
        self.real_vocab, self.family_config = real_vocab, family_config
        self.image_token_id = int(family_config["image_token_id"])
        self.params = [p for p in model.parameters() if p.requires_grad]

    def all_gather_counts(self, counts: list[int]) -> torch.Tensor:
        """(world, len(counts)) table of every rank's integers (on the backend's device: NCCL needs CUDA)."""
        local = torch.tensor(counts, dtype=torch.int64, device=self.env.device)
        out = [torch.zeros_like(local) for _ in range(self.env.world_size)]
        dist.all_gather(out, local)
        return torch.stack(out).cpu()

    def _all_reduce(self, values: list[float], dtype: torch.dtype = torch.float64) -> list[float]:
        t = torch.tensor(values, dtype=dtype, device=self.env.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def step(self, micro: list[dict[str, Any]], tokens_before: int, budget: int, lr: float | None,
             schedule: TokenSchedule) -> StepResult:
        """One optimizer step: cut to the budget, schedule, forward + loss and backward per micro-batch,
        clip, step; returns the step's figures summed over ranks."""
        metas = [b.pop("meta") for b in micro]
        step_tokens, text_only = self._cut_to_budget(micro, metas, budget - tokens_before)
        self._set_lr(schedule.for_step(tokens_before, step_tokens) if lr is None else lr)
        global_loss_tokens, text, img = self._all_reduce([
            sum(count_loss_tokens(b["labels"]) for b in micro),
            sum(int(m["tokens_by_modality"].get("text", 0)) for m in metas),
            sum(int(m["tokens_by_modality"].get("image_text", 0)) for m in metas)])
        denom = max(global_loss_tokens, 1.0)  # the step's global loss-token count, known before any backward
        loss_sum = 0.0
        for b in micro:
            loss = self._forward_loss(b)
            self._backward(loss, denom)
            loss_sum += float(loss.detach())
            del loss
        grad_norm = self._clip()
        self._optimizer_step()
        (global_loss_sum,) = self._all_reduce([loss_sum])
        return StepResult(tokens=step_tokens, tokens_text=int(text), tokens_image_text=int(img),
                          loss=global_loss_sum / denom, loss_tokens=int(global_loss_tokens),
                          grad_norm=grad_norm, text_only_microbatches=text_only)

    def _cut_to_budget(self, micro: list[dict[str, Any]], metas: list[dict[str, Any]],
                       left: int) -> tuple[int, int]:
        """Every rank's token and image counts; on the last step, micro-batches truncated (in place, `metas`
        updated) so the step consumes exactly the `left` tokens. Returns (step tokens, text-only
        micro-batches: those Mllama runs on a dummy image so every rank runs the same modules)."""
        table = self.all_gather_counts([int(m["n_tokens"]) for m in metas] + [int(m.get("n_images", 0)) for m in metas])
        counts, images = table[:, :len(metas)], table[:, len(metas):]
        text_only = int((images == 0).sum())
        step_tokens = int(counts.sum())
        if step_tokens > left:
            allot = deal_budget(counts, left)
            for j, (b, m) in enumerate(zip(micro, metas)):
                if int(allot[self.env.rank, j]) < int(m["n_tokens"]):
                    metas[j] = truncate_batch(b, m, int(allot[self.env.rank, j]), self.image_token_id)
            step_tokens = int(allot.sum())
        return step_tokens, text_only

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _forward_loss(self, b: dict[str, Any]) -> torch.Tensor:
        """One micro-batch's summed token loss; the lm_head runs only where a loss is taken."""
        dummy = same_modules_inputs(b, self.family_config)
        b = to_device(b, self.env.device)
        targets = shift_labels(b.pop("labels"))
        keep = targets != IGNORE_INDEX
        if dummy is not None:
            dummy = dummy.to(self.env.device)
            keep = keep | dummy
        logits = self.model(**b, use_cache=False, logits_to_keep=keep).logits
        loss = target_loss_sum(logits, targets[keep], self.real_vocab, self.spec.soft_targets or 0.0)
        if dummy is not None:  # keep the vision tower and projector in every rank's backward
            loss = loss + 0.0 * logits.reshape(-1, logits.shape[-1])[dummy[keep]].float().sum()
        return loss

    @staticmethod
    def _backward(loss: torch.Tensor, denom: float) -> None:
        """Gradients of loss / (the step's global loss tokens): FSDP's sum over ranks is the step's mean."""
        (loss / denom).backward()

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _clip(self) -> float:
        max_norm = self.spec.grad_clip if self.spec.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)


# ---------------------------------------------------------------- one run
@dataclass(frozen=True)
class RunPaths:
    """Where a run writes: metrics.jsonl, checkpoints/, final/."""

    run: Path

    @property
    def metrics(self) -> Path:
        return self.run / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.run / "final"


@dataclass
class Run:
    """One rank's run once set up: what the loop reads, updates and checkpoints."""

    env: DistEnv
    recipe: Recipe
    manifest: dict[str, Any]
    budget: int
    paths: RunPaths
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: TokenSchedule
    loader: Resumable
    flops: Any
    real_vocab: int
    precision: str
    state: TrainState

    @property
    def spec(self) -> TrainSpec:
        return self.recipe.train

    @property
    def family_config(self) -> dict[str, Any]:
        return self.manifest["family_config"]

    def checkpoint_state(self) -> dict[str, Stateful]:
        return run_state(self.model, self.optimizer, self.state, self.schedule, self.loader)


BatchesFactory = Callable[[DistEnv], Resumable]


def verify_on_rank0(shards: str, env: DistEnv) -> None:
    """Collective: rank 0 checks the manifest and every shard's sha256; every rank raises its verdict."""
    problem: list[str | None] = [None]
    if env.is_main:
        try:
            check_build(shards)
        except MlanError as err:
            problem[0] = str(err)
    if env.world_size > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ShardError(problem[0])


def open_run_dir(paths: RunPaths, resume: bool, env: DistEnv) -> Path | None:
    """The run folder, cleared of half-written checkpoints; its newest checkpoint (one needs --resume)."""
    paths.run.mkdir(parents=True, exist_ok=True)
    if env.is_main:  # half-written checkpoints of a killed run: never resumed from, never in the way
        remove_unfinished(paths.run)
    latest = latest_checkpoint(paths.run)
    if latest is not None and not resume:
        raise TrainError(f"{paths.run}: has checkpoints ({latest.name}); pass --resume or choose a new --out")
    return latest


def set_up(recipe: Recipe, manifest: dict[str, Any], budget: int, paths: RunPaths, env: DistEnv,
           loader_factory: BatchesFactory) -> Run:
    """The seeded model, sharded (no model.to(device): fully_shard moves each block to the GPU as it shards it,
    peak = one block), its optimizer, the schedule over the budget and this rank's loader."""
    spec = recipe.train
    model = prepare_model(recipe, manifest["family_config"])
    flops = modeling.flops_model(model)
    real_vocab = modeling.real_vocab_size(model)
    precision = resolve_precision(spec.precision, env.device)
    parallelize(model, ParallelConfig(precision=precision, activation_checkpointing=spec.activation_checkpointing,
                                      compile=spec.compile))
    optimizer = make_optimizer(model, spec)
    schedule = TokenSchedule(lr=spec.lr or STAGE_LR[spec.stage], budget_tokens=budget,
                             warmup_ratio=spec.warmup_ratio, min_lr_ratio=spec.min_lr_ratio)
    return Run(env, recipe, manifest, budget, paths, model, optimizer, schedule, loader_factory(env), flops,
               real_vocab, precision, TrainState())


def announce(run: Run) -> None:
    """Rank 0's one line on what is about to train."""
    if run.env.is_main:
        summary = modeling.trainable_summary(run.model)
        progress.say(f"mlan train: {run.recipe.model.family} ({run.recipe.model.config}), world "
                     f"{run.env.world_size}, {run.precision}, budget {run.budget} tokens, trainable "
                     f"{summary['trainable']:,}/{summary['total']:,} params")


def open_metrics(run: Run, resume: bool) -> MetricsLog | None:
    """Rank 0's metrics.jsonl (cut back to the checkpoint's step on resume) and trackers."""
    if not run.env.is_main:
        return None
    spec = run.spec
    trackers = make_trackers([*spec.trackers, *(["tensorboard"] if spec.tensorboard else [])], run.paths.run,
                             {f"train.{k}": v for k, v in spec.model_dump().items()})
    return MetricsLog(run.paths.metrics, resume_step=run.state.step if resume else None, trackers=trackers)


def step_record(run: Run, res: StepResult, wait: float, dt: float, peak: float | None) -> dict[str, Any]:
    """One metrics.jsonl line."""
    state = run.state
    record = {"step": state.step, "tokens": state.tokens, "tokens_text": state.tokens_text,
              "tokens_image_text": state.tokens_image_text, "loss": res.loss,
              "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": res.grad_norm,
              "tokens_per_s": res.tokens / dt, "step_tokens": res.tokens, "loss_tokens": res.loss_tokens,
              "text_only_microbatches": res.text_only_microbatches, **step_telemetry(run.env.device, wait, dt)}
    if peak:
        record["mfu"] = run.flops.per_token(run.manifest["seq_len"]) * res.tokens / dt / \
            (peak * run.env.world_size)
    return record


def advance(state: TrainState, res: StepResult) -> None:
    """Count a finished step."""
    state.step += 1
    state.tokens += res.tokens
    state.tokens_text += res.tokens_text
    state.tokens_image_text += res.tokens_image_text
    state.loss_tokens += res.loss_tokens


def next_micro_batches(it: Iterator, stepper: Stepper, grad_accum: int) -> tuple[list, float]:
    """This step's micro-batches and the seconds spent waiting for them; every rank must hold as many."""
    t_wait = time.perf_counter()
    micro = take(it, grad_accum)
    wait = time.perf_counter() - t_wait  # the loader's share of the step (telemetry)
    have = stepper.all_gather_counts([len(micro)])
    if int(have.min()) != int(have.max()):
        raise TrainError(f"ranks hold different numbers of micro-batches this step: {have.flatten().tolist()}"
                         " (the loader must give every rank the same number of batches)")
    return micro, wait


def run_steps(run: Run, log: MetricsLog | None) -> None:
    """Steps until the budget is spent, a checkpoint every `checkpoint_every_tokens` and at the end."""
    env, spec, state = run.env, run.spec, run.state
    progress = Progress(run.budget, state.tokens, enabled=env.is_main)
    peak = peak_flops(env.device, spec.peak_flops)
    stepper = Stepper(run.model, run.optimizer, env, spec, run.real_vocab, family_config=run.family_config)
    every = spec.checkpoint_every_tokens
    it = iter(run.loader)
    run.model.train()
    try:
        while state.tokens < run.budget:
            micro, wait = next_micro_batches(it, stepper, spec.grad_accum)
            if not micro:
                break
            reset_peak_memory(env.device)
            t0 = time.perf_counter()
            res = stepper.step(micro, state.tokens, run.budget, None, run.schedule)
            dt = time.perf_counter() - t0
            before = state.tokens
            advance(state, res)
            if env.is_main:
                record = step_record(run, res, wait, dt, peak)
                if state.step % spec.log_every == 0 or state.tokens >= run.budget:
                    log.write(record)
                progress.update(state.tokens, record)
            if every and (state.tokens // every > before // every or state.tokens >= run.budget):
                ckpt.save_checkpoint(run.paths.run, state.step, run.checkpoint_state())
    finally:
        it.close()  # stop the DataLoader workers now, not during interpreter teardown
        progress.close()
        if log is not None:
            log.close()


def train(recipe_path: str, shards: str, out: str, resume: bool = False, overrides: Iterable[str] = (),
          batches_factory: BatchesFactory | None = None, verify: bool = True) -> Path:
    """Run (or continue) a training run on this process's rank; returns RUN/final."""
    env = init_distributed()
    recipe = load_recipe(recipe_path, list(overrides))
    manifest = read_manifest(str(shards)).data
    if verify:  # before step 1: never train on a shard `mlan verify` would reject
        verify_on_rank0(shards, env)
    budget = resolve_budget(recipe.train, manifest)
    paths = RunPaths(Path(out))
    latest = open_run_dir(paths, resume, env)
    run = set_up(recipe, manifest, budget, paths, env, batches_factory or (
        lambda env: make_rank_loader(str(shards), rank=env.rank, world_size=env.world_size,
                                     batch_rows=recipe.train.batch_rows, workers=recipe.train.loader_workers,
                                     seed=recipe.train.seed)))
    if resume and latest is not None:
        ckpt.load_checkpoint(latest, run.checkpoint_state())
        if env.is_main:
            progress.say(f"resumed from {latest} at step {run.state.step}, {run.state.tokens} tokens")
    announce(run)
    run_steps(run, open_metrics(run, resume))
    if run.state.tokens != budget:
        raise TrainError(f"the loader ran out at {run.state.tokens} of {budget} budget tokens "
                         "(manifest totals and shards disagree?)")
    export(run.model, recipe, run.family_config, paths.final, env)
    dist.barrier()
    return paths.final
