"""mlan train: exact token budget, global loss normalization, exact resume, LoRA, export (tiny models, CPU, gloo).

Multi-process tests launch real torchrun workers (`mlan.train.launch.run_training`) over build directories
written with tests/shardkit.py (the build-output contract); tests/test_train_real.py trains on real builds.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlan.recipe import RecipeError, TrainSpec
from mlan.train.budget import deal_budget, resolve_budget, truncate_batch
from mlan.train.launch import TrainingFailed, run_training, worker_command
from mlan.train.metrics import read_metrics
from mlan.train.model import prepare_model
from mlan.train.schedule import TokenSchedule

sys.path.insert(0, str(Path(__file__).parents[1]))
import shardkit

IMG = shardkit.LLAVA_FC["image_token_id"]


# ---------------------------------------------------------------- units
def test_schedule_warmup_then_cosine_over_tokens():
    s = TokenSchedule(lr=1e-3, budget_tokens=10_000, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert s.at(0) == 0.0 and math.isclose(s.at(500), 5e-4) and math.isclose(s.at(1000), 1e-3)
    assert math.isclose(s.at(5500), 1e-4 + 0.9e-3 * 0.5)  # cosine midpoint
    assert math.isclose(s.at(10_000), 1e-4) and math.isclose(s.at(20_000), 1e-4)
    assert math.isclose(s.for_step(0, 400), s.at(200))  # a step's lr is taken at its token midpoint
    assert s.for_step(9_600, 400) > 1e-4  # never exactly the floor on the last step


def test_deal_budget_in_microbatch_then_rank_order():
    counts = torch.tensor([[10, 7], [8, 9]])  # (world, micro)
    allot = deal_budget(counts, 25)
    assert allot.tolist() == [[10, 7], [8, 0]]
    assert int(deal_budget(counts, 34).sum()) == 34
    assert deal_budget(counts, 0).sum() == 0


def test_truncate_batch_keeps_exact_tokens_and_counts_modalities():
    # row 0: a text doc (5) then an image doc (4: image token inside); row 1: an image doc (3) + padding (3)
    ids = torch.tensor([[1, 2, 3, 4, 5, 9, IMG, 7, 8], [IMG, 6, 6, 0, 0, 0, 0, 0, 0]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4, 5]])
    labels = ids.clone()
    labels[1, 3:] = -100
    batch = {"input_ids": ids, "labels": labels.clone(), "position_ids": pos}
    meta = {"n_tokens": 12, "row_tokens": [9, 3], "tokens_by_modality": {"text": 5, "image_text": 7}, "keys": []}
    new = truncate_batch(batch, meta, 7, IMG)
    assert new["n_tokens"] == 7 and new["tokens_by_modality"] == {"text": 5, "image_text": 2}
    assert (batch["labels"][0, 7:] == -100).all() and torch.equal(batch["labels"][0, :7], labels[0, :7])
    assert (batch["labels"][1] == -100).all()
    new = truncate_batch({**batch, "labels": labels.clone()}, meta, 10, IMG)
    assert new["tokens_by_modality"] == {"text": 5, "image_text": 5}


def test_llava_dummy_image_leaves_the_loss_unchanged():
    """A text-only LLaVA micro-batch runs the vision tower on a blank image without touching the real tokens."""
    from mlan.families.modeling import build_model, real_vocab_size
    from mlan.families.registry import same_modules_inputs
    from mlan.recipe import ModelSpec
    from mlan.train.losses import shift_labels, target_loss_sum

    torch.manual_seed(0)
    model = build_model(ModelSpec(family="llava"), shardkit.LLAVA_FC)
    ids = torch.randint(0, 120000, (2, 11))
    pos = torch.tensor([list(range(6)) + list(range(5)), list(range(11))])
    labels = ids.clone()
    labels[:, 0] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    dummy = same_modules_inputs(batch, shardkit.LLAVA_FC)
    assert batch["input_ids"].shape == (2, 11 + 16) and int(dummy.sum()) == 16
    assert batch["pixel_values"].shape == (1, 3, 56, 56) and (batch["labels"][:, 11:] == -100).all()
    n = real_vocab_size(model)
    with torch.no_grad():
        plain = target_loss_sum(model(input_ids=ids, position_ids=pos, use_cache=False).logits, shift_labels(labels), n)
        lab = batch.pop("labels")
        padded = model(**batch, use_cache=False).logits
    assert torch.allclose(target_loss_sum(padded, shift_labels(lab), n), plain, rtol=1e-6)
    assert same_modules_inputs(batch, shardkit.LLAVA_FC) is None  # has pixel_values now


def test_budget_over_the_build_is_a_recipe_error():
    manifest = {"totals": {"tokens": 1000}}
    assert resolve_budget(TrainSpec(), manifest) == 1000
    assert resolve_budget(TrainSpec(budget_tokens=600), manifest) == 600
    with pytest.raises(RecipeError, match="budget_tokens = 2000: the build holds only 1000"):
        resolve_budget(TrainSpec(budget_tokens=2000), manifest)


def test_worker_command_is_torchrun():
    cmd = worker_command("r.yaml", "b", "o", 2, True, ["train.lr=1e-3"])
    assert cmd[1:3] == ["-m", "mlan.train.node_agent"] and "--nproc-per-node=2" in cmd  # torchrun's agent
    assert cmd[cmd.index("-m", 3) + 1] == "mlan.commands.train_worker" and "--resume" in cmd
    assert cmd[-2:] == ["--set", "train.lr=1e-3"]
    alone = worker_command("r.yaml", "b", "o", 1, False, [])
    assert alone[1:4] == ["-m", "mlan.commands.train_worker", "r.yaml"]  # one worker: no agent, a world of one


# ---------------------------------------------------------------- multi-process runs
TINY_LLAVA_RECIPE = """
model: {family: llava, config: tiny}
train:
  lr: 3.0e-3
  warmup_ratio: 0.1
  batch_rows: 1
  grad_accum: 1
  loader_workers: 0
"""


@pytest.fixture(scope="module")
def llava_build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    rows = shardkit.random_rows(24, seed=3, family_config=shardkit.LLAVA_FC)
    shardkit.write_build(root / "build", rows, shardkit.LLAVA_FC, seq_len=64, rows_per_shard=8)
    (root / "recipe.yaml").write_text(TINY_LLAVA_RECIPE)
    return root


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def two_rank_run(llava_build) -> Path:
    """2 ranks × 1 row, checkpoints every 150 tokens, budget = 700 of the build's tokens (a cut last step)."""
    out = llava_build / "run-2x1"
    run_training(llava_build / "recipe.yaml", llava_build / "build", out, nproc=2,
                 overrides=["train.budget_tokens=700", "train.checkpoint_every_tokens=150"])
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_budget_is_exact_and_export_reloads(two_rank_run, llava_build):
    from transformers import LlavaForConditionalGeneration

    lines = read_metrics(two_rank_run / "metrics.jsonl")
    assert lines[-1]["tokens"] == 700 and all(a["tokens"] < 700 for a in lines[:-1])
    assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))
    assert all(r["tokens"] == r["tokens_text"] + r["tokens_image_text"] for r in lines)
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    manifest = json.loads((llava_build / "build" / "manifest.json").read_text())
    assert manifest["totals"]["tokens"] > 700  # the budget really cut the build
    model = LlavaForConditionalGeneration.from_pretrained(two_rank_run / "final")
    assert model.get_input_embeddings().weight.shape[0] == IMG + 1
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(two_rank_run / "final")
    assert type(proc).__name__ == "LlavaProcessor" and proc.tokenizer.convert_tokens_to_ids("<|image|>") == IMG
    assert proc.image_processor.crop_size["height"] == shardkit.LLAVA_FC["image_size"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_ranks_equal_one_rank_with_grad_accumulation(two_rank_run, llava_build):
    out = llava_build / "run-1x2"
    run_training(llava_build / "recipe.yaml", llava_build / "build", out, nproc=1,
                 overrides=["train.budget_tokens=700", "train.grad_accum=2"])
    a, b = read_metrics(two_rank_run / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["loss_tokens"] for r in a] == [r["loss_tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * max(1.0, abs(ra["loss"])), (ra, rb)
    # weights agree to Adam's amplification of fp32 summation-order noise (update ≈ lr·sign for tiny grads)
    wa, wb = _weights(two_rank_run), _weights(out)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 3e-4


def _kill_after_checkpoint(cmd: list[str], out: Path, env: dict, sig: signal.Signals, after: int = 0,
                           timeout: float = 200, below: int = 3) -> str:
    """Start `mlan train` and send `sig` to that process alone (as `kill PID` from a shell) once a checkpoint newer
    than step `after` exists and a later step is logged; the `below` processes it started at least (torchrun's
    agent and two workers) must be gone within 10 s (SIGTERM: torchrun stops them; SIGKILL: the parent-death
    signal). Returns the command's stderr."""
    from mlan.child_process import alive, descendants

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
        tree: set[tuple[int, str]] = set()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                tree |= descendants(proc.pid)
                ckpts = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*[0-9]")]
                ckpts = [c for c in ckpts if c > after]
                steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")] if ckpts else []
                if ckpts and steps and max(steps) > min(ckpts):
                    tree |= descendants(proc.pid)
                    assert len(tree) >= below, tree
                    os.kill(proc.pid, sig)
                    proc.wait(timeout=60)
                    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), proc.returncode
                    gone_by = time.monotonic() + 10
                    while alive(tree) and time.monotonic() < gone_by:
                        time.sleep(0.1)
                    assert not alive(tree), f"still running 10 s after {sig.name} of `mlan train`: {alive(tree)}"
                    err.seek(0)
                    return err.read()
                if proc.poll() is not None:
                    raise AssertionError(f"run ended (status {proc.returncode}) before it could be killed")
                time.sleep(0.02)
            raise AssertionError("no checkpoint within the timeout")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid, _ in alive(tree):  # on failure: what the kill left behind
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(two_rank_run, llava_build):
    """`kill` (SIGTERM) of `mlan train` mid-run stops torchrun and its workers in order (status 143, no
    traceback); `kill -9` of the resumed run takes them down too; the second `--resume` then continues to the
    uninterrupted run's steps, schedule, losses and weights."""
    out = llava_build / "run-killed"
    overrides = ["train.budget_tokens=700", "train.checkpoint_every_tokens=150"]
    cmd = [sys.executable, "-m", "mlan.cli", "train", str(llava_build / "recipe.yaml"), "--shards",
           str(llava_build / "build"), "--out", str(out), "--nproc", "2", *[a for o in overrides for a in ("--set", o)]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    stderr = _kill_after_checkpoint(cmd, out, env, signal.SIGTERM)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (out / "final").exists()
    with pytest.raises(TrainingFailed, match="has checkpoints"):  # a run folder with checkpoints refuses a fresh start
        run_training(llava_build / "recipe.yaml", llava_build / "build", out, nproc=2, overrides=overrides)
    with pytest.raises(TrainingFailed, match="LR schedule differs"):  # the checkpointed schedule is kept
        run_training(llava_build / "recipe.yaml", llava_build / "build", out, nproc=2, resume=True,
                     overrides=[*overrides, "train.lr=1e-3"])
    resumed_from = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*[0-9]"))
    _kill_after_checkpoint([*cmd, "--resume"], out, env, signal.SIGKILL, after=resumed_from)
    assert not (out / "final").exists()
    run_training(llava_build / "recipe.yaml", llava_build / "build", out, nproc=2, resume=True, overrides=overrides)
    ref, got = read_metrics(two_rank_run / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]  # the schedule continues exactly
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref] and got[-1]["tokens"] == 700
    for ra, rb in zip(ref, got):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-6 * max(1.0, abs(ra["loss"]))
    wa, wb = _weights(two_rank_run), _weights(out)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_lone_worker_dies_with_mlan_train(llava_build):
    """`mlan train --nproc 1` runs its worker without torchrun: `kill -9` of `mlan train` takes it down too."""
    out = llava_build / "run-lone-killed"
    cmd = [sys.executable, "-m", "mlan.cli", "train", str(llava_build / "recipe.yaml"), "--shards",
           str(llava_build / "build"), "--out", str(out), "--nproc", "1", "--set", "train.budget_tokens=700",
           "--set", "train.checkpoint_every_tokens=150"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    _kill_after_checkpoint(cmd, out, env, signal.SIGKILL, below=1)
    assert not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_lora_changes_only_adapters_and_projector_then_merges(llava_build):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import LlavaForConditionalGeneration

    from mlan.families import modeling
    from mlan.recipe import load_recipe

    out = llava_build / "run-lora"
    overrides = ["train.lora.enabled=true", "train.budget_tokens=400", "train.checkpoint_every_tokens=100000"]
    run_training(llava_build / "recipe.yaml", llava_build / "build", out, nproc=2, overrides=overrides)
    recipe = load_recipe(llava_build / "recipe.yaml", overrides)
    fc = shardkit.LLAVA_FC
    initial = prepare_model(recipe, fc)  # the same seeded build the workers started from
    start = {k: v.detach().clone() for k, v in initial.state_dict().items()}
    ckpt = max((out / "checkpoints").glob("step-*[0-9]"))
    dcp_to_torch_save(ckpt, out / "ckpt.pt")
    trained = torch.load(out / "ckpt.pt", weights_only=False)["model"]
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all("lora_" in k or "multi_modal_projector" in k for k in changed), sorted(changed)[:5]
    assert any("lora_B" in k for k in changed) and any("multi_modal_projector" in k for k in changed)
    exported = LlavaForConditionalGeneration.from_pretrained(out / "final")
    names = [n for n, _ in exported.named_parameters()]
    assert not any("lora" in n for n in names)
    # the merge is W + scale·B·A (rsLoRA: alpha / sqrt(r)); check one projection by hand
    initial.load_state_dict(trained)
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    r = modeling.lora_rank(initial, recipe.train.lora)
    scale = recipe.train.lora.alpha / math.sqrt(r)
    want = trained[f"{key}.base_layer.weight"] + scale * trained[f"{key}.lora_B.default.weight"] @ \
        trained[f"{key}.lora_A.default.weight"]
    got = exported.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------- real builds of ../shared/data
@pytest.fixture(scope="module")
def real_builds(tiny_real_builds) -> dict[str, Path]:
    """One small real build per family (the recipes' sources, 10k tokens in rows of 256; tests/conftest.py)."""
    return tiny_real_builds


def _same_logits_after_export(run: Path, recipe_path: Path, overrides: list[str], build_dir: Path) -> None:
    """The final DCP checkpoint in a fresh model and the save_pretrained export give the same logits."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, LlavaForConditionalGeneration, MllamaForConditionalGeneration

    from mlan.data.loader import make_loader
    from mlan.families.mllama.patch import apply_reference_cross_attention
    from mlan.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    fc = json.loads((build_dir / "manifest.json").read_text())["family_config"]
    trained = prepare_model(recipe, fc)
    dcp_to_torch_save(max((run / "checkpoints").glob("step-*[0-9]")), run / "final.pt")
    trained.load_state_dict(torch.load(run / "final.pt", weights_only=False)["model"])
    cls = {"llava": LlavaForConditionalGeneration, "mllama": MllamaForConditionalGeneration}[fc["family"]]
    assert AutoConfig.from_pretrained(run / "final").model_type == fc["family"]
    exported = cls.from_pretrained(run / "final")
    if fc["family"] == "mllama":
        apply_reference_cross_attention(exported)
    batch = next(iter(make_loader(str(build_dir), 0, 1, 1, 0, 0)))
    batch.pop("meta")
    batch.pop("labels")
    with torch.no_grad():
        a = trained.eval()(**batch, use_cache=False).logits
        b = exported.eval()(**batch, use_cache=False).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("family,budget", [("llava", None), ("mllama", 7500)])
def test_tiny_recipe_trains_on_a_real_build(real_builds, repo_root, family, budget):
    build_dir = real_builds[family]
    manifest = json.loads((build_dir / "manifest.json").read_text())
    recipe = repo_root / "recipes" / f"tiny-{family}.yaml"
    overrides = ["train.grad_accum=1", "train.checkpoint_every_tokens=1000000", "train.loader_workers=0",
                 f"train.budget_tokens={budget if budget else 'null'}"]
    run = build_dir.parent / f"run-{family}"
    final = run_training(recipe, build_dir, run, nproc=2, overrides=overrides)
    lines = read_metrics(run / "metrics.jsonl")
    want = budget or manifest["totals"]["tokens"]
    assert lines[-1]["tokens"] == want and lines[-1]["tokens"] < manifest["totals"]["tokens"] + (budget is None)
    assert lines[-1]["tokens_image_text"] > 0 and lines[-1]["tokens_text"] > 0
    first = sum(r["loss"] for r in lines[:3]) / 3
    last = sum(r["loss"] for r in lines[-3:]) / 3
    assert last < first - 0.3, (first, last)
    # some steps ran a rank on a micro-batch without any image, and no rank hung
    assert sum(r["text_only_microbatches"] for r in lines) > 0
    _same_logits_after_export(run, recipe, overrides, build_dir)
    assert (final / "model.safetensors").is_file()


def test_launcher_fails_fast_before_starting_workers(llava_build, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        run_training(llava_build / "recipe.yaml", tmp_path / "missing", tmp_path / "run", nproc=2)
    with pytest.raises(RecipeError, match="budget_tokens = 10000000"):
        run_training(llava_build / "recipe.yaml", llava_build / "build", tmp_path / "run", nproc=2,
                     overrides=["train.budget_tokens=10000000"])
    assert not (tmp_path / "run").exists()
    # a fresh start on a folder with checkpoints: refused before torchrun (a worker's rank 0 would first clear the
    # half-written `.tmp` step a killed run left, then refuse)
    steps = tmp_path / "used" / "checkpoints"
    (steps / "step-00000003").mkdir(parents=True)
    (steps / "step-00000004.tmp").mkdir()
    with pytest.raises(TrainingFailed, match=r"has checkpoints \(step-00000003\); pass --resume"):
        run_training(llava_build / "recipe.yaml", llava_build / "build", tmp_path / "used", nproc=2)
    assert (steps / "step-00000004.tmp").is_dir()
