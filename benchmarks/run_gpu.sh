#!/usr/bin/env bash
# Issue #9's GPU checks in one command, for a machine with torch and CUDA (run from the repository root):
#   1. the kernel tests on the GPU (`TIMO_TEST_DEVICE=cuda`): fast vs reference parity in float32, gradients,
#      autocast, compile, and the official golden outputs when TIMO_GOLDEN_DIR names a folder holding them;
#   2. the benchmark suite in bfloat16 (MHSA on SDPA's flash kernel, compiled blocks, the fine-tuning step in both
#      precisions), all cases in one process, its raw results rewritten after every case.
#
#   benchmarks/run_gpu.sh OUTDIR [SECONDS]
#
# Writes OUTDIR/pytest-cuda.log, OUTDIR/cuda.json and OUTDIR/RESULTS-cuda.md. SECONDS bounds the suite (default: no
# bound); a run cut short is continued by running this again with OUTDIR/cuda.json in place (`--resume`).
set -uo pipefail
out=${1:?usage: benchmarks/run_gpu.sh OUTDIR [SECONDS]}
seconds=${2:-0}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__,
    torch.cuda.get_device_name())' || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu.csv"
if [ ! -f "$out/pytest-cuda.log" ]; then
    TIMO_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_attention_fast.py \
        >"$out/pytest-cuda.log" 2>&1
    tail -n 3 "$out/pytest-cuda.log"
fi
timeout "$seconds" python3 -m benchmarks --device cuda --dtype bfloat16 --in-process --processes 1 --idle-wait 0 \
    --resume --json "$out/cuda.json" --output "$out/RESULTS-cuda.md"
