"""Loader throughput for an Mllama build against one H100's demand: do DataLoader workers keep a GPU fed?

Baseline (same run, computed, not measured): one H100 training an 8B model at 40% MFU consumes
0.40 × 989 TFLOP/s ÷ (6 × 8e9 FLOP/token) ≈ 8,240 tokens/s. The loader's delivered tokens/s and images/s
are measured with 1 and 2 workers over an Mllama-family build at the real geometry (560-px tiles, ≤ 4
tiles, seq_len 4096): the real text of ../shared/data (Alpaca, GSM8K, tokenized with the Llama-3
tokenizer) and NLVR sentences, each image-text document with a realistic 640×480 JPEG photo (the real
demo photos resized to 640×480 with sensor-like noise), mixed 75% text / 25% image-text by tokens.

    .venv/bin/python tools/bench_loader.py                 # builds a temporary shard set, 1 and 2 workers
    .venv/bin/python tools/bench_loader.py --build OUT     # an existing `mlan build` output instead
    .venv/bin/python tools/bench_loader.py --demand 9000 --json loader.json   # a measured GPU demand (tokens/s)

`--tile` / `--max-tiles` set the Mllama geometry (default 560-px tiles, ≤ 4 tiles: Llama-3.2-Vision's); `--demand`
replaces the computed H100 baseline with a measured one (tools/gpu_check.sh passes the 3B bench's packed tokens/s
per GPU); `--json` also writes the figures.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlan.data.loader import make_loader

H100_BF16_DENSE_FLOPS = 989e12
MFU = 0.40
PARAMS = 8e9
DEMAND_TOKENS_S = MFU * H100_BF16_DENSE_FLOPS / (6 * PARAMS)


def _photos(n: int, seed: int, data: Path) -> list[bytes]:
    """640×480 JPEGs: the real demo photos upscaled, flipped and noised so that no two are alike."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    bases = [Image.open(p).convert("RGB") for p in sorted((data / "image_text" / "mllm_demo").glob("*.jpg"))]
    out = []
    for i in range(n):
        img = bases[i % len(bases)].resize((640, 480), Image.BICUBIC)
        if i % 2:
            img = ImageOps.mirror(img)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, size=(480, 640, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def make_bench_build(out: Path, data: Path, n_rows: int, seq_len: int, tile: int, max_tiles: int, seed: int = 0) -> Path:
    """Pack the real data into `n_rows` rows of ≤ seq_len tokens (≤ 8 images) and write shards + manifest."""
    import hashlib

    import webdataset as wds

    from mlan.mixture.shards import PackedRow, row_to_sample
    from mlan.tokenizer import load_tokenizer

    tok = load_tokenizer("llama3")
    image_id = tok.convert_tokens_to_ids("<|image|>")
    header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    texts = []
    for rec in json.loads((data / "text" / "alpaca_en_demo.json").read_text()):
        texts.append((f"{rec['instruction']}\n{rec.get('input', '')}".strip(), rec["output"]))
    for line in (data / "text" / "gsm8k_train.jsonl").read_text().splitlines():
        rec = json.loads(line)
        texts.append((rec["question"], rec["answer"]))
    sentences = [json.loads(line) for line in (data / "image_text" / "nlvr_dev" / "dev.json").read_text().splitlines()]

    def encode(prompt: str, answer: str, image: bool) -> tuple[np.ndarray, np.ndarray]:
        p = tok.encode("<|begin_of_text|>" + header("user") + ("<|image|>" if image else "") + prompt + "<|eot_id|>"
                       + header("assistant"), add_special_tokens=False)
        a = tok.encode(answer + "<|eot_id|>", add_special_tokens=False)
        ids = np.array(p + a, dtype=np.uint32)[:seq_len]
        return ids, np.array([0] * len(p) + [1] * len(a), dtype=np.uint8)[:seq_len]

    rng = np.random.default_rng(seed)
    photos = _photos(64, seed, data)
    rows: list[PackedRow] = []
    open_rows: list[dict] = []  # first-fit over a few open rows (≤ seq_len tokens, ≤ 8 images each)
    tokens = {"text": 0, "image_text": 0}

    def close(cur: dict) -> None:
        open_rows.remove(cur)
        rows.append(PackedRow(
            ids=np.concatenate(cur["ids"]), loss=np.concatenate(cur["loss"]), docs=np.array(cur["docs"], np.uint32),
            doc_ids=[f"d{len(rows)}-{i}" for i in range(len(cur["docs"]))], sources=["bench"] * len(cur["docs"]),
            modalities=cur["mods"], images=cur["imgs"], image_exts=["jpg"] * len(cur["imgs"]),
            image_docs=cur["img_docs"]))

    while len(rows) < n_rows:
        image = tokens["image_text"] < tokens["text"] / 3  # 75% text / 25% image-text by tokens
        if image:
            rec = sentences[int(rng.integers(len(sentences)))]
            ids, loss = encode(f"Is this statement true or false? \"{rec['sentence']}\"",
                               f"The direct answer is: {rec['label']}", True)
        else:
            ids, loss = encode(*texts[int(rng.integers(len(texts)))], False)
        fits = [r for r in open_rows if sum(r["docs"]) + len(ids) <= seq_len and not (image and len(r["imgs"]) >= 8)]
        if fits:
            cur = fits[0]
        else:
            if len(open_rows) >= 8:
                close(max(open_rows, key=lambda r: sum(r["docs"])))
            cur = {"ids": [], "loss": [], "docs": [], "mods": [], "imgs": [], "img_docs": []}
            open_rows.append(cur)
        if image:
            cur["imgs"].append(photos[int(rng.integers(len(photos)))])
            cur["img_docs"].append(len(cur["docs"]))
        cur["ids"].append(ids); cur["loss"].append(loss); cur["docs"].append(len(ids))
        cur["mods"].append("image_text" if image else "text")
        tokens["image_text" if image else "text"] += len(ids)
        if sum(cur["docs"]) >= seq_len - 16:
            close(cur)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    name = "shards/shard-000000.tar"
    with wds.TarWriter(str(out / name)) as sink:
        for i, row in enumerate(rows):
            row.key = f"000000-{i:06d}"
            sink.write(row_to_sample(row))
    manifest = {
        "version": 1, "recipe": {"bench": True}, "fingerprint": "bench", "seed": seed, "seq_len": seq_len,
        "family_config": {"family": "mllama", "vocab_size": 128256, "image_token_id": int(image_id), "image_tokens": 1,
                          "image_size": tile, "patch_size": 14, "tile_size": tile, "max_tiles": max_tiles},
        "images": {"pre_resized": False},
        "totals": {"rows": len(rows), "tokens": sum(len(r) for r in rows)},
        "shards": [{"name": name, "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(), "rows": len(rows),
                    "tokens": sum(len(r) for r in rows)}],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def measure(build: str, workers: int, batches: int | None) -> dict:
    """Steady-state delivery: the clock starts when the first batch arrives (worker start-up excluded)."""
    loader = make_loader(build, 0, 1, batch_rows=1, workers=workers, seed=0)
    n = len(loader) if batches is None else min(batches, len(loader))
    tokens = images = 0
    t0 = time.perf_counter()
    start = None
    for i, batch in enumerate(loader):
        if i == 0:
            start = time.perf_counter()
        else:
            tokens += batch["meta"]["n_tokens"]
            images += batch["meta"]["n_images"]
        if i + 1 >= n:
            break
    dt = time.perf_counter() - start
    return {"workers": workers, "batches": n - 1, "tokens": tokens, "images": images, "seconds": dt,
            "startup_s": start - t0, "tokens_s": tokens / dt, "images_s": images / dt}


def measure_cpu(build: str, batches: int | None) -> dict:
    """One process, CPU seconds (time.process_time): what one uncontended worker delivers per second of its core."""
    from mlan.data.loader import RankBatches

    loader = make_loader(build, 0, 1, batch_rows=1, workers=0, seed=0)
    ds = RankBatches(loader.reader, loader.plan(), loader.collate)
    n = len(ds) if batches is None else min(batches, len(ds))
    ds[0]  # warm caches (tar index, processors)
    tokens = images = 0
    c0, w0 = time.process_time(), time.perf_counter()
    for b in range(1, n):
        meta = ds[b]["meta"]
        tokens += meta["n_tokens"]
        images += meta["n_images"]
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"cpu_s": cpu, "wall_s": wall, "tokens_per_cpu_s": tokens / cpu, "images_per_cpu_s": images / cpu,
            "batches": n - 1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=None, help="an existing Mllama `mlan build` output (default: build one)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--rows", type=int, default=40, help="rows in the temporary build")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=560)
    ap.add_argument("--max-tiles", type=int, default=4)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--batches", type=int, default=None, help="batches per measurement (default: all)")
    ap.add_argument("--demand", type=float, default=None, help="tokens/s one GPU consumes (default: H100, 8B model, "
                    f"{MFU:.0%} MFU = {DEMAND_TOKENS_S:,.0f})")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    demand = args.demand or DEMAND_TOKENS_S
    baseline = (f"measured GPU demand {demand:,.0f} tokens/s" if args.demand else
                f"one H100, 8B model, {MFU:.0%} MFU → {demand:,.0f} tokens/s")

    tmp = None
    build = args.build
    if build is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-loader-")
        t = time.perf_counter()
        build = str(make_bench_build(Path(tmp.name), Path(args.data), args.rows, args.seq_len, args.tile, args.max_tiles))
        print(f"built {args.rows} rows in {time.perf_counter() - t:.1f}s at {build}")
    manifest = json.loads((Path(build) / "manifest.json").read_text())
    fc = manifest["family_config"]
    print(f"build: family {fc['family']}, tile {fc.get('tile_size')}, max_tiles {fc.get('max_tiles')}, "
          f"seq_len {manifest['seq_len']}, rows {sum(s['rows'] for s in manifest['shards'])}")

    results = [measure(build, int(w), args.batches) for w in args.workers.split(",")]
    per_token_images = sum(r["images"] for r in results) / max(1, sum(r["tokens"] for r in results))
    demand_images = demand * per_token_images
    print(f"\nbaseline: {baseline} "
          f"(= {demand_images:.1f} images/s at this build's {1 / max(per_token_images, 1e-12):,.0f} tokens per "
          "image)\n")
    print(f"{'workers':>7} {'tokens/s':>10} {'images/s':>9} {'× demand':>9} {'batches':>8} {'seconds':>8} {'start-up s':>10}")
    for r in results:
        print(f"{r['workers']:>7} {r['tokens_s']:>10,.0f} {r['images_s']:>9.1f} {r['tokens_s'] / demand:>9.2f} "
              f"{r['batches']:>8} {r['seconds']:>8.1f} {r['startup_s']:>10.1f}")
    cpu = measure_cpu(build, args.batches)
    print(f"{'1 core':>7} {cpu['tokens_per_cpu_s']:>10,.0f} {cpu['images_per_cpu_s']:>9.1f} "
          f"{cpu['tokens_per_cpu_s'] / demand:>9.2f} {cpu['batches']:>8} {cpu['cpu_s']:>8.1f}   "
          f"(in-process, per CPU-second: robust to a shared machine; wall {cpu['wall_s']:.1f}s)")
    per_worker = results[0]["tokens_s"] / results[0]["workers"]
    print(f"\nworkers per GPU for {demand:,.0f} tokens/s: {math.ceil(demand / per_worker)} "
          f"at the measured {per_worker:,.0f} tokens/s per worker (wall clock, {results[0]['workers']} worker); "
          f"{math.ceil(demand / cpu['tokens_per_cpu_s'])} at {cpu['tokens_per_cpu_s']:,.0f} tokens per "
          f"CPU-second (one uncontended core per worker)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "family": fc["family"], "tile_size": fc.get("tile_size"), "max_tiles": fc.get("max_tiles"),
            "seq_len": manifest["seq_len"], "demand_tokens_s": demand, "measured_demand": bool(args.demand),
            "workers": results, "one_core": cpu, "workers_per_gpu": math.ceil(demand / per_worker),
            "workers_per_gpu_cpu_seconds": math.ceil(demand / cpu["tokens_per_cpu_s"])}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
