#!/usr/bin/env bash
# The prepared GPU check (one H100): sanity tests on the CPU, then the CUDA benchmark with ViT-H.
#
# Run from the repository root of the copy on the GPU machine, with .whl carried along: the
# packages its image lacks (nnunetv2, segment_anything, SimpleITK, ...), packed by
# scripts/gpu_check/pack_gpu_site.sh, are unpacked into /tmp/site.
# Results go to $OUT (default benchmark_results/): benchmark_cuda.json, benchmark_cuda.txt (the
# table), benchmark_cuda.log (progress and any traceback), grid_memory_cuda.json/.txt. Expected
# 3-5 minutes after the install; the tests (with the CUDA torch.compile check) are capped at 120 s,
# the benchmark at 300 s (it writes its JSON after every row), the grid-memory benchmark at 120 s.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmark_results}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

if [ -f .whl/site-py312.tar.xz ]; then
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .whl/site-py312.tar.xz || exit
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', torch.cuda.is_available())"

echo "== sanity tests (CPU) and torch.compile with inductor (CUDA)"
start=$SECONDS
timeout 120 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_desam_network.py tests/test_fast_attention.py \
    'tests/test_ddp_and_compile.py::test_inductor_compiles_training_and_inference_like_nnunet[cuda]'
tests_status=$?
echo "tests: exit $tests_status in $((SECONDS - start)) s"

echo "== benchmark (cuda, vit_h)"
start=$SECONDS
timeout 300 "$PYTHON" scripts/benchmark.py --device cuda --model vit_h --output "$OUT/benchmark_cuda.json" \
    2> "$OUT/benchmark_cuda.log" | tee "$OUT/benchmark_cuda.txt"
benchmark_status=${PIPESTATUS[0]}
echo "benchmark: exit $benchmark_status in $((SECONDS - start)) s"
if [ "$benchmark_status" -ne 0 ]; then
    echo "== last lines of $OUT/benchmark_cuda.log"
    tail -n 40 "$OUT/benchmark_cuda.log"
fi

echo "== grid-prompt memory by chunk size (cuda, vit_h)"
start=$SECONDS
timeout 120 "$PYTHON" scripts/benchmark_grid_memory.py --device cuda --model vit_h --settings 9:81 9:27 16:27 \
    --output "$OUT/grid_memory_cuda.json" 2>&1 | tee "$OUT/grid_memory_cuda.txt"
memory_status=${PIPESTATUS[0]}
echo "grid memory: exit $memory_status in $((SECONDS - start)) s"

[ "$tests_status" -eq 0 ] && [ "$benchmark_status" -eq 0 ] && [ "$memory_status" -eq 0 ]
