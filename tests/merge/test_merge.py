"""`mlan merge`: tiny random LLaVA / Mllama checkpoints (several safetensors shards) against their base Llama.

The base LLM of each pair is the VLM's own language tower plus noise, so every entry of the task vector
is non-zero and the top-K selection is unambiguous. References are independent of mlan's streaming
code: whole-tensor arithmetic with torch, full sorts, and mergekit's task arithmetic / TIES.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration, MllamaForConditionalGeneration

from mlan.cli import main
from mlan.families.name_map import NameMapError, map_names, self_attention_layer_map
from mlan.families.tiny import LLAMA3_VOCAB, tiny_llama_config, tiny_llava_config, tiny_mllama_config
from mlan.merge import MergeConfig, MergeError, merge_checkpoints, read_checkpoint

HIDDEN = 32
LLAVA_VOCAB = 4097  # a short vocabulary keeps the LLaVA tests fast; its last row is the image token


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the safetensors library (not mlan's reader)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                out[name] = f.get_tensor(name)
    return out


def tower_to_llama(name: str) -> str | None:
    """LLaVA's on-disk language-tower names → LlamaForCausalLM names (written out, not via mlan)."""
    if name.startswith("language_model.model."):
        return "model." + name[len("language_model.model."):]
    if name.startswith("language_model.lm_head."):
        return "lm_head." + name[len("language_model.lm_head."):]
    return None


def base_from_tower(vlm: dict[str, torch.Tensor], rename: dict[str, str], config, dtype, seed: int):
    """A base LlamaForCausalLM holding the VLM's tower weights + noise (so T ≠ 0 everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    llm = LlamaForCausalLM(config).to(dtype)
    state = llm.state_dict()
    for vname, lname in rename.items():
        src = vlm[vname][: state[lname].shape[0]] if vlm[vname].dim() else vlm[vname]
        noise = torch.randn(src.shape, generator=gen) * 0.02
        state[lname] = (src.float() + noise).to(dtype)
    llm.load_state_dict(state)
    return llm


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory) -> tuple[Path, Path]:
    """fp32 LLaVA (2 layers) and a Llama base with the same vocabulary, both in several shards."""
    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    config = tiny_llava_config(num_layers=2, hidden=HIDDEN)
    config.text_config.vocab_size, config.image_token_id = LLAVA_VOCAB, LLAVA_VOCAB - 1
    config.text_config.pad_token_id = LLAVA_VOCAB - 2
    vlm = LlavaForConditionalGeneration(config)
    vlm.save_pretrained(root / "vlm", max_shard_size="200KB")
    (root / "vlm" / "preprocessor_config.json").write_text('{"image_processor_type": "CLIPImageProcessor"}')
    weights = load_all(root / "vlm")
    rename = {k: tower_to_llama(k) for k in weights if tower_to_llama(k)}
    base_config = tiny_llama_config(2, HIDDEN, vocab_size=LLAVA_VOCAB)
    base_config.pad_token_id = LLAVA_VOCAB - 2
    llm = base_from_tower(weights, rename, base_config, torch.float32, seed=1)
    llm.save_pretrained(root / "llm", max_shard_size="200KB")
    assert len(list((root / "vlm").glob("*.safetensors"))) >= 3
    return root / "vlm", root / "llm"


# The 10-layer tiny Mllama has cross-attention at 3 and 8; its base Llama has 8 layers.
MLLAMA_SELF_TO_BASE = {0: 0, 1: 1, 2: 2, 4: 3, 5: 4, 6: 5, 7: 6, 9: 7}


@pytest.fixture(scope="module")
def mllama_pair(tmp_path_factory) -> tuple[Path, Path]:
    """bf16 Mllama (10 text layers, cross-attention at 3, 8; 128264 embedding rows) and an 8-layer Llama."""
    root = tmp_path_factory.mktemp("mllama")
    torch.manual_seed(0)
    config = tiny_mllama_config(num_layers=10, hidden=HIDDEN)
    assert config.text_config.cross_attention_layers == [3, 8]
    vlm = MllamaForConditionalGeneration(config).to(torch.bfloat16)
    vlm.save_pretrained(root / "vlm", max_shard_size="6MB")
    weights = load_all(root / "vlm")
    rename = {}
    for name in weights:
        if name.startswith("language_model.model.layers."):
            i, rest = name[len("language_model.model.layers."):].split(".", 1)
            if int(i) in MLLAMA_SELF_TO_BASE:
                rename[name] = f"model.layers.{MLLAMA_SELF_TO_BASE[int(i)]}.{rest}"
        elif tower_to_llama(name):
            rename[name] = tower_to_llama(name)
    base_config = tiny_llama_config(8, HIDDEN, vocab_size=LLAMA3_VOCAB)
    llm = base_from_tower(weights, rename, base_config, torch.bfloat16, seed=2)
    llm.save_pretrained(root / "llm", max_shard_size="6MB")
    assert len(list((root / "vlm").glob("*.safetensors"))) >= 3
    return root / "vlm", root / "llm"


def llava_pairs(vlm: dict) -> dict[str, str]:
    return {k: tower_to_llama(k) for k in vlm if tower_to_llama(k)}


# ---------------------------------------------------------------- name and layer maps
def test_layer_map_on_the_real_11b_pattern():
    cross = list(range(3, 40, 5))  # Llama-3.2-11B-Vision: [3, 8, ..., 38]
    m = self_attention_layer_map(40, cross)
    assert len(m) == 32 and sorted(m.values()) == list(range(32))
    assert not set(cross) & set(m)
    assert (m[0], m[2], m[4], m[7], m[9], m[37], m[39]) == (0, 2, 3, 6, 7, 30, 31)
    # names of the real checkpoints (no tensors needed): both VLM layouts, embeddings, head, vision
    parts = ["self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"]
    llm = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    llm += [f"model.layers.{j}.{p}" for j in range(32) for p in parts]
    for body, head, other in [("language_model.model.", "language_model.lm_head.", ""),
                              ("model.language_model.", "lm_head.", "model.")]:
        vlm = [f"{body}embed_tokens.weight", f"{body}norm.weight", f"{head}weight",
               f"{other}vision_model.patch_embedding.weight", f"{other}multi_modal_projector.weight"]
        for i in range(40):
            if i in cross:
                vlm += [f"{body}layers.{i}.cross_attn.q_proj.weight",
                        f"{body}layers.{i}.cross_attn_attn_gate",
                        f"{body}layers.{i}.mlp.down_proj.weight", f"{body}layers.{i}.input_layernorm.weight"]
            else:
                vlm += [f"{body}layers.{i}.{p}" for p in parts]
        nm = map_names(vlm, llm)
        assert nm.cross_attention_layers == tuple(cross)
        assert nm.pairs[f"{body}layers.39.mlp.down_proj.weight"] == "model.layers.31.mlp.down_proj.weight"
        assert nm.pairs[f"{body}layers.4.self_attn.q_proj.weight"] == "model.layers.3.self_attn.q_proj.weight"
        assert nm.pairs[f"{head}weight"] == "lm_head.weight"
        assert f"{body}layers.38.mlp.down_proj.weight" in nm.kept  # a cross-attention layer's MLP stays
        assert f"{other}vision_model.patch_embedding.weight" in nm.kept
        assert len(nm.pairs) == len(llm)
        with pytest.raises(NameMapError, match="needs 32 layers; the LLM checkpoint has 31"):
            map_names(vlm, [n for n in llm if not n.startswith("model.layers.31.")])
        with pytest.raises(NameMapError, match=r"layers\.17\.mlp\.down_proj\.weight"):
            map_names(vlm, [n for n in llm if n != "model.layers.17.mlp.down_proj.weight"])
        with pytest.raises(NameMapError, match="no VLM counterpart: model.extra.weight"):
            map_names(vlm, llm + ["model.extra.weight"])


# ---------------------------------------------------------------- LLaVA
def test_alpha_zero_is_the_vlm_bit_for_bit(llava_pair, tmp_path):
    vlm_dir, llm_dir = llava_pair
    out = tmp_path / "m"
    rc = main(["merge", "--vlm", str(vlm_dir), "--llm", str(llm_dir), "--alpha", "0", "--density", "0.5",
               "--scope", "global", "--out", str(out)])
    assert rc == 0
    vlm, merged = load_all(vlm_dir), load_all(out)
    assert merged.keys() == vlm.keys()
    for name, t in vlm.items():
        assert merged[name].dtype == t.dtype and torch.equal(merged[name].view(-1).view(torch.int32),
                                                             t.view(-1).view(torch.int32)), name
    for side in ("config.json", "generation_config.json", "preprocessor_config.json",
                 "model.safetensors.index.json"):
        assert (out / side).read_bytes() == (vlm_dir / side).read_bytes()
    report = json.loads((out / "merge.json").read_text())
    assert report["selected_entries"] == math.ceil(0.5 * report["mapped_entries"])


def test_full_step_gives_the_llm_and_leaves_vision_alone(llava_pair, tmp_path):
    vlm_dir, llm_dir = llava_pair
    merge_checkpoints(vlm_dir, llm_dir, tmp_path / "m", MergeConfig(alpha=1.0, density=1.0))
    vlm, llm, merged = load_all(vlm_dir), load_all(llm_dir), load_all(tmp_path / "m")
    pairs = llava_pairs(vlm)
    assert set(pairs.values()) == set(llm)
    for name, t in vlm.items():
        expected = llm[pairs[name]] if name in pairs else t
        assert torch.equal(merged[name], expected), name
    assert any(n.startswith("vision_tower.") for n in vlm)
    assert any(n.startswith("multi_modal_projector.") for n in vlm)
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == \
        sorted(p.name for p in vlm_dir.glob("*.safetensors"))


def test_tensor_scope_keeps_exactly_ceil_k_n_largest_entries(llava_pair, tmp_path):
    vlm_dir, llm_dir = llava_pair
    density = 0.3  # 0.3 · 64 = 19.2 → 20 entries of each norm vector
    config = MergeConfig(alpha=1.0, density=density, scope="tensor")
    merge_checkpoints(vlm_dir, llm_dir, tmp_path / "m", config)
    vlm, llm, merged = load_all(vlm_dir), load_all(llm_dir), load_all(tmp_path / "m")
    for name, lname in llava_pairs(vlm).items():
        v, b, m = vlm[name].flatten(), llm[lname].flatten(), merged[name].flatten()
        k = math.ceil(round(density * v.numel(), 9))
        top = torch.sort((v - b).abs(), descending=True, stable=True).indices[:k]
        expected = torch.zeros_like(v, dtype=torch.bool)
        expected[top] = True
        changed = m != v
        assert int(changed.sum()) == k, name
        assert torch.equal(changed, expected), name
        assert torch.equal(m[changed], b[changed]), name  # α = 1: the kept entries become the LLM's


def test_global_scope_matches_a_full_sort_and_both_directions(llava_pair, tmp_path):
    vlm_dir, llm_dir = llava_pair
    alpha, density = 0.5, 0.1
    report = merge_checkpoints(vlm_dir, llm_dir, tmp_path / "g",
                               MergeConfig(alpha=alpha, density=density, scope="global"))
    vlm, llm, merged = load_all(vlm_dir), load_all(llm_dir), load_all(tmp_path / "g")
    pairs = llava_pairs(vlm)
    task = {n: vlm[n] - llm[b] for n, b in pairs.items()}
    magnitudes = torch.cat([t.abs().flatten() for t in task.values()])
    k = math.ceil(density * magnitudes.numel())
    threshold = torch.sort(magnitudes, descending=True).values[k - 1]
    assert report.selected_entries == k and report.global_threshold == float(threshold)
    above = int((magnitudes > threshold).sum())  # entries tied at the threshold fill the rest of k
    kept_total = kept_ties = 0
    for name, t in task.items():
        keep = merged[name] != vlm[name]
        assert torch.equal(keep | (t.abs() == threshold), (t.abs() >= threshold)), name
        kept_total += int(keep.sum())
        kept_ties += int((keep & (t.abs() == threshold)).sum())
        torch.testing.assert_close(merged[name], torch.where(keep, vlm[name] - alpha * t, vlm[name]),
                                   rtol=1e-6, atol=1e-7)
    assert kept_total == k and kept_ties == k - above
    # paper direction: a step away from the LLM
    merge_checkpoints(vlm_dir, llm_dir, tmp_path / "p", MergeConfig(alpha=alpha, direction="paper"))
    paper = load_all(tmp_path / "p")
    for name, t in task.items():
        torch.testing.assert_close(paper[name], vlm[name] + alpha * t, rtol=1e-6, atol=1e-7)


def test_matches_mergekit_task_arithmetic_and_ties(llava_pair, tmp_path):
    mergekit = pytest.importorskip("mergekit", reason="mergekit (the dev extra) is not installed")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    vlm_dir, llm_dir = llava_pair
    vlm = load_all(vlm_dir)
    pairs = llava_pairs(vlm)
    tower = tmp_path / "tower"  # the VLM's language tower as a LlamaForCausalLM checkpoint for mergekit
    tower.mkdir()
    save_file({pairs[n]: vlm[n] for n in pairs}, tower / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(llm_dir / "config.json", tower / "config.json")
    alpha = 0.4
    for method, density in [("task_arithmetic", 1.0), ("ties", 0.25)]:  # 0.25·n is whole for every tensor
        params = {"weight": alpha} | ({"density": density} if density < 1 else {})
        conf = MergeConfiguration.model_validate({
            "merge_method": method, "base_model": str(tower), "dtype": "float32",
            "models": [{"model": str(llm_dir), "parameters": params}], "parameters": {"normalize": False}})
        run_merge(conf, out_path=str(tmp_path / method),
                  options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True))
        ours = tmp_path / f"ours-{method}"
        merge_checkpoints(vlm_dir, llm_dir, ours, MergeConfig(alpha=alpha, density=density, scope="tensor"))
        reference, merged = load_all(tmp_path / method), load_all(ours)
        assert set(reference) == set(pairs.values()), mergekit.__name__
        for name, lname in pairs.items():
            torch.testing.assert_close(merged[name], reference[lname], rtol=1e-6, atol=1e-7, msg=name)
            if density < 1:
                assert int((merged[name] != vlm[name]).sum()) == int((reference[lname] != vlm[name]).sum())


def test_in_memory_layout_merges_the_same(llava_pair, tmp_path):
    """`model.language_model.*` / `lm_head.*` names (the in-memory layout) give the same merge."""
    vlm_dir, llm_dir = llava_pair
    vlm = load_all(vlm_dir)

    def in_memory(name: str) -> str:
        if name.startswith("language_model.model."):
            return "model.language_model." + name[len("language_model.model."):]
        if name.startswith("language_model.lm_head."):
            return name[len("language_model."):]
        return "model." + name

    new = tmp_path / "vlm-new"
    new.mkdir()
    names = sorted(vlm)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({in_memory(n): vlm[n] for n in part}, new / file, {"format": "pt"})
        weight_map |= {in_memory(n): file for n in part}
    (new / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(vlm_dir / "config.json", new / "config.json")
    config = MergeConfig(alpha=0.7, density=0.25, scope="global")
    merge_checkpoints(vlm_dir, llm_dir, tmp_path / "old", config)
    merge_checkpoints(new, llm_dir, tmp_path / "new", config)
    old, got = load_all(tmp_path / "old"), load_all(tmp_path / "new")
    for name in vlm:
        assert torch.equal(got[in_memory(name)], old[name]), name
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "new")
    torch.testing.assert_close(model.lm_head.weight, old["language_model.lm_head.weight"], rtol=0, atol=0)


def _rewrite(src: Path, dst: Path, edit) -> None:
    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
        save_file(edit(tensors), file, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    index.unlink()


def test_mismatches_are_errors_naming_the_tensor(llava_pair, tmp_path, capsys):
    vlm_dir, llm_dir = llava_pair
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(llm_dir, tmp_path / "short", lambda t: {n: (x[:-1] if n == name else x) for n, x in t.items()})
    _rewrite(llm_dir, tmp_path / "gap", lambda t: {n: x for n, x in t.items() if n != name})
    args = ["merge", "--vlm", str(vlm_dir), "--alpha", "0.1", "--out"]
    assert main(args + [str(tmp_path / "o1"), "--llm", str(tmp_path / "short")]) == 2
    want = "shape mismatch: VLM tensor 'language_model.model.layers.1.mlp.up_proj.weight' [64, 32] vs base"
    assert want in capsys.readouterr().err
    assert main(args + [str(tmp_path / "o2"), "--llm", str(tmp_path / "gap")]) == 2
    assert f"maps to '{name}', which the base LLM checkpoint lacks" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(MergeError, match=r"--density must be a fraction in \[0, 1\], got 1.5"):
        MergeConfig(alpha=0.1, density=1.5)
    assert main(args + [str(tmp_path / "o3"), "--llm", str(tmp_path / "nowhere" / "x")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "o4"), "--llm", "nobody-here/no-such-model"]) == 2  # HF_HUB_OFFLINE=1
    assert "nobody-here/no-such-model: no such folder, and the hub download failed" in capsys.readouterr().err


# ---------------------------------------------------------------- Mllama ↔ Llama-3.1 layer map
def test_mllama_layer_map_end_to_end(mllama_pair, tmp_path):
    vlm_dir, llm_dir = mllama_pair
    report = merge_checkpoints(vlm_dir, llm_dir, tmp_path / "m", MergeConfig(alpha=1.0, density=1.0))
    assert report.cross_attention_layers == [3, 8]
    vlm, llm, merged = load_all(vlm_dir), load_all(llm_dir), load_all(tmp_path / "m")
    checked = set()
    for name, t in vlm.items():
        assert merged[name].dtype == torch.bfloat16
        if name.startswith("language_model.model.layers."):
            i, rest = name[len("language_model.model.layers."):].split(".", 1)
            if int(i) in (3, 8):
                assert torch.equal(merged[name], t), name  # cross-attention layers (and gates) stay
                continue
            lname = f"model.layers.{MLLAMA_SELF_TO_BASE[int(i)]}.{rest}"
        elif name == "language_model.model.embed_tokens.weight":
            assert t.shape[0] == LLAMA3_VOCAB + 8
            assert llm["model.embed_tokens.weight"].shape[0] == LLAMA3_VOCAB
            assert torch.equal(merged[name][:LLAMA3_VOCAB], llm["model.embed_tokens.weight"])
            assert torch.equal(merged[name][LLAMA3_VOCAB:], t[LLAMA3_VOCAB:])  # the 8 extra rows stay
            checked.add("model.embed_tokens.weight")
            continue
        elif tower_to_llama(name):
            lname = tower_to_llama(name)
        else:
            assert torch.equal(merged[name], t), name  # vision model, projector
            continue
        assert torch.equal(merged[name], llm[lname]), name
        checked.add(lname)
    assert checked == set(llm)
    model = MllamaForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[128000, 791, 6460, 374]])).logits
    assert logits.shape == (1, 4, LLAMA3_VOCAB) and torch.isfinite(logits).all()


def test_merged_llava_loads_and_runs(llava_pair, tmp_path):
    vlm_dir, llm_dir = llava_pair
    main(["merge", "--vlm", str(vlm_dir), "--llm", str(llm_dir), "--alpha", "0.3", "--density", "0.2",
          "--out", str(tmp_path / "m")])
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    merged = load_all(tmp_path / "m")
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight,
                       merged["language_model.model.layers.1.mlp.up_proj.weight"])
    pixel = torch.randn(1, 3, 56, 56)
    ids = torch.tensor([[1] + [LLAVA_VOCAB - 1] * 16 + [791, 2460]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel).logits
    assert logits.shape == (1, 19, LLAVA_VOCAB) and torch.isfinite(logits).all()


@pytest.mark.timeout(120)
def test_peak_rss_is_bounded_by_the_largest_tensor(mllama_pair, tmp_path, repo_root):
    """The 128264 x 32 bf16 embedding is 8 MiB; a global-scope merge holds < 3x that above the interpreter."""
    vlm_dir, llm_dir = mllama_pair
    entries = read_checkpoint(vlm_dir)
    largest = max(e.nbytes for e in entries.values())
    assert len({e.file for e in entries.values()}) >= 3
    cmd = [sys.executable, str(repo_root / "tools" / "bench_merge.py"), "--child", "streaming", "--vlm",
           str(vlm_dir), "--llm", str(llm_dir), "--out", str(tmp_path / "m"), "--alpha", "0.5", "--density",
           "0.25", "--scope", "global"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0 < result["merge_rss_bytes"] < 3 * largest, (result, largest)
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["selected_entries"] > 0


# ---------------------------------------------------------------- merge-sweep
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_merge_sweep_scores_every_point_with_mlan_eval(mllama_pair, shared_data, tmp_path, capsys):
    from PIL import Image

    from mlan.tokenizer import load_tokenizer

    vlm_src, llm_dir = mllama_pair
    vlm_dir = tmp_path / "vlm"
    shutil.copytree(vlm_src, vlm_dir)
    load_tokenizer("llama3").save_pretrained(vlm_dir)
    arc = f"arc={shared_data / 'eval' / 'arc-challenge_test.json'}"
    nlvr = f"nlvr={shared_data / 'image_text' / 'nlvr_dev' / 'dev.json'}"
    out = tmp_path / "sweep"
    args = ["merge-sweep", "--vlm", str(vlm_dir), "--llm", str(llm_dir), "--alphas", "0,0.5",
            "--densities", "1,0.2", "--tasks", arc, nlvr, "--limit", "2", "--out", str(out), "--keep-models"]
    assert main(args) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["alpha"], r["density"]) for r in rows] == [(0, 0.2), (0.5, 0.2), (0, 1), (0.5, 1)]
    for r in rows:
        assert set(r["tasks"]) == {"arc", "nlvr"}
        assert r["language_avg"] == r["tasks"]["arc"] and r["vision_avg"] == r["tasks"]["nlvr"]
    # each point is `mlan merge` with the same arguments, scored by `mlan eval`
    point = out / "points" / "alpha0.5_density0.2" / "model"
    merge_checkpoints(vlm_dir, llm_dir, tmp_path / "again", MergeConfig(alpha=0.5, density=0.2))
    again, kept = load_all(tmp_path / "again"), load_all(point)
    assert all(torch.equal(again[n], kept[n]) for n in again)
    scored = json.loads((point.parent / "results.json").read_text())
    assert scored["model"] == str(point) and scored["tasks"]["nlvr"]["n"] == 2
    assert json.loads((out / "points" / "vlm" / "results.json").read_text())["model"] == str(vlm_dir)
    table = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and "(n=2)" in table[0]
    assert "Chance level: arc 25.0 %, nlvr 50.0 %" in (out / "sweep.md").read_text()
    assert all("ci95" in r["language_vs_vlm"] for r in rows if r["alpha"] != 0)
    assert (out / "points" / "vlm" / "results.items.jsonl").is_file()
    with Image.open(out / "sweep.png") as im:
        assert im.width > 300
    # a second run resumes: nothing is merged or scored again
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("points/*/results.json")}
    assert main(args) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("points/*/results.json")}
    assert main(args[:-1] + ["--scope", "global"]) == 2
    assert "holds a sweep with other scope" in capsys.readouterr().err
