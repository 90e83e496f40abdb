"""Model building, module groups, stage presets, LoRA, and LLaVA composed from parts saved locally."""
from __future__ import annotations

import pytest
import torch

from mlan.families import modeling
from mlan.families.llava.model import compose as compose_llava
from mlan.families.mllama.patch import has_reference_cross_attention
from mlan.families.tiny import IMAGE_TOKEN_ID, LLAMA3_VOCAB, tiny_llama_config
from mlan.recipe import FreezeSpec, LoraSpec, ModelSpec

LLAVA_FC = {"family": "llava", "vocab_size": LLAMA3_VOCAB + 1, "image_token_id": IMAGE_TOKEN_ID,
            "image_tokens": 16, "image_size": 56, "patch_size": 14}
MLLAMA_FC = {"family": "mllama", "vocab_size": LLAMA3_VOCAB, "image_token_id": IMAGE_TOKEN_ID,
             "tile_size": 56, "patch_size": 14, "max_tiles": 4}


@pytest.fixture(scope="module")
def tiny_llava():
    torch.manual_seed(0)
    return modeling.build_model(ModelSpec(family="llava"), LLAVA_FC)


@pytest.fixture(scope="module")
def tiny_mllama():
    torch.manual_seed(0)
    return modeling.build_model(ModelSpec(family="mllama"), MLLAMA_FC)


def _trainable(model, group):
    flags = {p.requires_grad for m in modeling.module_groups(model)[group] for p in m.parameters()}
    return flags


def test_tiny_llava_follows_family_config(tiny_llava):
    cfg = tiny_llava.config
    assert cfg.vision_config.image_size == 56 and cfg.image_seq_length == 16
    assert modeling.real_vocab_size(tiny_llava) == LLAMA3_VOCAB  # the image-token row is not a class
    fc = dict(LLAVA_FC, image_size=84, image_tokens=36)
    m = modeling.build_model(ModelSpec(family="llava"), fc)
    assert m.config.vision_config.image_size == 84 and m.config.image_seq_length == 36
    with pytest.raises(modeling.ModelBuildError, match="image_tokens=20"):
        modeling.build_model(ModelSpec(family="llava"), dict(LLAVA_FC, image_tokens=20))


def test_tiny_mllama_gets_reference_cross_attention(tiny_mllama):
    assert has_reference_cross_attention(tiny_mllama)
    assert modeling.real_vocab_size(tiny_mllama) == LLAMA3_VOCAB
    assert tiny_mllama.get_input_embeddings().weight.shape[0] == LLAMA3_VOCAB + 8  # padded rows exist
    groups = modeling.module_groups(tiny_mllama)
    assert len(groups["cross_attention"]) == 2  # layers 3 and 8


def test_family_mismatch_is_named():
    with pytest.raises(modeling.ModelBuildError, match="manifest says 'mllama'"):
        modeling.build_model(ModelSpec(family="llava"), MLLAMA_FC)


def test_stage_presets(tiny_llava):
    modeling.apply_freeze(tiny_llava, modeling.freeze_policy("stage1", None))
    assert _trainable(tiny_llava, "projector") == {True}
    for g in ("vision_tower", "language_model"):
        assert _trainable(tiny_llava, g) == {False}
    modeling.apply_freeze(tiny_llava, modeling.freeze_policy("stage2", None))
    assert _trainable(tiny_llava, "vision_tower") == {False}
    assert _trainable(tiny_llava, "language_model") == {True} and _trainable(tiny_llava, "projector") == {True}
    explicit = FreezeSpec(vision_tower=False, projector=True, language_model=True)
    modeling.apply_freeze(tiny_llava, modeling.freeze_policy("stage2", explicit))
    assert _trainable(tiny_llava, "vision_tower") == {True} and _trainable(tiny_llava, "projector") == {False}


def test_cross_attention_group_overrides_language_model(tiny_mllama):
    modeling.apply_freeze(tiny_mllama, FreezeSpec(language_model=True, cross_attention=False))
    assert _trainable(tiny_mllama, "cross_attention") == {True}
    self_layers = [l for l in tiny_mllama.model.language_model.layers if "CrossAttention" not in type(l).__name__]
    assert {p.requires_grad for l in self_layers for p in l.parameters()} == {False}
    assert not tiny_mllama.lm_head.weight.requires_grad


def test_lora_targets_llm_linears_only_and_keeps_projector_trainable():
    torch.manual_seed(0)
    model = modeling.build_model(ModelSpec(family="llava"), LLAVA_FC)
    freeze = modeling.freeze_policy("stage2", None)
    modeling.apply_freeze(model, freeze)
    targets = modeling.lora_targets(model)
    assert targets and all(t.startswith("model.language_model.layers.") for t in targets)
    assert len(targets) == 2 * 7  # q k v o gate up down per layer
    peft_model = modeling.apply_lora(model, LoraSpec(enabled=True), freeze)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("multi_modal_projector" in n for n in trainable)
    lora_a = [p for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert lora_a[0].shape[0] == 32  # r = hidden / 2
    cfg = peft_model.peft_config["default"]
    assert cfg.use_rslora and cfg.lora_alpha == 8 and cfg.lora_dropout == 0.05
    merged = modeling.merge_lora(peft_model)
    assert type(merged).__name__ == "LlavaForConditionalGeneration"
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_load_pretrained_from_local_path(tmp_path, tiny_llava):
    tiny_llava.save_pretrained(tmp_path / "vlm")
    loaded = modeling.build_model(ModelSpec(family="llava", config=str(tmp_path / "vlm")), LLAVA_FC)
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        a = tiny_llava(input_ids=ids, use_cache=False).logits
        b = loaded(input_ids=ids, use_cache=False).logits
    assert torch.equal(a, b)
    with pytest.raises(modeling.ModelBuildError, match="is a 'llava' checkpoint"):
        modeling.build_model(ModelSpec(family="mllama", config=str(tmp_path / "vlm")), dict(MLLAMA_FC))


def test_compose_llava_from_local_llm_and_clip(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    torch.manual_seed(1)
    llm = LlamaForCausalLM(tiny_llama_config(vocab_size=LLAMA3_VOCAB))  # a base LLM: no image row
    llm.save_pretrained(tmp_path / "llm")
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=56, patch_size=14))
    vision.save_pretrained(tmp_path / "clip")
    spec = ModelSpec(family="llava", llm=str(tmp_path / "llm"), vision_tower=str(tmp_path / "clip"),
                     image_tokens=16)
    torch.manual_seed(2)
    model = compose_llava(spec, LLAVA_FC)
    assert model.get_input_embeddings().weight.shape[0] == LLAMA3_VOCAB + 1
    assert torch.equal(model.get_input_embeddings().weight[:LLAMA3_VOCAB], llm.get_input_embeddings().weight)
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(model.model.vision_tower.encoder.layers[0].mlp.fc1.weight,
                       vision.encoder.layers[0].mlp.fc1.weight)
    assert model.config.vision_feature_layer == -2 and model.config.projector_hidden_act == "gelu"
    assert modeling.real_vocab_size(model) == LLAMA3_VOCAB
    # an image document runs end to end: 16 placeholders take the projected patch features
    ids = torch.tensor([[128000] + [IMAGE_TOKEN_ID] * 16 + [9906, 1917]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56), use_cache=False)
    assert out.logits.shape == (1, 19, LLAMA3_VOCAB + 1)
    with pytest.raises(modeling.ModelBuildError, match="gives 16 tokens"):
        compose_llava(spec.model_copy(update={"image_tokens": 576}), dict(LLAVA_FC, image_tokens=576))
