"""No code from data (issue #22 item 1, design.md invariant 6): a crafted checkpoint folder or template that
would run a command when loaded or rendered runs nothing and is refused with one line naming the file."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mlan.cli import main as cli_main
from mlan.train import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).parents[1]))
import shardkit


class TouchOnLoad:
    """An object whose unpickling creates `marker` (what a hostile pickle would do with a shell command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _state() -> dict:
    return {"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, "train": {"step": 4}}


def _saved(run: Path) -> Path:
    return ckpt.save_checkpoint(run, 4, _state())


def _hostile_metadata(folder: Path, marker: Path) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(TouchOnLoad(marker)))


def test_a_checkpoint_loads_back_through_the_checked_reader(tmp_path, world_of_one) -> None:
    folder = _saved(tmp_path / "run")
    assert (folder / ckpt.DIGEST).is_file()
    state = {"model": {"w": torch.zeros(2, 3)}, "train": {"step": 0}}
    ckpt.load_checkpoint(folder, state)
    assert torch.equal(state["model"]["w"], _state()["model"]["w"]) and state["train"]["step"] == 4


def test_crafted_metadata_with_stale_digest_is_refused_unread(tmp_path, world_of_one) -> None:
    folder = _saved(tmp_path / "run")
    marker = tmp_path / "pwned"
    _hostile_metadata(folder, marker)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: sha256 does not match"):
        ckpt.load_checkpoint(folder, _state())
    assert not marker.exists()


def test_crafted_metadata_with_a_matching_digest_runs_nothing(tmp_path, world_of_one) -> None:
    """The attacker rewrote the digest too: the restricted unpickler is what stops it."""
    folder = _saved(tmp_path / "run")
    marker = tmp_path / "pwned"
    _hostile_metadata(folder, marker)
    ckpt.write_digest(folder)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: not a checkpoint's metadata .*posix.system"):
        ckpt.load_checkpoint(folder, _state())
    assert not marker.exists()


def test_missing_digest_is_refused(tmp_path, world_of_one) -> None:
    folder = _saved(tmp_path / "run")
    (folder / ckpt.DIGEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{ckpt.DIGEST}: missing"):
        ckpt.load_checkpoint(folder, _state())


def test_hostile_non_tensor_entry_runs_nothing(tmp_path, world_of_one) -> None:
    """DCP stores non-tensor values with torch.save and reads them with weights_only=False by default."""
    marker = tmp_path / "pwned"
    folder = ckpt.save_checkpoint(tmp_path / "run", 4, {"train": {"step": TouchOnLoad(marker)}})
    assert not marker.exists()
    with pytest.raises(ckpt.CheckpointError, match="train.step: not a plain value"):
        ckpt.load_checkpoint(folder, {"train": {"step": 0}})
    assert not marker.exists()


def test_metadata_naming_a_file_outside_the_folder_is_refused(tmp_path, world_of_one) -> None:
    folder = _saved(tmp_path / "run")
    metadata = ckpt.read_metadata_file(folder / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    ckpt.write_digest(folder)
    with pytest.raises(ckpt.CheckpointError, match="names '../../outside.distcp'"):
        ckpt.load_checkpoint(folder, _state())


TINY_RECIPE = """
model: {family: llava, config: tiny}
train: {batch_rows: 1, loader_workers: 0}
"""


def test_train_resume_on_a_crafted_checkpoint_is_one_line_exit_2(tmp_path, world_of_one, capsys) -> None:
    rows = shardkit.random_rows(8, seed=3, family_config=shardkit.LLAVA_FC)
    build = shardkit.write_build(tmp_path / "build", rows, shardkit.LLAVA_FC, seq_len=64, rows_per_shard=8)
    (tmp_path / "recipe.yaml").write_text(TINY_RECIPE)
    folder = _saved(tmp_path / "run")
    marker = tmp_path / "pwned"
    _hostile_metadata(folder, marker)
    ckpt.write_digest(folder)
    rc = cli_main(["train", str(tmp_path / "recipe.yaml"), "--shards", str(build), "--out", str(tmp_path / "run"),
                   "--resume", "--nproc", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not marker.exists()
    assert len(err) == 1 and err[0].startswith("mlan train: error: ") and str(folder / ".metadata") in err[0]


# ---------------------------------------------------------------- jinja templates
def _template_source(tmp_path: Path, prompt: str) -> list:
    from mlan.recipe import SourceSpec, TemplateSpec
    from mlan.sources import iter_conversations

    data = tmp_path / "t.jsonl"
    data.write_text('{"q": "why", "a": "because"}\n')
    spec = SourceSpec(name="src", path=str(data), format="template", modality="text",
                      template=TemplateSpec(prompts=[prompt], response="A: {{ a }}", engine="jinja"))
    return list(iter_conversations(spec))


@pytest.mark.parametrize("payload", [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    ("{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
     "{{ c(['touch', 'MARKER']).wait() }}{% endif %}{% endfor %}"),
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "{{ q.__class__.__base__.__subclasses__() }}",
])
def test_jinja_template_cannot_reach_python(tmp_path, payload) -> None:
    marker = tmp_path / "pwned"
    (result,) = _template_source(tmp_path, payload.replace("MARKER", str(marker)))
    assert not marker.exists()
    from mlan.sources import RecordError
    assert isinstance(result, RecordError) and "unsafe" in str(result) and "t.jsonl" in str(result)


def test_sandboxed_jinja_still_renders_ordinary_templates(tmp_path) -> None:
    (conv,) = _template_source(tmp_path, "Q: {{ q | upper }}{% if a %} ({{ a|length }}){% endif %}")
    assert [m.text for m in conv.messages] == ["Q: WHY (7)", "A: because"]


@pytest.mark.parametrize("payload, reason", [
    ("{{ 'a' * 10**12 }}", "too large"),
    ("{{ 7 ** 10000000 }}", "too large"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ q + 1 }}", "TypeError"),
])
def test_jinja_template_errors_reject_the_record_quickly(tmp_path, payload, reason) -> None:
    from mlan.sources import RecordError
    (result,) = _template_source(tmp_path, payload)
    assert isinstance(result, RecordError) and reason in str(result)
