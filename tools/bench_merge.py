"""Peak memory of `mlan merge` against a whole-model in-memory merge, each in its own process.

Each merge runs in a fresh subprocess that measures its own RSS once its imports are done and torch's
kernels are warm (the interpreter), then its peak RSS after merging (VmHWM, reset at the start of the
window; `ru_maxrss` where /proc is absent); `merge RSS` is the difference. The streaming
merge should stay below 3× the largest tensor; the in-memory baseline (load both state dicts, merge,
save) grows with the model.

    .venv/bin/python tools/bench_merge.py                      # builds a tiny LLaVA + base Llama
    .venv/bin/python tools/bench_merge.py --hidden 512 --layers 8 --dtype bf16
    .venv/bin/python tools/bench_merge.py --vlm VLM_DIR --llm LLM_DIR --json
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 1 << 20


def _status_bytes(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def _reset_peak() -> int:
    """Start a fresh peak-RSS window; returns the RSS now (the interpreter).

    On Linux ru_maxrss carries the parent's high-water mark over fork + exec, so a child started by a
    big process (pytest holding models) would report its parent's peak. Writing 5 to
    /proc/self/clear_refs resets this process's VmHWM to its current RSS instead.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    now = _status_bytes("VmRSS")
    return now if now is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    """Peak RSS since `_reset_peak`: VmHWM on Linux, else ru_maxrss (KiB on Linux, bytes on macOS)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _warm_up_torch() -> None:
    """Run each kernel the merge uses once, so lazily loaded code and thread pools count as interpreter."""
    import torch

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        v, b = torch.randn(4096).to(dtype), torch.randn(4096).to(dtype)
        bits = (v.float() - b.float()).abs_().view(torch.int32)
        torch.bincount(bits >> 16, minlength=1 << 15)
        keep = bits > int(bits.median())
        torch.where(keep, torch.lerp(v.float(), b.float(), 0.5).to(dtype), v).view(torch.uint8).numpy()
        keep.nonzero(), keep.sum(), (bits > 5).any(), bits[keep] & 0xFFFF


def child(args: argparse.Namespace) -> None:
    """Run one merge in this process and print its memory figures as JSON."""
    import torch  # imported before the interpreter baseline is taken

    from mlan.merge import MergeConfig, merge_checkpoints, read_checkpoint

    if args.child == "baseline":
        from safetensors.torch import load_file, save_file

        from mlan.merge import plan_merge
    _warm_up_torch()
    interpreter = _reset_peak()
    t0 = time.perf_counter()
    if args.child == "streaming":
        merge_checkpoints(args.vlm, args.llm, args.out, MergeConfig(
            alpha=args.alpha, density=args.density, scope=args.scope, threads=args.threads))
    else:  # the obvious in-memory merge: whole state dicts, T for every tensor, one save per shard
        plan = plan_merge(Path(args.vlm), Path(args.llm))
        vlm, llm = {}, {}
        for f in sorted(Path(args.vlm).glob("*.safetensors")):
            vlm.update(load_file(f))
        for f in sorted(Path(args.llm).glob("*.safetensors")):
            llm.update(load_file(f))
        for name, item in plan.items.items():
            v = vlm[name]
            rows = llm[item.llm.name].shape[0] if v.dim() else None
            head = v[:rows].float() if rows is not None else v.float()
            t = head - llm[item.llm.name].float()
            merged = (head - args.alpha * t).to(v.dtype)
            vlm[name] = torch.cat([merged, v[rows:]]) if rows is not None else merged
        Path(args.out).mkdir(parents=True, exist_ok=True)
        by_file: dict[str, dict] = {}
        for name, entry in read_checkpoint(Path(args.vlm)).items():
            by_file.setdefault(entry.file.name, {})[name] = vlm[name]
        for file, tensors in by_file.items():
            save_file(tensors, str(Path(args.out) / file), metadata={"format": "pt"})
    seconds = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    print(json.dumps({"interpreter_rss_bytes": interpreter, "peak_rss_bytes": peak,
                      "merge_rss_bytes": peak - interpreter, "seconds": seconds}))


def build_pair(root: Path, hidden: int, layers: int, dtype: str, shard_size: str) -> tuple[Path, Path]:
    """A random tiny LLaVA and a base Llama holding its tower plus noise, saved in shards."""
    import torch
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    from mlan.families.tiny import tiny_llama_config, tiny_llava_config

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    vlm = LlavaForConditionalGeneration(tiny_llava_config(num_layers=layers, hidden=hidden)).to(torch_dtype)
    vlm.save_pretrained(root / "vlm", max_shard_size=shard_size)
    llm = LlamaForCausalLM(tiny_llama_config(layers, hidden)).to(torch_dtype)
    with torch.no_grad():
        llm.model.load_state_dict(vlm.model.language_model.state_dict())
        llm.lm_head.weight.copy_(vlm.lm_head.weight)
        for p in llm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    llm.save_pretrained(root / "llm", max_shard_size=shard_size)
    return root / "vlm", root / "llm"


def run_child(kind: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--vlm", str(args.vlm), "--llm", str(args.llm),
           "--out", str(out), "--alpha", str(args.alpha), "--density", str(args.density),
           "--scope", args.scope, "--threads", str(args.threads)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"bench_merge: the {kind} merge failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vlm"), p.add_argument("--llm")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--shard-size", default="50MB")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--scope", choices=["tensor", "global"], default="global")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the streaming merge")
    p.add_argument("--no-baseline", action="store_true", help="skip the in-memory merge")
    p.add_argument("--json", action="store_true", help="also print one JSON line with every figure")
    p.add_argument("--child", choices=["build", "streaming", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "build":
        return build_pair(Path(args.out), args.hidden, args.layers, args.dtype, args.shard_size) and None
    if args.child:
        return child(args)

    from mlan.merge import read_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        root = Path(tmp)
        if not (args.vlm and args.llm):  # built in a subprocess: a child inherits its parent's ru_maxrss
            cmd = [sys.executable, __file__, "--child", "build", "--out", str(root),
                   "--hidden", str(args.hidden), "--layers", str(args.layers), "--dtype", args.dtype,
                   "--shard-size", args.shard_size]
            subprocess.run(cmd, check=True, capture_output=True)
            args.vlm, args.llm = root / "vlm", root / "llm"
        entries = read_checkpoint(Path(args.vlm))
        largest = max(entries.values(), key=lambda e: e.nbytes)
        model_bytes = sum(e.nbytes for e in entries.values())
        shards = len({e.file for e in entries.values()})
        streaming = run_child("streaming", args, root / "streaming")
        baseline = None if args.no_baseline else run_child("baseline", args, root / "baseline")

    bound = 3 * largest.nbytes
    print(f"model              {model_bytes / MiB:9.1f} MiB in {shards} shards ({len(entries)} tensors)")
    print(f"largest tensor     {largest.nbytes / MiB:9.1f} MiB  "
          f"{largest.name} {list(largest.shape)} {largest.dtype}")
    print(f"interpreter RSS    {streaming['interpreter_rss_bytes'] / MiB:9.1f} MiB  "
          "(python + torch, before merging)")
    print(f"streaming merge    {streaming['merge_rss_bytes'] / MiB:9.1f} MiB above the interpreter "
          f"(peak {streaming['peak_rss_bytes'] / MiB:.1f} MiB, {streaming['seconds']:.2f} s, "
          f"scope={args.scope} K={args.density}, {args.threads} thread(s))")
    print(f"bound              {bound / MiB:9.1f} MiB  (3 x largest tensor)  "
          f"-> {'within' if streaming['merge_rss_bytes'] < bound else 'ABOVE'} "
          f"({streaming['merge_rss_bytes'] / largest.nbytes:.2f} x largest tensor)")
    if baseline:
        print(f"in-memory merge    {baseline['merge_rss_bytes'] / MiB:9.1f} MiB above the interpreter "
              f"({baseline['seconds']:.2f} s, K=1)  -> streaming uses "
              f"{baseline['merge_rss_bytes'] / max(streaming['merge_rss_bytes'], 1):.1f}x less memory, "
              f"{streaming['seconds'] / baseline['seconds']:.2f}x the time")
    if args.json:
        print(json.dumps({"model_bytes": model_bytes, "shards": shards,
                          "largest_tensor_bytes": largest.nbytes,
                          "largest_tensor": largest.name, **streaming, "bound_bytes": bound,
                          "baseline": baseline, "within_bound": streaming["merge_rss_bytes"] < bound,
                          "merge_over_largest": round(streaming["merge_rss_bytes"] / largest.nbytes, 3)}))


if __name__ == "__main__":
    main()
