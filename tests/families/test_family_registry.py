"""The family registry: a third family plugs in without touching code outside its own folder, the recipe
validates `model.family` against the registered names, and no module outside `mlan/families/` branches on one."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from shardkit import make_doc, pack

from mlan.data.collate import checked_geometry
from mlan.families import registry, tiny
from mlan.families.base import Family, FamilyPlugin, VisionGeometry
from mlan.families.registry import family_for_model_type, family_names, get_family, register
from mlan.mixture.verify import row_problems
from mlan.recipe import ModelSpec, RecipeError, parse_recipe

PACKAGE = Path(__file__).resolve().parents[2] / "mlan"
BUILT_IN = ("llava", "mllama")


class FakeFamily(Family):
    """Two placeholders per image, one tile: enough accounting for a recipe and a manifest."""

    name = "fake"

    def image_seq_tokens(self) -> int:
        return self.geometry.image_tokens

    def tiles_for(self, width: int, height: int) -> int:
        return 1

    def vision_tokens_for(self, width: int, height: int) -> int:
        return self.geometry.image_tokens

    def vocab_size(self) -> int:
        return 1000

    def stored_image_size(self, width: int, height: int) -> tuple[int, int]:
        return self.geometry.image_size, self.geometry.image_size


class FakePlugin(FamilyPlugin):
    name = "fake"
    model_type = "fake_vlm"
    runtime_module = "no.such.module"  # never imported: nothing here needs the torch side

    def geometry(self, model: ModelSpec) -> VisionGeometry:
        return VisionGeometry(image_size=32, patch_size=16, image_tokens=2, max_tiles=1, vocab_size=1000)

    def family(self, model: ModelSpec, geometry: VisionGeometry) -> Family:
        return FakeFamily(model, geometry)

    def placeholders_per_image(self, image_tokens: int) -> int:
        return image_tokens


@pytest.fixture
def fake_registered(monkeypatch):
    """The registry with the fake family added; restored afterwards."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    return register(FakePlugin())


def test_built_in_families_register_themselves():
    assert family_names() == BUILT_IN
    assert [family_for_model_type(t).name for t in BUILT_IN] == list(BUILT_IN)
    assert family_for_model_type("llama") is None  # a text-only causal LM is no family


def test_a_registered_family_is_accepted_everywhere_by_name(fake_registered):
    recipe = parse_recipe({"model": {"family": "fake"}})
    assert recipe.model.family == "fake" and family_names() == ("fake", *BUILT_IN)
    assert family_for_model_type("fake_vlm") is fake_registered
    fc = get_family(recipe.model).family_config()
    assert (fc["family"], fc["image_tokens"], fc["image_size"], fc["tile_size"]) == ("fake", 2, 32, None)
    # the loader's and verify's contract follow the plug-in: two placeholders per image
    fc["image_token_id"] = tiny.IMAGE_TOKEN_ID
    collate_fc = checked_geometry(fc)
    assert (collate_fc.family, collate_fc.image_tokens) == ("fake", 2)
    row = pack([make_doc(np.random.default_rng(0), 6, image_at=(1,), image_tokens=2)], "k")
    assert row_problems(row, fc, decode=False) == []
    assert "has 2 image tokens for 1 images (4 per image" in row_problems(row, {**fc, "image_tokens": 4},
                                                                         decode=False)[0]


def test_an_unregistered_family_is_a_one_line_error_listing_the_registered_ones(fake_registered):
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": {"family": "qwen2_vl"}}, source="r.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("r.yaml: invalid recipe: model.family = 'qwen2_vl': Input should be 'fake' or 'llava' or "
                       "'mllama'; allowed: 'fake' or 'llava' or 'mllama'")
    with pytest.raises(ValueError, match="family_config.family: expected 'fake' or 'llava' or 'mllama', got 'x'"):
        checked_geometry({"family": "x", "vocab_size": 10})


def _family_name_comparisons(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """`x == "llava"`, `"mllama" in (...)` and the like: Compare nodes with a family name as a constant."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            values = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
            if any(isinstance(v, ast.Constant) and v.value in BUILT_IN for v in values):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_module_outside_a_family_folder_branches_on_a_family_name(tmp_path):
    """Everything but `mlan/families/<name>/` (the registry, base and modeling included) asks the plug-in."""
    folders = {PACKAGE / "families" / name for name in BUILT_IN}
    outside = [p for p in sorted(PACKAGE.rglob("*.py")) if p.parent not in folders]
    assert len(outside) > 20 and PACKAGE / "families" / "modeling.py" in outside
    assert [hit for p in outside for hit in _family_name_comparisons(p)] == []
    # the check sees a branch when there is one
    planted = tmp_path / "mlan" / "x.py"
    planted.parent.mkdir()
    planted.write_text('if fc["family"] == "llava" or kind in ("mllama", "text"):\n    pass\n')
    assert _family_name_comparisons(planted, tmp_path) == ["mlan/x.py:1", "mlan/x.py:1"]


def test_a_recipes_model_section_is_what_the_family_contract_reads():
    """ModelSection (families/base.py) names what a family reads from `model:` so that families need not import
    the recipe; every name it lists is a ModelSpec field."""
    from typing import get_type_hints

    from mlan.families.base import ModelSection
    from mlan.recipe import ModelSpec

    wanted = get_type_hints(ModelSection)
    assert "family" in wanted and set(wanted) <= set(ModelSpec.model_fields)
