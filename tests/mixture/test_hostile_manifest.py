"""Manifests are validated once, in one place (issue #22 item 5): a shard name outside the build folder, wrong
types or deep nesting are one line naming the manifest and the key, exit 2, from `verify`, `inspect` and
`train`; nothing outside the build folder is read."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from mlan.cli import main
from mlan.mixture.shards import ManifestError, read_manifest
from mlan.mixture.verify import check_build, verify_build

sys.path.insert(0, str(Path(__file__).parents[1]))
import shardkit

TINY_RECIPE = "model: {family: llava, config: tiny}\ntrain: {batch_rows: 1, loader_workers: 0}\n"


@pytest.fixture
def build(tmp_path) -> Path:
    rows = shardkit.random_rows(6, seed=2, family_config=shardkit.LLAVA_FC)
    return shardkit.write_build(tmp_path / "build", rows, shardkit.LLAVA_FC, seq_len=64, rows_per_shard=3)


def _edit(build: Path, change) -> None:
    manifest = json.loads((build / "manifest.json").read_text())
    change(manifest)
    (build / "manifest.json").write_text(json.dumps(manifest))


def _commands(build: Path, tmp_path: Path) -> list[list[str]]:
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE)
    return [["verify", str(build)], ["inspect", str(build)],
            ["train", str(tmp_path / "recipe.yaml"), "--shards", str(build), "--out", str(tmp_path / "run"),
             "--nproc", "1"]]


def _one_line_exit_2(argv: list[str], capsys, *needles: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (argv[0], rc, err)
    assert err[0].startswith(f"mlan {argv[0]}: error: ") and all(n in err[0] for n in needles), err[0]


def test_a_shard_name_outside_the_build_folder_is_refused_unread(build, tmp_path, capsys) -> None:
    """The outside file even carries the right sha256: a reader that followed the name would accept it."""
    outside = tmp_path / "outside.tar"
    outside.write_bytes((build / "shards" / "shard-000000.tar").read_bytes())
    digest = hashlib.sha256(outside.read_bytes()).hexdigest()
    _edit(build, lambda m: m["shards"][0].update(name="../outside.tar", sha256=digest))
    for argv in _commands(build, tmp_path):
        _one_line_exit_2(argv, capsys, str(build / "manifest.json"), "shards[0].name '../outside.tar'")
    for name in ("../../../etc/hostname", "/etc/hostname", "shards/../../x.tar", "file:///etc/hostname", "a\\b"):
        _edit(build, lambda m, n=name: m["shards"][0].update(name=n))
        with pytest.raises(ManifestError, match=r"shards\[0\]\.name .* is not a plain relative name"):
            read_manifest(str(build))


BAD = {
    "seq_len string": (lambda m: m.update(seq_len="64"), "seq_len '64' is not a positive integer"),
    "shard is a number": (lambda m: m["shards"].__setitem__(1, 7), "shards[1] is a int, not an object"),
    "rows string": (lambda m: m["shards"][0].update(rows="3"), "shards[0].rows '3' is not a count"),
    "rows negative": (lambda m: m["shards"][0].update(rows=-1), "shards[0].rows -1 is not a count"),
    "name number": (lambda m: m["shards"][0].update(name=5), "shards[0].name '5' is not a plain"),
    "sha256 number": (lambda m: m["shards"][0].update(sha256=12), "shards[0].sha256 '12' is not a sha256"),
    "totals list": (lambda m: m.update(totals=[1]), "totals is a list, not an object"),
    "totals.rows missing": (lambda m: m["totals"].pop("rows"), "totals.rows None is not a count"),
    "family_config string": (lambda m: m.update(family_config="llava"), "family_config is a str"),
    "token table": (lambda m: m["shards"][0].update(tokens_by_source=[1]), "tokens_by_source is not an object"),
    "duplicate name": (lambda m: m["shards"][1].update(name=m["shards"][0]["name"]), "is listed twice"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_manifest_with_wrong_types_is_one_line_in_every_command(build, tmp_path, capsys, case) -> None:
    change, message = BAD[case]
    _edit(build, change)
    for argv in _commands(build, tmp_path):
        _one_line_exit_2(argv, capsys, str(build / "manifest.json"), message)


def test_a_deeply_nested_manifest_is_one_line(build, tmp_path, capsys) -> None:
    (build / "manifest.json").write_text('{"shards": ' + "[" * 100_000 + "]" * 100_000 + "}")
    for argv in _commands(build, tmp_path):
        _one_line_exit_2(argv, capsys, str(build / "manifest.json"), "nested too deeply")


def test_one_verify_and_one_reader_agree_on_a_sound_and_a_damaged_build(build) -> None:
    assert verify_build(str(build)) == [] and check_build(str(build)) == 2
    shard = build / "shards" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-10])
    problems = verify_build(str(build), read=False)
    assert len(problems) == 1 and problems[0].startswith("shards/shard-000001.tar: sha256")
    with pytest.raises(ValueError, match="shards/shard-000001.tar: sha256"):
        check_build(str(build))


def test_resume_over_shards_whose_fingerprint_changed_is_one_line(build, tmp_path) -> None:
    """#22: `train --resume` on rebuilt shards gave a rank-0 traceback (the loader's ValueError)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from mlan.data.loader import make_loader
    from mlan.errors import TrainError
    from mlan.train import checkpoint as ckpt
    from mlan.train.schedule import TokenSchedule
    from mlan.train.state import TrainState, run_state

    def parts(build_dir: Path) -> dict:
        model = nn.Linear(2, 2)
        loader = make_loader(str(build_dir), 0, 1, batch_rows=1, workers=0, seed=0)
        return run_state(model, torch.optim.AdamW(model.parameters()), TrainState(),
                         TokenSchedule(lr=1e-3, budget_tokens=100, warmup_ratio=0.1), loader)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        folder = ckpt.save_checkpoint(tmp_path / "run", 1, parts(build))
        _edit(build, lambda m: m.update(fingerprint="rebuilt"))
        with pytest.raises(TrainError) as err:
            ckpt.load_checkpoint(folder, parts(build))
    finally:
        dist.destroy_process_group()
    message = str(err.value)
    assert message.startswith(f"{folder}: ") and "fingerprint: state 'test' vs loader 'rebuilt'" in message
    assert "\n" not in message
