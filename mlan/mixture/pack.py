"""Best-fit-decreasing packing of documents into rows of ≤ seq_len tokens and ≤ max_images images.

Rows needed are at least max(⌈tokens / seq_len⌉, ⌈images / max_images⌉) (`row_bound`); two orders are
packed (longest first; image documents first, unless the first is within 0.1% of the bound) and the one with
fewer rows kept.

Works on document lengths only (numpy arrays); one step per document, never per token. Open rows are
indexed by (images still allowed, free tokens) so each document finds the fullest row it fits in by
bisection. A buffer, when used, is sized in tokens (≥ 64 × seq_len), never in samples.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

MIN_BUFFER_ROWS = 64


@dataclass(frozen=True)
class Packing:
    """Rows as CSR: the documents of row r are `items[offsets[r]:offsets[r+1]]` (indices into the input)."""

    offsets: np.ndarray  # int64 (n_rows + 1,)
    items: np.ndarray  # int64 (n_items,)
    row_tokens: np.ndarray  # int64 (n_rows,)
    seq_len: int

    @property
    def n_rows(self) -> int:
        return int(self.row_tokens.shape[0])

    def bound(self, images: np.ndarray | None, max_images: int) -> int:
        """The fewest rows any packing of these documents could have (see `row_bound`)."""
        return row_bound(int(self.row_tokens.sum()), int(np.sum(images)) if images is not None else 0,
                         self.seq_len, max_images)

    @property
    def efficiency(self) -> float:
        """Tokens over row capacity (rows × seq_len); padding is what is lost."""
        return float(self.row_tokens.sum()) / (self.n_rows * self.seq_len) if self.n_rows else 1.0

    def permuted(self, order: np.ndarray) -> Packing:
        """The same rows in another order (e.g. a seeded shuffle so rows are not sorted by length)."""
        sizes = np.diff(self.offsets)[order]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        starts = self.offsets[:-1][order]
        idx = np.repeat(starts - offsets[:-1], sizes) + np.arange(offsets[-1])
        return Packing(offsets, self.items[idx], self.row_tokens[order], self.seq_len)


def row_bound(tokens: int, images: int, seq_len: int, max_images: int) -> int:
    """max(⌈tokens / seq_len⌉, ⌈images / max_images⌉): no packing has fewer rows."""
    return max(-(-tokens // seq_len), -(-images // max_images))


def _bfd(lengths: np.ndarray, images: np.ndarray, seq_len: int, max_images: int,
         order: np.ndarray | None = None) -> list[list[int]]:
    """Best-fit decreasing on one buffer; returns rows as lists of positions into `lengths`."""
    if order is None:
        order = np.argsort(-lengths, kind="stable")  # longest first, ties in input order
    # caps[level]: sorted distinct free-token counts of open rows with `level` images still allowed
    caps: list[list[int]] = [[] for _ in range(max_images + 1)]
    bins: dict[tuple[int, int], list[int]] = {}
    rows: list[list[int]] = []
    free_img: list[int] = []
    for i, length, nimg in zip(order.tolist(), lengths[order].tolist(), images[order].tolist()):
        best_cap, best_level = seq_len + 1, -1
        for level in range(nimg, max_images + 1):
            lst = caps[level]
            j = bisect_left(lst, length)
            if j < len(lst) and lst[j] < best_cap:
                best_cap, best_level = lst[j], level
        if best_level < 0:
            r = len(rows)
            rows.append([i])
            cap, level = seq_len - length, max_images - nimg
            free_img.append(level)
        else:
            key = (best_level, best_cap)
            stack = bins[key]
            r = stack.pop()
            if not stack:
                del bins[key]
                lst = caps[best_level]
                del lst[bisect_left(lst, best_cap)]
            rows[r].append(i)
            cap, level = best_cap - length, best_level - nimg
            free_img[r] = level
        if cap > 0:
            key = (level, cap)
            stack = bins.get(key)
            if stack is None:
                bins[key] = [r]
                insort(caps[level], cap)
            else:
                stack.append(r)
    return rows


def _best_packing(lengths: np.ndarray, images: np.ndarray, seq_len: int, max_images: int) -> list[list[int]]:
    """The fewer rows of two best-fit orders: longest first, and image documents first (most images, then longest).

    Longest-first alone fills rows with text before the (short) image documents arrive, which then open rows
    that reach the image cap long before the token cap: with one token per image (Mllama) a fifth of the rows
    were wasted. Placing image documents first spreads them at the image cap and lets text fill the rest.
    """
    rows = _bfd(lengths, images, seq_len, max_images)
    bound = row_bound(int(lengths.sum()), int(images.sum()), seq_len, max_images)
    if len(rows) <= bound + max(1, bound // 1000):  # already within 0.1% of the bound: skip the second pass
        return rows
    by_images = _bfd(lengths, images, seq_len, max_images, np.lexsort((-lengths, -images)))
    return by_images if len(by_images) < len(rows) else rows


def pack(
    lengths: np.ndarray,
    images: np.ndarray | None = None,
    *,
    seq_len: int,
    max_images: int = 8,
    buffer_tokens: int | None = None,
) -> Packing:
    """Pack documents (in the given order) into rows; rows come out in the order they were opened."""
    lengths = np.asarray(lengths, dtype=np.int64)
    images = np.zeros_like(lengths) if images is None else np.asarray(images, dtype=np.int64)
    if lengths.size and int(lengths.max()) > seq_len:
        bad = int(np.argmax(lengths > seq_len))
        raise ValueError(f"document {bad} has {int(lengths[bad])} tokens, more than seq_len {seq_len}")
    if lengths.size and int(lengths.min()) <= 0:
        raise ValueError(f"document {int(np.argmin(lengths))} is empty")
    if images.size and int(images.max()) > max_images:
        bad = int(np.argmax(images > max_images))
        raise ValueError(f"document {bad} has {int(images[bad])} images, more than max_images_per_row {max_images}")
    if buffer_tokens is not None and buffer_tokens < MIN_BUFFER_ROWS * seq_len:
        raise ValueError(
            f"pack buffer of {buffer_tokens} tokens is under {MIN_BUFFER_ROWS} × seq_len = {MIN_BUFFER_ROWS * seq_len}"
        )
    if buffer_tokens is None:
        bounds = [0, lengths.size]
    else:  # consecutive slices holding about buffer_tokens tokens each
        cs = np.cumsum(lengths)
        cuts = np.searchsorted(cs, np.arange(buffer_tokens, int(cs[-1]) if cs.size else 0, buffer_tokens), side="right")
        bounds = [0, *sorted(set(cuts.tolist()) - {0, lengths.size}), lengths.size]
    all_rows: list[np.ndarray] = []
    for a, b in pairwise(bounds):
        for row in _best_packing(lengths[a:b], images[a:b], seq_len, max_images):
            all_rows.append(np.asarray(row, dtype=np.int64) + a)
    sizes = np.array([r.size for r in all_rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    items = np.concatenate(all_rows) if all_rows else np.zeros(0, np.int64)
    row_tokens = np.add.reduceat(lengths[items], offsets[:-1]) if all_rows else np.zeros(0, np.int64)
    return Packing(offsets, items, row_tokens.astype(np.int64), seq_len)
