"""The training loop: packed rows in, an exact token budget, a token-based LR schedule, DCP checkpoints, export.

One optimizer step = `grad_accum` micro-batches on every rank. Before the step, ranks all-gather their
micro-batches' sequence-token counts: if the step would pass the budget, the remaining tokens are dealt
in (micro-batch, rank) order and each micro-batch keeps only its share (later positions of its rows get
no loss and are not counted — causal attention means the kept positions see exactly what a physically
truncated row would). The loss is the step's summed token loss divided by the step's *global*
loss-token count (all-reduced before backward) and FSDP sums gradients, so world size and grad
accumulation do not change it. Worker entry point: `python -m mlan.train.trainer` under torchrun.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mlan.child_process import start_parent_watchdog
from mlan.data.loader import ShardError
from mlan.errors import MlanError, one_line
from mlan.families import modeling
from mlan.families.registry import same_modules_inputs
from mlan.mixture.shards import read_manifest as read_shards_manifest
from mlan.recipe import Recipe, RecipeError, TrainSpec, load_recipe
from mlan.train import checkpoint as ckpt
from mlan.train.attention import set_attention
from mlan.train.losses import IGNORE_INDEX, count_loss_tokens, shift_labels, target_loss_sum
from mlan.train.metrics import MetricsLog, Progress, peak_flops, reset_peak_memory, step_telemetry
from mlan.train.node_agent import ERROR_FILE_ENV, reported_error
from mlan.train.parallel import DistEnv, ParallelConfig, init_distributed, parallelize, resolve_precision
from mlan.train.schedule import STAGE_LR, TokenSchedule
from mlan.train.shard_check import verify_build
from mlan.train.trackers import make_trackers


class TrainError(MlanError, RuntimeError):
    """A run that cannot start or continue; the message says which input is wrong."""


# ---------------------------------------------------------------- inputs
def read_manifest(build_dir: str | Path) -> dict[str, Any]:
    """The build's manifest.json (local path or fsspec URL), checked for the keys training needs."""
    manifest = read_shards_manifest(str(build_dir)).data
    for key in ("family_config", "totals"):
        if key not in manifest:
            raise TrainError(f"{build_dir}/manifest.json: missing key {key!r}")
    return manifest


def resolve_budget(train: TrainSpec, manifest: dict[str, Any]) -> int:
    """`train.budget_tokens`, default the build's total sequence tokens; never more than the build holds."""
    total = int(manifest["totals"]["tokens"])
    budget = train.budget_tokens or total
    if budget > total:
        raise RecipeError(f"train.budget_tokens = {budget}: the build holds only {total} sequence tokens "
                          "(one pass); raise mixture.budget and rebuild")
    return budget


# ---------------------------------------------------------------- exact budget
def deal_budget(counts: torch.Tensor, remaining: int) -> torch.Tensor:
    """Share `remaining` tokens over a (world, micro) count table, micro-batch-major then rank order."""
    allot = torch.zeros_like(counts)
    left = int(remaining)
    for j in range(counts.shape[1]):
        for r in range(counts.shape[0]):
            take = min(int(counts[r, j]), left)
            allot[r, j] = take
            left -= take
    return allot


def row_token_counts(batch: dict[str, Any], meta: dict[str, Any]) -> list[int]:
    """Real (unpadded, non-filler) tokens per row: the loader's `meta.row_tokens`, else an attention mask."""
    if "row_tokens" in meta:
        return [int(n) for n in meta["row_tokens"]]
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(dim=1)]
    if batch["input_ids"].shape[0] == 1:
        return [int(meta["n_tokens"])]
    raise TrainError(f"batch {meta.get('keys')}: no meta.row_tokens; cannot cut it to the token budget")


def modality_counts(ids: torch.Tensor, position_ids: torch.Tensor, lengths: list[int], kept: list[int],
                    image_token_id: int) -> dict[str, int]:
    """Kept tokens by modality: a document (positions restart at 0) is image_text iff it holds an image token."""
    out = {"text": 0, "image_text": 0}
    for row_ids, row_pos, n, k in zip(ids, position_ids.reshape(ids.shape), lengths, kept):
        starts = (row_pos[:n] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        for a, e in zip(starts, starts[1:] + [n]):
            has_image = bool((row_ids[a:e] == image_token_id).any())
            out["image_text" if has_image else "text"] += max(0, min(e, k) - a)
    return out


def truncate_batch(batch: dict[str, Any], meta: dict[str, Any], keep_tokens: int,
                   image_token_id: int) -> dict[str, Any]:
    """Keep the first `keep_tokens` real tokens (row by row); later positions get no loss. Returns new meta."""
    lengths = row_token_counts(batch, meta)
    labels = batch["labels"].clone()
    kept, left = [], keep_tokens
    for i, n in enumerate(lengths):
        k = min(n, left)
        labels[i, k:] = IGNORE_INDEX
        kept.append(k)
        left -= k
    batch["labels"] = labels
    by_mod = modality_counts(batch["input_ids"], batch["position_ids"], lengths, kept, image_token_id)
    return {**meta, "n_tokens": keep_tokens, "tokens_by_modality": by_mod}


# ---------------------------------------------------------------- one step
@dataclass
class TrainState:
    """What the loop carries from step to step (saved in every checkpoint)."""

    step: int = 0
    tokens: int = 0
    tokens_text: int = 0
    tokens_image_text: int = 0
    loss_tokens: int = 0


@dataclass(frozen=True)
class StepResult:
    tokens: int
    tokens_text: int
    tokens_image_text: int
    loss: float
    loss_tokens: int
    grad_norm: float
    text_only_microbatches: int


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def take(it: Iterator, n: int) -> list:
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

    def _all_reduce(self, values: list[float], dtype=torch.float64) -> list[float]:
        t = torch.tensor(values, dtype=dtype, device=self.env.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def step(self, micro: list[dict[str, Any]], tokens_before: int, budget: int, lr: float | None,
             schedule: TokenSchedule) -> StepResult:
        metas = [b.pop("meta") for b in micro]
        table = self.all_gather_counts([int(m["n_tokens"]) for m in metas] + [int(m.get("n_images", 0)) for m in metas])
        counts, images = table[:, :len(metas)], table[:, len(metas):]
        # micro-batches without any real image (Mllama runs them on a dummy image: same modules on every rank)
        text_only = int((images == 0).sum())
        step_tokens = int(counts.sum())
        if step_tokens > budget - tokens_before:  # the last step: consume exactly what is left
            allot = deal_budget(counts, budget - tokens_before)
            for j, (b, m) in enumerate(zip(micro, metas)):
                if int(allot[self.env.rank, j]) < int(m["n_tokens"]):
                    metas[j] = truncate_batch(b, m, int(allot[self.env.rank, j]), self.image_token_id)
            step_tokens = int(allot.sum())
        lr = schedule.for_step(tokens_before, step_tokens) if lr is None else lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        local_loss_tokens = sum(count_loss_tokens(b["labels"]) for b in micro)
        local_text = sum(int(m["tokens_by_modality"].get("text", 0)) for m in metas)
        local_img = sum(int(m["tokens_by_modality"].get("image_text", 0)) for m in metas)
        global_loss_tokens, text, img = self._all_reduce([local_loss_tokens, local_text, local_img])
        denom = max(global_loss_tokens, 1.0)
        loss_sum = 0.0
        for b in micro:
            dummy = same_modules_inputs(b, self.family_config)
            b = to_device(b, self.env.device)
            targets = shift_labels(b.pop("labels"))
            keep = targets != IGNORE_INDEX  # the lm_head runs only where a loss is taken
            if dummy is not None:
                dummy = dummy.to(self.env.device)
                keep = keep | dummy
            logits = self.model(**b, use_cache=False, logits_to_keep=keep).logits
            loss = target_loss_sum(logits, targets[keep], self.real_vocab, self.spec.soft_targets or 0.0)
            if dummy is not None:  # keep the vision tower and projector in every rank's backward
                loss = loss + 0.0 * logits.reshape(-1, logits.shape[-1])[dummy[keep]].float().sum()
            (loss / denom).backward()
            loss_sum += float(loss.detach())
            del logits, loss
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        (global_loss_sum,) = self._all_reduce([loss_sum])
        return StepResult(tokens=step_tokens, tokens_text=int(text), tokens_image_text=int(img),
                          loss=global_loss_sum / denom, loss_tokens=int(global_loss_tokens), grad_norm=grad_norm,
                          text_only_microbatches=text_only)

    def _clip(self) -> float:
        max_norm = self.spec.grad_clip if self.spec.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)


# ---------------------------------------------------------------- setup
def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RecipeError("train.freeze: every parameter is frozen; nothing to train")
    return torch.optim.AdamW(params, lr=spec.lr or STAGE_LR[spec.stage], betas=spec.betas,
                             weight_decay=spec.weight_decay, foreach=True)


def prepare_model(recipe: Recipe, family_config: dict[str, Any]) -> nn.Module:
    """Build (seeded, so every rank is identical), set the LM attention (`train.attention`), freeze by policy, add
    LoRA adapters."""
    torch.manual_seed(recipe.train.seed)
    model = modeling.build_model(recipe.model, family_config)
    set_attention(model, recipe.train.attention)
    freeze = modeling.freeze_policy(recipe.train.stage, recipe.train.freeze)
    modeling.apply_freeze(model, freeze)
    if recipe.train.lora.enabled:
        model = modeling.apply_lora(model, recipe.train.lora, freeze)
    return model


def make_loader(shards: str, env: DistEnv, spec: TrainSpec):
    from mlan.data.loader import make_loader as _make_loader

    return _make_loader(str(shards), rank=env.rank, world_size=env.world_size, batch_rows=spec.batch_rows,
                        workers=spec.loader_workers, seed=spec.seed)


@dataclass(frozen=True)
class RunPaths:
    run: Path

    @property
    def metrics(self) -> Path:
        return self.run / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.run / "final"


def verify_on_rank0(shards: str, env: DistEnv) -> None:
    """Collective: rank 0 checks the manifest and every shard's sha256; every rank raises its verdict."""
    problem: list[str | None] = [None]
    if env.is_main:
        try:
            verify_build(shards)
        except MlanError as err:
            problem[0] = str(err)
    if env.world_size > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ShardError(problem[0])


def train(recipe_path: str, shards: str, out: str, resume: bool = False,
          overrides: Iterable[str] = (), batches_factory=None, verify: bool = True) -> Path:
    """Run (or continue) a training run on this process's rank; returns RUN/final."""
    env = init_distributed()
    recipe = load_recipe(recipe_path, list(overrides))
    spec = recipe.train
    manifest = read_manifest(shards)
    if verify:  # before step 1: never train on a shard `mlan verify` would reject
        verify_on_rank0(shards, env)
    family_config = manifest["family_config"]
    budget = resolve_budget(spec, manifest)
    paths = RunPaths(Path(out))
    paths.run.mkdir(parents=True, exist_ok=True)
    if env.is_main:  # half-written checkpoints of a killed run: never resumed from, never in the way
        ckpt.remove_unfinished(paths.run)
    latest = ckpt.latest_checkpoint(paths.run)
    if latest is not None and not resume:
        raise TrainError(f"{paths.run}: has checkpoints ({latest.name}); pass --resume or choose a new --out")

    model = prepare_model(recipe, family_config)
    flops = modeling.flops_model(model)
    real_vocab = modeling.real_vocab_size(model)
    precision = resolve_precision(spec.precision, env.device)
    # no model.to(device): fully_shard moves each block to the GPU as it shards it (peak = one block, not the model)
    parallelize(model, ParallelConfig(precision=precision, activation_checkpointing=spec.activation_checkpointing,
                                      compile=spec.compile))
    optimizer = make_optimizer(model, spec)
    schedule = TokenSchedule(lr=spec.lr or STAGE_LR[spec.stage], budget_tokens=budget,
                             warmup_ratio=spec.warmup_ratio, min_lr_ratio=spec.min_lr_ratio)
    loader = batches_factory(env) if batches_factory else make_loader(shards, env, spec)

    state = TrainState()
    if resume and latest is not None:
        saved, cursor = ckpt.load_checkpoint(latest, model, optimizer, asdict(state))
        state = TrainState(**{k: int(v) for k, v in saved.items() if k in asdict(state)})
        loader.load_state_dict(cursor)
        if env.is_main:
            print(f"resumed from {latest} at step {state.step}, {state.tokens} tokens", file=sys.stderr)
    if env.is_main:
        summary = modeling.trainable_summary(model)
        print(f"mlan train: {recipe.model.family} ({recipe.model.config}), world {env.world_size}, {precision}, "
              f"budget {budget} tokens, trainable {summary['trainable']:,}/{summary['total']:,} params",
              file=sys.stderr)

    log = MetricsLog(paths.metrics, resume_step=state.step if resume else None,
                     trackers=make_trackers([*spec.trackers, *(["tensorboard"] if spec.tensorboard else [])],
                                            paths.run, {f"train.{k}": v for k, v in spec.model_dump().items()})) \
        if env.is_main else None
    progress = Progress(budget, state.tokens, enabled=env.is_main)
    peak = peak_flops(env.device, spec.peak_flops)
    stepper = Stepper(model, optimizer, env, spec, real_vocab,
                      family_config=family_config)
    every = spec.checkpoint_every_tokens
    it = iter(loader)
    model.train()
    try:
        while state.tokens < budget:
            t_wait = time.perf_counter()
            micro = take(it, spec.grad_accum)
            wait = time.perf_counter() - t_wait  # the loader's share of the step (telemetry)
            have = stepper.all_gather_counts([len(micro)])
            if int(have.min()) != int(have.max()):
                raise TrainError(f"ranks hold different numbers of micro-batches this step: {have.flatten().tolist()}"
                                 " (the loader must give every rank the same number of batches)")
            if not micro:
                break
            reset_peak_memory(env.device)
            t0 = time.perf_counter()
            res = stepper.step(micro, state.tokens, budget, None, schedule)
            dt = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]
            before = state.tokens
            state.step += 1
            state.tokens += res.tokens
            state.tokens_text += res.tokens_text
            state.tokens_image_text += res.tokens_image_text
            state.loss_tokens += res.loss_tokens
            if env.is_main:
                record = {"step": state.step, "tokens": state.tokens, "tokens_text": state.tokens_text,
                          "tokens_image_text": state.tokens_image_text, "loss": res.loss, "lr": lr,
                          "grad_norm": res.grad_norm, "tokens_per_s": res.tokens / dt,
                          "step_tokens": res.tokens, "loss_tokens": res.loss_tokens,
                          "text_only_microbatches": res.text_only_microbatches,
                          **step_telemetry(env.device, wait, dt)}
                if peak:
                    record["mfu"] = flops.per_token(manifest["seq_len"]) * res.tokens / dt / \
                        (peak * env.world_size)
                if state.step % spec.log_every == 0 or state.tokens >= budget:
                    log.write(record)
                progress.update(state.tokens, record)
            if every and (state.tokens // every > before // every or state.tokens >= budget):
                ckpt.save_checkpoint(paths.run, state.step, model, optimizer, asdict(state), loader.state_dict())
    finally:
        it.close()  # stop the DataLoader workers now, not during interpreter teardown
        progress.close()
        if log is not None:
            log.close()
    if state.tokens != budget:
        raise TrainError(f"the loader ran out at {state.tokens} of {budget} budget tokens "
                         "(manifest totals and shards disagree?)")
    export(model, recipe, family_config, paths.final, env)
    dist.barrier()
    return paths.final


# ---------------------------------------------------------------- export
def export(model: nn.Module, recipe: Recipe, family_config: dict[str, Any], out: Path, env: DistEnv) -> None:
    """Collective: gather the full weights; rank 0 rebuilds the model, merges LoRA, save_pretrained()s it."""
    full = ckpt.full_model_state(model)
    if not env.is_main:
        return
    plain = prepare_model(recipe, family_config)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise TrainError(f"export: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain = modeling.merge_lora(plain)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    save_processor(recipe, family_config, out)


def save_processor(recipe: Recipe, family_config: dict[str, Any], out: Path) -> None:
    """Tokenizer and image processor next to the weights, so `AutoProcessor.from_pretrained(out)` works."""
    from mlan.tokenizer import load_tokenizer

    tok = load_tokenizer(recipe.model.tokenizer)
    tok.save_pretrained(out)
    from mlan.train.processors import family_processor

    processor = family_processor(family_config, tok)
    if processor is not None:
        processor.save_pretrained(out)


# ---------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlan.train.trainer",
                                description="mlan training worker (run under torchrun; see `mlan train`)")
    p.add_argument("recipe")
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="skip the shard sha256 check before step 1")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    return p


def report_error(message: str) -> None:
    """One line for the user: to the launcher's error file under `mlan train` (it prints it once), else stderr."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:  # O_APPEND: the first rank's line stays first
            f.write(message + "\n")
    else:
        print(f"mlan train: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: exit when torchrun is gone (it may be SIGKILLed)
        start_parent_watchdog()
    rc = 0
    try:
        train(args.recipe, args.shards, args.out, args.resume, args.overrides, verify=not args.no_verify)
    except (MlanError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        report_error(one_line(err))  # a damaged shard, row or image, a bad key: one line naming it, exit 2
        rc = 2
    except Exception:
        if reported_error() is None:
            raise  # a bug: keep the traceback
        rc = 2  # a peer rank stopped on a user error and cut this rank's collective: it has said why
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    code = main()
    # A torchrun worker whose work is done and flushed leaves at once: C++ threads of the process group or
    # the loader torn down during interpreter finalization can abort ("terminate called without an active
    # exception") and turn a finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
