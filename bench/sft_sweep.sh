#!/usr/bin/env bash
# Many SFT runs side by side on one accelerator, each its own `train.main` process, one
# summary line per finished run. Made for a lent GPU, where this small model leaves the
# chip mostly idle, so a dozen runs at a time cost little more than one.
#   bash bench/sft_sweep.sh RUNS_FILE OUT_DIR [PARALLEL]
# Each line of RUNS_FILE is `NAME CONFIG [--config.key=value ...]` (bench/sft_sweep_runs*.txt
# are the sweeps of sessions 8 and 12); lines starting with # are skipped. Every run evaluates greedily on
# a 1000-problem test split; OUT_DIR/sweep.jsonl gets one JSON object per run with its
# exit code, seconds and per-task accuracy, and OUT_DIR/NAME.log its log.
# Needs the package installed (pip install -e .).
set -uo pipefail
runs=${1:?usage: bash bench/sft_sweep.sh RUNS_FILE OUT_DIR [PARALLEL]}
out=${2:?usage: bash bench/sft_sweep.sh RUNS_FILE OUT_DIR [PARALLEL]}
parallel=${3:-8}
mkdir -p "$out"
# No process may take the whole device memory, and XLA's GEMM autotuning, run by a dozen
# processes at once (float32 dots at JAX_DEFAULT_MATMUL_PRECISION=highest), took 5 minutes per
# compile on an H200.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=0}

run_one() {
  local out=$1 name=$2 config=$3
  shift 3
  local start=$SECONDS
  python -m train.main --config="$config" --workdir="$out/$name" --config.progress_bar=False \
    --config.data.test_size=1000 --config.eval.batch_size=500 "$@" >"$out/$name.log" 2>&1
  local rc=$?
  python - "$out" "$name" "$rc" "$((SECONDS - start))" "$*" >>"$out/sweep.jsonl" <<'PY'
import json
import sys

out, name, rc, seconds, args = sys.argv[1:]
row = {"name": name, "rc": int(rc), "seconds": int(seconds), "args": args}
try:
    with open(f"{out}/{name}/eval.json") as f:
        result = json.load(f)
    row["accuracy"] = result["accuracy"]
    row["well_formed"] = result["well_formed"]
    row["per_task"] = {
        task: [round(v["accuracy"], 4), v["num_problems"]] for task, v in result["per_task"].items()
    }
except (OSError, KeyError, ValueError) as error:
    row["error"] = repr(error)
print(json.dumps(row), flush=True)
PY
  echo "done $name rc=$rc $((SECONDS - start))s"
}
export -f run_one

# shellcheck disable=SC2016  # $0 and $@ belong to the inner bash, which gets them from xargs
grep -v '^#' "$runs" | grep -v '^[[:space:]]*$' | xargs -P "$parallel" -L 1 bash -c 'run_one "$0" "$@"' "$out"
