"""The recipe schema: defaults, overrides, path resolution and one-line errors naming key, value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mlan.continual.spec import check_tasks, load_continual
from mlan.recipe import Recipe, RecipeError, apply_override, load_recipe, parse_recipe

MINIMAL = {
    "model": {"family": "llava", "tokenizer": "llama3"},
    "sources": [
        {"name": "alpaca", "path": "data/alpaca.json", "format": "alpaca", "modality": "text"},
        {"name": "nlvr", "path": "data/nlvr.json", "format": "template", "modality": "image_text",
         "images": "data/nlvr", "template": {"prompts": ["<image>{sentence}"], "response": "{label}"}},
    ],
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_follow_design(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.mixture.ratio.text == 0.75 and recipe.mixture.ratio.by == "tokens"
    assert recipe.mixture.seq_len == 4096 and recipe.mixture.max_images_per_row == 8 and recipe.mixture.seed == 42
    assert recipe.model.image_tokens == 576 and recipe.train.weight_decay == 0.0 and recipe.train.warmup_ratio == 0.03


def test_relative_paths_resolve_against_recipe_folder(tmp_path: Path) -> None:
    sub = tmp_path / "recipes"
    sub.mkdir()
    raw = dict(MINIMAL, model={"family": "llava", "tokenizer": "llama3", "config": "meta-llama/Llama-3.2-3B"})
    path = sub / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    assert recipe.sources[0].path == str((sub / "data/alpaca.json").resolve())
    assert recipe.sources[1].images == str((sub / "data/nlvr").resolve())
    assert recipe.model.config == "meta-llama/Llama-3.2-3B"  # a hub id stays a hub id
    assert recipe.model.tokenizer == "llama3"


def test_urls_stay_untouched(tmp_path: Path) -> None:
    raw = {"sources": [{"name": "a", "path": "file:///x/a.jsonl", "format": "alpaca", "modality": "text"}]}
    assert load_recipe(write(tmp_path, raw)).sources[0].path == "file:///x/a.jsonl"


def test_set_overrides_nested_and_list_items(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), [
        "mixture.budget.tokens=200000", "mixture.ratio.text=0.5", "sources.nlvr.weight=3", "sources.0.weight=2",
    ])
    assert recipe.mixture.budget.tokens == 200000 and recipe.mixture.ratio.text == 0.5
    assert recipe.source("nlvr").weight == 3.0 and recipe.source("alpaca").weight == 2.0


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("mixture.ratio.text=1.5", ["mixture.ratio.text", "1.5", "less than or equal to 1"]),
        ("mixture.ratio.by=words", ["mixture.ratio.by", "words", "'tokens' or 'examples'"]),
        ("mixture.sequence_len=10", ["mixture.sequence_len", "unknown key"]),
        ("model.family=gpt", ["model.family", "gpt", "'llava' or 'mllama'"]),
        ("sources.0.format=csv", ["sources.0.format", "csv", "alpaca"]),
    ],
)
def test_bad_recipe_is_one_line_naming_key_value_and_allowed(tmp_path: Path, override: str, must_contain: list) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, MINIMAL), [override])
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "r.yaml") in message
    for fragment in must_contain:
        assert fragment in message


def test_budget_needs_exactly_one_kind() -> None:
    with pytest.raises(RecipeError, match="exactly one of budget.tokens or budget.examples"):
        parse_recipe({"mixture": {"budget": {"tokens": 10, "examples": 10}}})


def test_template_source_needs_template_block() -> None:
    raw = {"sources": [{"name": "t", "path": "x.json", "format": "template", "modality": "text"}]}
    with pytest.raises(RecipeError, match="sources.0"):
        parse_recipe(raw)


def test_duplicate_source_names_rejected() -> None:
    src = {"name": "a", "path": "x.json", "format": "alpaca", "modality": "text"}
    with pytest.raises(RecipeError, match="repeated: a"):
        parse_recipe({"sources": [src, src]})


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_override_errors() -> None:
    raw = {"sources": [{"name": "a"}]}
    with pytest.raises(RecipeError, match="expected dotted.key=value"):
        apply_override(raw, "mixture.seed")
    with pytest.raises(RecipeError, match="no list item 'zzz'"):
        apply_override(raw, "sources.zzz.weight=1")


def test_recipe_is_frozen() -> None:
    recipe = Recipe()
    with pytest.raises(ValidationError, match="frozen"):
        recipe.mixture = None  # type: ignore[misc]


def test_every_shipped_recipe_validates(repo_root: Path) -> None:
    paths = sorted((repo_root / "recipes").glob("*.yaml"))
    assert len(paths) >= 7, paths  # shared-data, tiny-llava, tiny-mllama, demo and the three real targets
    for path in paths:
        if path.name.startswith("continual-"):  # `mlan continual` recipes: their own schema, each task a recipe
            check_tasks(load_continual(path, out=repo_root / "out"))
            continue
        load_recipe(path)


def test_env_references_in_paths_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shipped recipes name their data `${MLAN_SHARED_DATA:-../../shared/data}/…`: set → used, unset → default."""
    body = ("sources:\n  - {name: a, path: '${MLAN_TEST_ROOT:-data}/a.json', format: alpaca, modality: text}\n"
            "mixture: {budget: {tokens: 1000}}\n")
    (tmp_path / "r.yaml").write_text(body)
    monkeypatch.delenv("MLAN_TEST_ROOT", raising=False)
    assert load_recipe(tmp_path / "r.yaml").sources[0].path == str(tmp_path / "data" / "a.json")
    monkeypatch.setenv("MLAN_TEST_ROOT", "/elsewhere/data")
    assert load_recipe(tmp_path / "r.yaml").sources[0].path == "/elsewhere/data/a.json"
    (tmp_path / "s.yaml").write_text(body.replace("${MLAN_TEST_ROOT:-data}", "${MLAN_TEST_UNSET_VAR}"))
    monkeypatch.delenv("MLAN_TEST_UNSET_VAR", raising=False)
    with pytest.raises(RecipeError, match="MLAN_TEST_UNSET_VAR is not set"):
        load_recipe(tmp_path / "s.yaml")


def test_shipped_recipes_follow_mlan_shared_data(repo_root: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout that is not beside shared/ points MLAN_SHARED_DATA at the data; every data path follows it."""
    monkeypatch.setenv("MLAN_SHARED_DATA", str(tmp_path / "data"))
    for name in ("shared-data", "tiny-llava", "tiny-mllama"):
        recipe = load_recipe(repo_root / "recipes" / f"{name}.yaml")
        paths = [s.path for s in recipe.sources] + [s.images for s in recipe.sources if s.images]
        assert paths and all(p.startswith(str(tmp_path / "data")) for p in paths), (name, paths)
