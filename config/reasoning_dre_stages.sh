#!/usr/bin/env bash
# config/reasoning_dre.py's curriculum in one command: data for depth 1, 1-2 and 1-4, then four stages, each starting
# from the last one's weights (docs/reasoning.md, "The staged recipe"). About 40 minutes on 2 idle CPU cores.
#   bash config/reasoning_dre_stages.sh                      # runs out-dre1 .. out-dre4, then the benchmark
#   OUT=out-inj bash config/reasoning_dre_stages.sh --dre_inject=True   # arguments go to every train.py stage
# Data goes to data/reasoning1, data/reasoning2 and data/reasoning (DATA=dir puts all three under dir instead).
# Ctrl-C or SIGTERM: the running stage saves its checkpoint and exits 0 (as train.py does), and the script stops
# there instead of starting the next stage from half-trained weights.
set -euo pipefail
n=0  # the stage running (0: the data)
trap 'echo "error: stopped at stage $n of 4 (0: the data); the stages after it did not run" >&2; exit 130' INT TERM
cd "$(dirname "$0")/.."
OUT=${OUT:-out-dre} DATA=${DATA:-data} PY=${PYTHON:-python}
$PY data/reasoning/prepare.py --train_max=1 --test_max=2 --out_dir="$DATA/reasoning1"
$PY data/reasoning/prepare.py --train_max=2 --test_max=4 --out_dir="$DATA/reasoning2"
$PY data/reasoning/prepare.py --out_dir="$DATA/reasoning"  # depths 1-4, tests 1-8
stage() {  # stage N DATASET ITERS [settings]: one run, from stage N-1's weights after the first
  n=$1; local data=$2 iters=$3; shift 3
  local from=(); [ "$n" -gt 1 ] && from=(--init_from="$OUT$((n - 1))" --warmup_iters=20)
  $PY train.py config/reasoning_dre.py --dataset="$(realpath "$DATA/$data")" --out_dir="$OUT$n" \
    --max_iters="$iters" --lr_decay_iters="$iters" "${from[@]}" "$@" "${EXTRA[@]}"
}
EXTRA=("$@")
stage 1 reasoning1 500 --dre_mean_steps=3 --max_reasoning_steps=6
stage 2 reasoning2 1000 --dre_mean_steps=3 --max_reasoning_steps=6
stage 3 reasoning 1000 --learning_rate=3e-3 --min_lr=1e-4
stage 4 reasoning 1500 --learning_rate=2e-3 --min_lr=1e-4
if [ "${BENCH:-1}" = 1 ]; then $PY bench.py reasoning --out_dir="${OUT}4"; fi  # BENCH=0: train only
