"""The real-target recipes load and validate offline (no download): hub ids, 75/25 by tokens, MLAN stage 2, FSDP."""
from __future__ import annotations

import pytest

from mlan.families.modeling import STAGE_FREEZE, freeze_policy
from mlan.families.registry import get_family
from mlan.recipe import RecipeError, load_recipe, parse_recipe
from mlan.train.schedule import STAGE_LR

REAL = {
    "llava-llama32-3b": ("llava", "meta-llama/Llama-3.2-3B-Instruct"),
    "llava-llama31-8b": ("llava", "meta-llama/Llama-3.1-8B-Instruct"),
    "mllama-11b": ("mllama", "meta-llama/Llama-3.2-11B-Vision-Instruct"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_recipe_validates_offline(repo_root, name):
    family, model_id = REAL[name]
    recipe = load_recipe(repo_root / "recipes" / f"{name}.yaml")
    m = recipe.model
    assert m.family == family
    if family == "llava":  # composed from parts: hub ids stay hub ids
        assert (m.config, m.llm, m.vision_tower) == ("compose", model_id, "openai/clip-vit-large-patch14-336")
        assert m.image_tokens == 576
    else:
        assert m.config == model_id and m.llm is None
    fc = get_family(m).family_config()  # offline: the real geometry, not the tiny one
    if family == "llava":
        assert (fc["image_size"], fc["patch_size"], fc["image_tokens"]) == (336, 14, 576)
    else:
        assert (fc["tile_size"], fc["max_tiles"]) == (560, 4)
    modalities = {s.modality for s in recipe.sources}
    assert modalities == {"text", "image_text"}
    text_hub = [s.path for s in recipe.sources if s.modality == "text"]
    assert all("/" in p and not p.startswith("/") for p in text_hub)  # public hub datasets
    assert recipe.mixture.ratio.text == 0.75 and recipe.mixture.ratio.by == "tokens"
    t = recipe.train
    assert t.stage == "stage2" and t.lr is None and STAGE_LR[t.stage] == 2e-5
    assert t.warmup_ratio == 0.03 and t.weight_decay == 0.0
    assert freeze_policy(t.stage, t.freeze) == STAGE_FREEZE["stage2"]
    assert t.precision == "bf16" and t.activation_checkpointing
    assert recipe.mixture.seq_len == 4096 and t.checkpoint_every_tokens


def test_compose_and_full_checkpoint_are_exclusive():
    with pytest.raises(RecipeError, match="not both"):
        parse_recipe({"model": {"family": "llava", "config": "org/vlm", "llm": "org/llm", "vision_tower": "org/clip"}})
