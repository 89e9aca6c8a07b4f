#!/usr/bin/env bash
# The SmolLM2 experiment (recipes/smollm2.py) on a lent GPU machine, whose calls carry at most 64 MiB:
# the packages and the GGUF travel in two parts (.carry/a, then .carry/b, made by recipes/smollm2_carry.sh), one
# per call while the machine is held, and the GGUF is assembled once both are there (files stay until the machine
# is given back). Then each step runs once: prepare, sft, evaluate, and the grid of the arms.
#
#   bash recipes/smollm2_device.sh                      # stash the part carried by this call
#   GRID="--arms all --seeds 0 --steps 60 --eval_every 20 --workers auto" bash recipes/smollm2_device.sh   # the pilot
#   CONFIRM_SEEDS=10-13 CONFIRM="--steps 60 --eval_every 20 --workers auto" bash recipes/smollm2_device.sh
#   PILOT_RUNS=recipes/results/smollm2_gpu_h100_2026-12-07b.tgz CONFIRM_SEEDS=11-13 CONFIRM=...   # a later machine
#   RUNS_FROM="recipes/results/a.tgz recipes/results/b.tgz" ...   # and earlier sessions' runs beside its teacher
#   ANOMALY="--arm mixed_qstar --seed 11 --learning_rate 2e-5 --detect_anomaly_at 31" ...   # a diagnosis first
#
# GRID and CONFIRM together run the pilot, then the confirmatory seeds at the rate its rule gives, in one call.
# GRID_SECONDS bounds both together, counted from this script's start: each grid gets the time left as its
# --deadline, so a run starts only where it is expected to finish by then (by the longest time its arm took on
# this work directory, or an H100's time before any ran), a free GPU share taking the next run that fits; the
# rest are left for the next call on the held machine (its teacher stays, so a seed's arms pair across calls).
# A run still going at the deadline (it took longer than expected) is stopped and counts as not run.
# MPS=auto runs the grids under NVIDIA MPS when benchmarks/gpu_sharing_probe.sh, run earlier on this machine,
# found it at least 1.2x the time-sliced throughput (its verdict in /tmp/mps_speedup); MPS=on runs them under
# it without the probe (1.86x on an H100, 2026-12-07). A run that fails short of GPU memory is run again by
# the grid with fewer beside it.
set -euo pipefail
OUT=${OUT:-/tmp/out}
WORK=/tmp/smollm2
mkdir -p /tmp/smol-parts "$WORK"
for part in .carry/*/*; do [ -f "$part" ] && cp "$part" /tmp/smol-parts/; done
ls -la /tmp/smol-parts
if [ ! -d /tmp/site/trl ] && [ -f /tmp/smol-parts/site.tar.xz ]; then
    mkdir -p /tmp/site && python3 -m tarfile -e /tmp/smol-parts/site.tar.xz /tmp/site
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
    if [ -f /tmp/smol-parts/smol.gguf.xz.0 ] && [ -f /tmp/smol-parts/smol.gguf.xz.1 ]; then
        mkdir -p /tmp/smol
        cat /tmp/smol-parts/smol.gguf.xz.0 /tmp/smol-parts/smol.gguf.xz.1 |
            python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" \
            > "$GGUF.part"
        echo "$(cat /tmp/smol-parts/sha256)  $GGUF.part" | sha256sum -c -
        mv "$GGUF.part" "$GGUF"
    else
        echo "GGUF incomplete: carry the other part in the next call"; exit 0
    fi
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# `--workers auto` in GRID or CONFIRM: as many runs as the card holds at their measured peaks (2026-12-07, GiB:
# q* distillation 34.7, TRL's distillation at most 23.7, the other three at most 17.6; 110 for all five), so 5 on
# an H200's 139 GiB and 3 on an H100's 80 (the largest three need 76); the grid still reruns one that runs short.
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 || echo 0)
workers=$(( mib >= 115000 ? 5 : mib >= 78000 ? 3 : 2 ))
GRID=${GRID:-} CONFIRM=${CONFIRM:-}
GRID=${GRID//--workers auto/--workers $workers} CONFIRM=${CONFIRM//--workers auto/--workers $workers}
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
run() { python3 recipes/smollm2.py --workdir "$WORK" "$@" 2>&1 | tee -a "$OUT/smollm2.log" | grep -v "^\[eval\]" | tail -n 30; }
[ -d "$WORK/base" ] || run prepare --gguf "$GGUF"
[ -d "$WORK/teacher" ] || run sft
[ -f "$WORK/evaluate.json" ] || run evaluate
# Earlier sessions' runs made beside this teacher (the same sha256), from their archives: a grid counts them done.
# Each call adopts again (a run already here is kept); a failure is in the log, and the grid goes on.
# shellcheck disable=SC2086
[ -n "${RUNS_FROM:-}" ] && { run adopt $RUNS_FROM || true; }
status=0
seconds_left() { echo $(( ${GRID_SECONDS:-480} - SECONDS )); }  # of GRID_SECONDS, counted from this script's start
run_grid() {
    local left
    left=$(seconds_left)
    if [ "$left" -le 30 ]; then echo "grid $*: skipped, ${left}s left of GRID_SECONDS"; status=124; return; fi
    echo "grid $* (${left}s left)"
    timeout "$left" python3 recipes/smollm2.py --workdir "$WORK" grid --deadline $(( left - 5 )) "$@" \
        >> "$OUT/smollm2.log" 2>&1 || status=$?
    tail -n 20 "$OUT/smollm2.log"
}
if [ "${MPS:-}" = on ] || { [ "${MPS:-}" = auto ] &&
    python3 -c "import sys; sys.exit(float(open('/tmp/mps_speedup').read()) < 1.2)" 2>/dev/null; }; then
    echo "MPS=$MPS (the probe measured $(cat /tmp/mps_speedup 2>/dev/null || echo nothing here) x the time-sliced rate): the grids run under it"
    mkdir -p /tmp/nvidia-mps /tmp/nvidia-mps-log
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-mps-log
    nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
# A diagnosis before the grids, e.g. ANOMALY="--arm mixed_qstar --seed 11 --learning_rate 2e-5 --detect_anomaly_at 31":
# that run up to its diverging step, that step under anomaly detection; its traceback is in $OUT/anomaly.log.
if [ -n "${ANOMALY:-}" ]; then
    # shellcheck disable=SC2086
    timeout "$(seconds_left)" python3 recipes/smollm2.py --workdir "$WORK" run $ANOMALY \
        > "$OUT/anomaly.log" 2>&1 || echo "the diagnosis ended with status $?"
    { grep -v "^\[eval\]" "$OUT/anomaly.log" || true; } | tail -n 40
fi
# shellcheck disable=SC2086
[ -n "${GRID:-}" ] && run_grid $GRID
if [ -n "${CONFIRM:-}" ]; then
    # The confirmatory seeds, at the learning rate the pilot's pre-registered rule gives (`pilot_lr`). The pilot
    # runs once: a later machine reads the recorded one (PILOT_RUNS, an archive of recipes/results/) instead.
    if [ -n "${PILOT_RUNS:-}" ] && ! ls "$WORK"/runs/*-seed0.json >/dev/null 2>&1; then
        tar xzf "$PILOT_RUNS" -C "$WORK" --wildcards './runs/*-seed0.json'
        echo "the pilot's runs from $PILOT_RUNS: $(ls "$WORK"/runs/*-seed0.json | xargs -n 1 basename | tr '\n' ' ')"
    fi
    if lr=$(python3 recipes/smollm2.py --workdir "$WORK" pilot_lr 2> >(tee -a "$OUT/smollm2.log" >&2)); then
        # shellcheck disable=SC2086
        run_grid --arms all --learning_rate "$lr" --seeds "${CONFIRM_SEEDS:?}" $CONFIRM
    else
        status=1
    fi
fi
if [ -n "${GRID:-}${CONFIRM:-}" ]; then
    # the failed runs' log tails (`|| true`: under pipefail, no failed run would end the script here)
    { grep -l "Error" "$WORK"/logs/*.log 2>/dev/null || true; } | while read -r log; do echo "== $log"; tail -n 4 "$log"; done
    python3 recipes/smollm2.py --workdir "$WORK" analyze | tee "$OUT/smollm2-table.md" || true
fi
cp "$WORK"/*.json "$OUT/" 2>/dev/null || true
tar czf "$OUT/smollm2-runs.tgz" -C "$WORK" --exclude='base' --exclude='teacher' --exclude='*-trainer' . || true
exit $status
