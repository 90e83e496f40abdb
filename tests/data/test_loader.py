"""make_loader: disjoint and covering rows per rank and worker, equal step counts, exact resume, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shardkit import LLAVA_FC, MLLAMA_FC, random_rows, write_build

from mlan.data.collate import family_collate
from mlan.data.images import ImageDecodeError
from mlan.data.loader import ShardError, make_loader, plan_batches
from mlan.mixture.shards import PackedRow


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    return write_build(tmp_path_factory.mktemp("build"), random_rows(43, seed=1, family_config=MLLAMA_FC),
                       MLLAMA_FC, seq_len=128, rows_per_shard=10)


def manifest_keys(build_dir: Path) -> set[str]:
    m = json.loads((build_dir / "manifest.json").read_text())
    return {f"{s:06d}-{r:06d}" for s, shard in enumerate(m["shards"]) for r in range(shard["rows"])}


@pytest.mark.parametrize("n_rows", [1, 2, 3, 7, 16, 17, 43, 100])
@pytest.mark.parametrize("world_size,batch_rows", [(1, 1), (1, 4), (2, 1), (2, 3), (4, 2), (3, 5)])
def test_plan_deals_every_row_once_with_equal_step_counts(n_rows, world_size, batch_rows):
    plans = [plan_batches(n_rows, r, world_size, batch_rows, seed=5) for r in range(world_size)]
    assert len({len(p) for p in plans}) == 1  # FSDP: every rank runs the same number of steps
    assert len(plans[0]) == -(-n_rows // (world_size * batch_rows))
    real = [int(g) for p in plans for rows, fill in zip(p.rows, p.filler) for g in rows[~fill]]
    assert sorted(real) == list(range(n_rows))  # disjoint and covering: nothing dropped, nothing twice
    for p in plans:
        assert all(len(rows) == batch_rows for rows in p.rows[:-1])
        assert 1 <= len(p.rows[-1]) <= batch_rows
        assert all(not f.any() for f in p.filler[:-1])
    sizes = [int((~p.filler[-1]).sum()) for p in plans]
    assert max(sizes) - min(sizes) <= 1  # the remainder is dealt evenly
    assert sum(int(p.filler[-1].sum()) for p in plans) == max(0, world_size - (n_rows - (len(plans[0]) - 1)
                                                                               * world_size * batch_rows))


def test_plan_order_is_seeded():
    a = np.concatenate(plan_batches(50, 0, 1, 4, seed=1).rows)
    assert np.array_equal(a, np.concatenate(plan_batches(50, 0, 1, 4, seed=1).rows))
    assert not np.array_equal(a, np.concatenate(plan_batches(50, 0, 1, 4, seed=2).rows))
    assert not np.array_equal(a, np.arange(50))
    assert not np.array_equal(a, np.concatenate(plan_batches(50, 0, 1, 4, seed=1, epoch=1).rows))


@pytest.mark.timeout(120)
def test_two_ranks_two_workers_disjoint_and_covering(build):
    seen: dict[str, tuple[int, int]] = {}
    counts = []
    n_tokens = 0
    for rank in range(2):
        loader = make_loader(str(build), rank, 2, batch_rows=3, workers=2, seed=11)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == len(loader)
        assert {b["meta"]["worker"] for b in batches} == {0, 1}
        for b in batches:
            n_tokens += b["meta"]["n_tokens"]
            for key in b["meta"]["keys"]:
                assert key not in seen, f"row {key} dealt twice ({seen[key]} and {(rank, b['meta']['worker'])})"
                seen[key] = (rank, b["meta"]["worker"])
    assert counts[0] == counts[1] == -(-43 // 6)
    assert set(seen) == manifest_keys(build)
    manifest = json.loads((build / "manifest.json").read_text())
    assert n_tokens == manifest["totals"]["tokens"]


def _same_batch(a: dict, b: dict) -> bool:
    if a["meta"]["keys"] != b["meta"]["keys"] or a.keys() != b.keys():
        return False
    return all(torch.equal(a[k], b[k]) for k in a if k != "meta")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", [0, 3, 7])
def test_exact_resume(build, k):
    full = list(make_loader(str(build), 1, 2, batch_rows=2, workers=2, seed=3))
    first = make_loader(str(build), 1, 2, batch_rows=2, workers=2, seed=3)
    it = iter(first)
    consumed = [next(it) for _ in range(k)]
    state = first.state_dict()
    restored = make_loader(str(build), 1, 2, batch_rows=2, workers=2, seed=3)
    restored.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    rest = list(restored)
    assert len(consumed) + len(rest) == len(full) == len(restored)
    assert all(_same_batch(a, b) for a, b in zip(consumed + rest, full))


def test_state_from_another_layout_is_refused(build):
    state = make_loader(str(build), 0, 2, batch_rows=2, workers=0, seed=3).state_dict()
    other = make_loader(str(build), 0, 2, batch_rows=4, workers=0, seed=3)
    with pytest.raises(ValueError, match="batch_rows"):
        other.load_state_dict(state)


def test_iterating_after_a_pass_starts_the_next_epoch(build):
    loader = make_loader(str(build), 0, 1, batch_rows=8, workers=0, seed=3)
    e0 = [k for b in loader for k in b["meta"]["keys"]]
    e1 = [k for b in loader for k in b["meta"]["keys"]]
    assert sorted(e0) == sorted(e1) == sorted(manifest_keys(build)) and e0 != e1
    assert loader.state_dict()["epoch"] == 1


def test_pad_to_seq_len(build):
    batch = next(iter(make_loader(str(build), 0, 1, batch_rows=2, workers=0, seed=0, pad_to="seq_len")))
    assert batch["input_ids"].shape == (2, 128) and batch["cross_attention_mask"].shape[:2] == (2, 128)


def test_verify_names_a_corrupted_shard(tmp_path):
    out = write_build(tmp_path / "b", random_rows(20, seed=2, family_config=LLAVA_FC), LLAVA_FC, rows_per_shard=10)
    shard = out / "shards" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    make_loader(str(out), 0, 1, 1, 0, 0)  # without verification the loader opens
    with pytest.raises(ShardError, match="shards/shard-000001.tar: sha256"):
        make_loader(str(out), 0, 1, 1, 0, 0, verify=True)


def test_truncated_shard_is_named(tmp_path):
    out = write_build(tmp_path / "b", random_rows(20, seed=2, family_config=LLAVA_FC), LLAVA_FC, rows_per_shard=10)
    shard = out / "shards" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(ShardError, match="shards/shard-000000.tar"):
        list(make_loader(str(out), 0, 1, 4, 0, 0))


@pytest.mark.timeout(60)
def test_undecodable_image_names_shard_and_key(tmp_path):
    rows = random_rows(12, seed=4, family_config=MLLAMA_FC, image_every=1)
    bad: PackedRow = rows[7]
    bad.images[0] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    out = write_build(tmp_path / "b", rows, MLLAMA_FC, rows_per_shard=5)
    with pytest.raises(ImageDecodeError, match=r"shards/shard-000001.tar: row '000001-000002': img0.jpg"):
        list(make_loader(str(out), 0, 1, batch_rows=2, workers=1, seed=0))


# ---------------------------------------------------------------- on a real `mlan build`
@pytest.fixture(scope="module")
def real_build(tiny_real_builds) -> Path:
    """recipes/tiny-mllama.yaml built over the real data (10k tokens in rows of 256; tests/conftest.py)."""
    return tiny_real_builds["mllama"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_build_two_ranks_two_workers(real_build):
    manifest = json.loads((real_build / "manifest.json").read_text())
    fc = manifest["family_config"]
    assert fc["family"] == "mllama" and fc["tile_size"] == 56 and fc["max_tiles"] == 4
    assert fc["image_token_id"] == 128256 and fc["vocab_size"] == 128256
    keys, tokens, by_mod, images = [], 0, {"text": 0, "image_text": 0}, 0
    lengths = set()
    for rank in range(2):
        loader = make_loader(str(real_build), rank, 2, batch_rows=2, workers=2, seed=42, verify=True)
        lengths.add(len(loader))
        for b in loader:
            meta = b["meta"]
            keys += meta["keys"]; tokens += meta["n_tokens"]; images += meta["n_images"]
            for m, n in meta["tokens_by_modality"].items():
                by_mod[m] += n
            xm, pos = b["cross_attention_mask"], b["position_ids"]
            # every image's visible span lies inside one document (positions restart where documents do)
            doc_id = (pos == 0).cumsum(-1)
            for i in range(xm.shape[0]):
                for j in range(xm.shape[2]):
                    seen = doc_id[i][xm[i, :, j].any(-1)]
                    assert seen.numel() == 0 or int(seen.min()) == int(seen.max())
    assert len(lengths) == 1
    assert sorted(keys) == sorted(manifest_keys(real_build))
    assert tokens == manifest["totals"]["tokens"]
    assert by_mod == manifest["totals"]["tokens_by_modality"]
    assert images > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_build_row_loss_equals_its_documents(real_build):
    """Isolation on a real packed row of real data: the tiny Mllama's summed loss equals its documents' alone."""
    from shardkit import Doc
    from test_isolation import TOL, mllama_alone, rel_gap, summed_loss
    from transformers import MllamaForConditionalGeneration

    from mlan.families import tiny
    from mlan.families.mllama.patch import apply_reference_cross_attention

    loader = make_loader(str(real_build), 0, 1, batch_rows=1, workers=0, seed=0)
    reader = loader.reader
    row = next(r for r in (reader.read(g) for g in range(len(reader)))
               if len(r.docs) >= 3 and "image_text" in r.modalities and "text" in r.modalities)
    torch.manual_seed(0)
    model = apply_reference_cross_attention(MllamaForConditionalGeneration(tiny.tiny_mllama_config()).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                p.fill_(0.8)
    batch = family_collate(manifest_fc(real_build))([row])
    batch.pop("meta")
    labels = batch.pop("labels")
    with torch.no_grad():
        packed = summed_loss(model(**batch, use_cache=False).logits, labels)
    starts = np.cumsum(row.docs) - row.docs
    docs = [Doc(row.ids[a:a + n], row.loss[a:a + n], [img for img, d in zip(row.images, row.image_docs) if d == k])
            for k, (a, n) in enumerate(zip(starts, row.docs))]
    alone = sum(mllama_alone(model, d) for d in docs)
    assert rel_gap(packed, alone) < TOL, (packed, alone)


def manifest_fc(build_dir: Path) -> dict:
    return json.loads((build_dir / "manifest.json").read_text())["family_config"]
