#!/usr/bin/env bash
# The GPU check of lrscope's PyTorch device path (issue #25), for a GPU machine with only this
# checkout, within 8 minutes where torch is already installed (each part has a time limit below;
# a machine that must download torch needs up to 4 minutes more).
#
#   bash tools/gpu_check.sh
#
# 1. A virtual environment outside the checkout (${TMPDIR:-/tmp}/lrscope-gpu-venv), made with
#    --system-site-packages so that a CUDA torch already on the machine is used as it is; where
#    there is none, pip installs torch from PyPI (its Linux wheel is a CUDA build and brings
#    triton).  Then what the tests need: numpy, rich, pytest, hypothesis.  lrscope itself is
#    imported from src/ (PYTHONPATH), not installed.
# 2. tests/test_torch_gpu.py (synchronisations per step) and tests/test_torch_triton.py (the
#    Triton kernel against the eager path, compiled for the GPU: TRITON_INTERPRET unset).
# 3. benchmarks/overhead.py --device cuda at 49.8M and 1.0B parameters (--scale 1 and 4.5).
#
# Each part's output goes to the terminal and to a log in $OUT (where set) or ./gpu-check/.
# The exit status is that of the first part that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-gpu-check}
mkdir -p "$logs"
venv=${TMPDIR:-/tmp}/lrscope-gpu-venv
status=0

part() {  # part NAME SECONDS COMMAND...: run with a time limit, logged; remember a failure
    local name=$1 seconds=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S), limit ${seconds}s)"
    timeout "$seconds" "$@" 2>&1 | tee "$logs/$name.txt"
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code"
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
}

[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
py=$venv/bin/python
if ! "$py" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    part install-torch 240 "$py" -m pip install --quiet torch
fi
part install 60 "$py" -m pip install --quiet numpy rich pytest hypothesis
part versions 60 "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

export PYTHONPATH=$PWD/src:$PWD
unset TRITON_INTERPRET LRSCOPE_FUSED
part tests 150 "$py" -m pytest tests/test_torch_gpu.py tests/test_torch_triton.py -q -p no:cacheprovider -o addopts=""
part overhead-50M 120 "$py" benchmarks/overhead.py --device cuda --scale 1
part overhead-1B 180 "$py" benchmarks/overhead.py --device cuda --scale 4.5
exit "$status"
