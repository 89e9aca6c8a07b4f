#!/usr/bin/env bash
# Run part of a toy grid (recipes/grpo_toy.py, or recipes/teacher_payoff.py) on the CPU cores of a
# lent GPU machine (16 cores: 16 single-threaded runs at a time), and pack the results into $OUT.
#
#   bash recipes/device_grid.sh "hard" "0-7" [WORKERS] [grpo_toy|teacher_payoff]
#
# The machine has torch and accelerate but not TRL / datasets / transformers 5.24: they travel
# as wheels in .whl/ (see /work/.library/device/README.md), installed into /tmp/site.
set -euo pipefail
REGIMES=${1:?regimes, e.g. "hard ordinary"}
SEEDS=${2:?seeds, e.g. 0-7}
WORKERS=${3:-$(nproc)}
EXPERIMENT=${4:-grpo_toy}
OUT=${OUT:-/tmp/out}
if [ ! -d /tmp/site/trl ]; then  # once per machine: later calls to a warm machine reuse it
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 - <<'PY'
import platform, torch, transformers, trl, datasets, accelerate
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "trl", trl.__version__, "datasets", datasets.__version__, "accelerate", accelerate.__version__,
      "cpus", __import__("os").cpu_count(), platform.processor() or platform.machine())
PY
lscpu | grep -E "Model name|^CPU\(s\)" || true
status=0
# shellcheck disable=SC2086
timeout "${GRID_SECONDS:-520}" python3 "recipes/$EXPERIMENT.py" grid --regime $REGIMES --seeds "$SEEDS" --workers "$WORKERS" \
    --output_dir "/tmp/$EXPERIMENT" > "$OUT/grid.log" 2>&1 || status=$?
tail -n 25 "$OUT/grid.log"
# what finished comes back either way (a rerun in the same machine resumes where this one stopped)
tar czf "$OUT/$EXPERIMENT-$(echo "$REGIMES" | tr ' ' '-')-$SEEDS.tgz" -C /tmp "$EXPERIMENT"
exit $status
