#!/usr/bin/env bash
# One unattended GPU check, at most 8 minutes on one H100/H200 (the sum of the stage limits below is 470 s):
#   1. the environment (tools/gpu_report.py --env)
#   2. the `gpu` pytest tests (varlen attention against the per-document SDPA loop, bf16, tiny LLaVA and Mllama)
#   3. tools/bench_train.py --model 3b: Llama-3.2-3B-shaped LLaVA, seq 4096, bf16, FSDP2 on one GPU, packed rows vs
#      pad-to-longest (real tokens/s/GPU, MFU, peak memory, speed-up); again with activation checkpointing; again
#      with torch.compile per block
#   4. tools/bench_loader.py at Mllama geometry (560-px tiles, <= 4 tiles, seq 4096) against the packed 3B arm's
#      measured tokens/s/GPU
#   5. tools/gpu_report.py: DIR/gpu_check.json and DIR/gpu_check.md (printed)
# A stage that fails or runs past its limit is recorded as such and the next one runs.
#
#   tools/gpu_check.sh [--dry-run] [--out DIR] [--build BUILD] [--stages LIST]
#   DIR default: $OUT/gpu_check if $OUT is set, else out/gpu_check
# Without CUDA (or with --dry-run) it prints what it would run and exits 0.
# --build BUILD: an existing `mlan build` of recipes/tiny-llava.yaml at seq_len 4096 for the bench stages (default:
# built into DIR/build); building needs Ray, which a GPU image may lack, so build it elsewhere and bring it along.
# --stages env,tests,...: run only these stages, keeping DIR's earlier results (the report always runs), so a
# check can be split over two calls on the same machine.
# The gpu tests run from the test files that carry the `gpu` marker only: collecting every file would import what
# the other tests need (Ray, lm-eval...). The loader reads $MLAN_SHARED_DATA when it is set.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DIR=${OUT:+$OUT/gpu_check}
DIR=${DIR:-out/gpu_check}
DRY=0
BUILD=
ONLY=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) DIR=$2; shift ;;
    --build) BUILD=$2; shift ;;
    --stages) ONLY=",$2,"; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device: dry run"
  DRY=1
fi

if [ -n "$BUILD" ]; then
  BENCH=(tools/bench_train.py --model 3b --seq-len 4096 --shards "$BUILD" --warmup 2)
else
  BENCH=(tools/bench_train.py --model 3b --seq-len 4096 --build-tokens 60000 --build-dir "$DIR/build" --warmup 2)
fi
GPU_TESTS=$(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort | paste -sd ' ')
LOADER_DATA=${MLAN_SHARED_DATA:+ --data $MLAN_SHARED_DATA}
PACKED_TOK_S='$(python: packed tokens/s of bench-plain.json)'
STAGE_NAMES=(env tests bench-plain bench-ac bench-compile loader report)
for s in ${ONLY//,/ }; do
  [[ " ${STAGE_NAMES[*]} " == *" $s "* ]] || { echo "gpu_check.sh: unknown stage $s (${STAGE_NAMES[*]})" >&2; exit 2; }
done
declare -A LIMIT=([env]=30 [tests]=60 [bench-plain]=150 [bench-ac]=75 [bench-compile]=105 [loader]=50 [report]=0)

wanted() {  # is this stage to run (--stages, or all)
  [ -z "$ONLY" ] || [ "$1" = report ] || [[ "$ONLY" == *",$1,"* ]]
}

command_of() {  # the command line of a stage
  case "$1" in
    env) echo "$PY tools/gpu_report.py --env $DIR" ;;
    tests) echo "$PY -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS" ;;
    bench-plain) echo "$PY ${BENCH[*]} --batches 8 --json $DIR/bench-plain.json" ;;
    bench-ac) echo "$PY ${BENCH[*]} --batches 8 --activation-checkpointing --json $DIR/bench-ac.json" ;;
    bench-compile) echo "$PY ${BENCH[*]} --compile --batches 6 --json $DIR/bench-compile.json" ;;
    loader) echo "$PY tools/bench_loader.py --rows 40 --workers 1,2$LOADER_DATA --demand $PACKED_TOK_S --json $DIR/loader.json" ;;
    report) echo "$PY tools/gpu_report.py $DIR" ;;
  esac
}

if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh (dry run): would write $DIR/gpu_check.json and $DIR/gpu_check.md; stages (limit in seconds):"
  total=0
  for s in "${STAGE_NAMES[@]}"; do
    wanted "$s" || continue
    printf '  %-14s %4ss  %s\n' "$s" "${LIMIT[$s]}" "$(command_of "$s")"
    total=$((total + LIMIT[$s]))
  done
  echo "  total limit: ${total}s (<= 480)"
  exit 0
fi

mkdir -p "$DIR"
[ -n "$ONLY" ] && touch "$DIR/stages.tsv" || : > "$DIR/stages.tsv"
run_stage() {  # name: run it under its limit, log to DIR/name.log, record exit status and seconds
  local name=$1 cmd start rc
  cmd=$(command_of "$name")
  echo "=== $name (limit ${LIMIT[$name]}s): $cmd"
  start=$SECONDS
  if [ "${LIMIT[$name]}" -gt 0 ]; then
    timeout --kill-after=10 "${LIMIT[$name]}" bash -c "$cmd" 2>&1 | tee "$DIR/$name.log"
  else
    bash -c "$cmd" 2>&1 | tee "$DIR/$name.log"
  fi
  rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$DIR/stages.tsv"
  echo "=== $name: exit $rc"
}

for s in env tests bench-plain bench-ac bench-compile; do wanted "$s" && run_stage "$s"; done
PACKED_TOK_S=$("$PY" -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["packed"]["tokens_per_s"]))' \
  "$DIR/bench-plain.json" 2>/dev/null || echo 8240)  # no 3B figure: bench_loader's H100 8B baseline
wanted loader && run_stage loader
"$PY" tools/gpu_report.py "$DIR"
