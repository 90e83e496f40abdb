"""Collators: positions, labels, per-document Mllama cross-attention masks, images in order, padding, meta."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from shardkit import LLAVA_FC, MLLAMA_FC, make_doc, pack
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from mlan.data.collate import checked_geometry, document_position_ids, family_collate, row_labels
from mlan.data.images import decode_image
from mlan.families import tiny
from mlan.families.llava.inputs import llava_pixel_values
from mlan.families.mllama.inputs import mllama_cross_attention_mask, mllama_images

IMG = tiny.IMAGE_TOKEN_ID


def test_position_ids_restart_per_document():
    docs = [3, 1, 4, 2]
    expected = np.concatenate([np.arange(n) for n in docs])
    assert np.array_equal(document_position_ids(docs), expected)


def test_labels_mask_loss_images_and_document_starts():
    ids = np.array([1, 2, IMG, 4, 5, 6, 7, 8], dtype=np.uint32)
    loss = np.array([1, 1, 1, 1, 0, 1, 1, 1], dtype=np.uint8)
    labels = row_labels(ids, loss, [4, 2, 2], IMG)
    # doc starts 0, 4, 6 are never targets; the image token and loss-mask-0 positions neither
    assert labels.tolist() == [-100, 2, -100, 4, -100, 6, -100, 8]


def _reference_mask(docs_ids: list[np.ndarray], tiles_per_doc: list[list[int]], max_tiles: int) -> np.ndarray:
    """Each document alone through transformers' processor helpers, placed block-diagonally."""
    total = sum(len(d) for d in docs_ids)
    n_images = sum(len(t) for t in tiles_per_doc)
    out = np.zeros((total, n_images, max_tiles), dtype=np.int64)
    pos = img = 0
    for ids, tiles in zip(docs_ids, tiles_per_doc):
        if tiles:
            dense = convert_sparse_cross_attention_mask_to_dense(
                [get_cross_attention_token_mask(ids.tolist(), IMG)], [tiles], max_tiles, len(ids))[0]
            out[pos:pos + len(ids), img:img + len(tiles)] = dense
        pos += len(ids)
        img += len(tiles)
    return out


@pytest.mark.parametrize("layout", [
    [(), (3,), ()],  # text, one image, text
    [(2,), (4,)],  # two image documents back to back
    [(2, 3), (), (1, 5, 6)],  # consecutive image tokens share the span; separated ones end at the next
    [(1,)],  # one document
])
def test_mllama_mask_is_meta_reference_per_document(layout):
    rng = np.random.default_rng(len(layout))
    docs = [make_doc(rng, 9, at) for at in layout]
    tiles = [[int(rng.integers(1, 5)) for _ in at] for at in layout]
    row = pack(docs, "r")
    flat_tiles = [t for ts in tiles for t in ts]
    got = mllama_cross_attention_mask(row.ids, row.docs, IMG, flat_tiles, 4)
    assert np.array_equal(got, _reference_mask([d.ids for d in docs], tiles, 4))
    # and nothing of an image is visible outside its own document
    bounds = np.cumsum([0] + [len(d.ids) for d in docs])
    for i, doc_index in enumerate(row.image_docs):
        visible = np.flatnonzero(got[:, i].any(-1))
        assert bounds[doc_index] <= visible.min() and visible.max() < bounds[doc_index + 1]


def test_hf_row_mask_leaks_into_the_next_document():
    rng = np.random.default_rng(0)
    docs = [make_doc(rng, 9, (3,)), make_doc(rng, 9)]
    row = pack(docs, "r")
    hf = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(row.ids.astype(np.int64).tolist(), IMG)], [[1]], 4, len(row))[0]
    ours = mllama_cross_attention_mask(row.ids, row.docs, IMG, [1], 4)
    second = slice(len(docs[0].ids), len(row))
    assert hf[second].any() and not ours[second].any()


def test_llava_batch_images_in_order_of_appearance():
    rng = np.random.default_rng(1)
    n = LLAVA_FC["image_tokens"]
    rows = [pack([make_doc(rng, 10, (2,), n, image_sizes=((90, 30),)), make_doc(rng, 8, (1, 5), n)], "a"),
            pack([make_doc(rng, 12)], "b"),
            pack([make_doc(rng, 7, (3,), n, image_sizes=((30, 90),))], "c")]
    batch = family_collate(LLAVA_FC)(rows)
    images = [img for r in rows for img in r.images]
    assert batch["pixel_values"].shape == (4, 3, 56, 56)
    for i, data in enumerate(images):
        alone = llava_pixel_values([decode_image(data, "t")], 56)[0]
        assert torch.equal(batch["pixel_values"][i], alone)
    ids = batch["input_ids"]
    assert int((ids == IMG).sum()) == 4 * n  # padding never uses the image token
    assert set(batch) == {"input_ids", "labels", "position_ids", "pixel_values", "meta"}


def test_mllama_batch_shapes_tiles_padding_and_meta():
    rng = np.random.default_rng(2)
    rows = [pack([make_doc(rng, 10, (2,), image_sizes=((200, 50),)), make_doc(rng, 6)], "a"),
            pack([make_doc(rng, 5)], "b")]
    batch = family_collate(MLLAMA_FC, seq_len=32, pad_to="seq_len")(rows)
    assert batch["input_ids"].shape == (2, 32)
    assert batch["pixel_values"].shape == (2, 1, 4, 3, 56, 56)
    tiles = mllama_images([decode_image(rows[0].images[0], "t")], 56, 4)
    assert batch["aspect_ratio_mask"][0, 0].tolist() == tiles.aspect_ratio_mask[0].tolist()
    assert int(batch["aspect_ratio_ids"][0, 0]) == int(tiles.aspect_ratio_ids[0]) > 0
    xm = batch["cross_attention_mask"]
    assert xm.shape == (2, 32, 1, 4)
    assert xm[0, :, 0].sum(-1).max() == tiles.num_tiles[0]  # valid tiles only
    assert not xm[1].any() and not xm[0, 17:].any()  # row b and padding see no image
    assert batch["position_ids"][1].tolist() == list(range(5)) + list(range(27))
    assert (batch["labels"][:, 17:] == -100).all() and (batch["labels"][1, 5:] == -100).all()
    meta = batch["meta"]
    assert meta["n_tokens"] == 22 and meta["keys"] == ["a", "b"] and meta["n_images"] == 1
    assert meta["tokens_by_modality"] == {"image_text": 11, "text": 11}
    assert meta["n_loss_tokens"] == int((batch["labels"] != -100).sum())


def test_mllama_text_only_batch_gets_a_fully_masked_dummy_image():
    rng = np.random.default_rng(3)
    batch = family_collate(MLLAMA_FC)([pack([make_doc(rng, 10)], "a")])
    assert batch["pixel_values"].shape[:3] == (1, 1, 4)
    assert not batch["cross_attention_mask"].any()
    assert "pixel_values" not in family_collate(MLLAMA_FC, always_images=False)([pack([make_doc(rng, 10)], "a")])


def test_filler_rows_carry_no_loss_and_no_count():
    rng = np.random.default_rng(4)
    rows = [pack([make_doc(rng, 10)], "a"), pack([make_doc(rng, 10)], "b")]
    batch = family_collate(LLAVA_FC)(rows, filler=[False, True])
    assert (batch["labels"][1] == -100).all() and batch["meta"]["keys"] == ["a"]
    assert batch["meta"]["n_tokens"] == 10 and batch["meta"]["filler_rows"] == 1
    assert batch["meta"]["row_tokens"] == [10, 0]


def test_bad_rows_and_configs_are_named():
    rng = np.random.default_rng(5)
    row = pack([make_doc(rng, 10, (2,))], "shard-x-row-y")
    row.images.append(row.images[0]); row.image_exts.append("jpg"); row.image_docs.append(0)
    with pytest.raises(ValueError, match="shard-x-row-y.*1 image tokens for 2 images"):
        family_collate(MLLAMA_FC)([row])
    with pytest.raises(ValueError, match="family_config.tile_size"):
        checked_geometry({**MLLAMA_FC, "tile_size": None})
    with pytest.raises(ValueError, match="pad_to"):
        family_collate(MLLAMA_FC, pad_to="max")
    with pytest.raises(ValueError, match="does not fit"):
        family_collate(MLLAMA_FC, seq_len=4, pad_to="seq_len")([pack([make_doc(rng, 10)], "a")])
