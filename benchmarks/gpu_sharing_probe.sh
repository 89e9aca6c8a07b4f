#!/usr/bin/env bash
# Does NVIDIA MPS raise the throughput of several small-kernel training processes sharing one GPU (as
# recipes/smollm2.py's grid runs 5-8 of them)? Each process runs a decode-like loop: 30 layers of a
# [64 x 576] @ [576 x 1536] @ [1536 x 576] product, one small kernel after another, for SECONDS. The probe
# prints the processes' summed layer-steps per second, first time-sliced (the default), then under MPS,
# and stops the MPS daemon again. It writes the ratio MPS / time-sliced to $VERDICT (0 when a process failed
# under MPS or MPS did not start), which recipes/smollm2_device.sh's MPS=auto reads.
# Usage on the lent GPU machine: bash benchmarks/gpu_sharing_probe.sh [P] [SECONDS]
set -uo pipefail
P=${1:-8}
SECONDS_EACH=${2:-8}
VERDICT=${VERDICT:-/tmp/mps_speedup}
echo 0 > "$VERDICT"
worker='
import sys, time, torch
seconds = float(sys.argv[1])
x = torch.randn(64, 576, device="cuda")
a, b = torch.randn(576, 1536, device="cuda") / 24, torch.randn(1536, 576, device="cuda") / 40
torch.cuda.synchronize()
for _ in range(50):
    x = torch.tanh((x @ a) @ b)
torch.cuda.synchronize()
start, n = time.time(), 0
while time.time() - start < seconds:
    for _ in range(30):
        x = torch.tanh((x @ a) @ b)
    torch.cuda.synchronize()
    n += 30
print(n / (time.time() - start))
'
measure() {
    local label=$1 files=()
    for i in $(seq "$P"); do
        # a client that hangs (an MPS server that never answers) is stopped and counts as failed
        timeout $((SECONDS_EACH + 90)) python3 -c "$worker" "$SECONDS_EACH" > "/tmp/probe-$label-$i" 2>&1 &
        files+=("/tmp/probe-$label-$i")
    done
    wait
    python3 - "$label" "${files[@]}" <<'PY'
import sys
rates = []
for f in sys.argv[2:]:
    text = open(f).read().strip().splitlines()
    try:
        rates.append(float(text[-1]))
    except (ValueError, IndexError):
        print(f"{sys.argv[1]}: a process failed: {text[-3:]}")
print(f"{sys.argv[1]}: {len(rates)} processes, {sum(rates):,.0f} layer-steps/s in all, each {min(rates or [0]):,.0f}-{max(rates or [0]):,.0f}")
# the summed rate, or 0 when any process failed: the verdict counts a failure as "MPS does not serve"
with open(f"/tmp/probe-{sys.argv[1]}.sum", "w") as out:
    out.write(str(sum(rates) if len(rates) == len(sys.argv) - 2 else 0))
PY
}
nvidia-smi --query-gpu=name,compute_mode --format=csv,noheader

P=1 measure "alone"
measure "time-sliced"
if command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
        measure "MPS"
        echo quit | nvidia-cuda-mps-control
        python3 -c "import sys; a, b = (float(open(f).read()) for f in sys.argv[1:]); print(f'{b / a if a else 0:.2f}')" \
            /tmp/probe-time-sliced.sum /tmp/probe-MPS.sum > "$VERDICT"
        echo "MPS / time-sliced: $(cat "$VERDICT")x (written to $VERDICT)"
        tail -n 3 "$CUDA_MPS_LOG_DIRECTORY"/control.log 2>/dev/null
    else
        echo "MPS: the daemon did not start"
    fi
else
    echo "MPS: nvidia-cuda-mps-control is not on this machine"
fi
