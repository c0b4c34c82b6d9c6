#!/bin/bash
# A kernel microbenchmark for issue 6 (results: docs/results/archive/gemv_bench_wide_loads.csv, docs/gpu.md).
# mistralrs-quant 0.8.1's batched GEMV (used for 1-8 rows; 2 rows cost 1.51x of 1 there in an Nsight
# Compute census of a decode step, scripts/gpu/ncu-launches.sh) against gemv_wide.cuh, the same sums over 16-byte loads (each thread owns 4 or 8
# of upstream's 256 threads, and the reductions replay upstream's butterfly), so results must be
# bit-identical: the bench checks that for every shape and row count before timing.
#
# Here:  cp .upstream/mistralrs-quant-0.8.1/kernels/gemv/gemv.cu gpu-chk/gemv/upstream_gemv.cu
#        cp scripts/gpu/gemv-bench/{bench.cu,gemv_wide.cuh,run.sh} gpu-chk/gemv/
# There: run with carry ["gpu-chk/gemv"]:  bash gpu-chk/gemv/run.sh   (CSV in $OUT/gemv.csv)
set -x
cd "$(dirname "$0")"
export PATH=/usr/local/cuda/bin:$PATH
nvcc -O3 -std=c++17 -arch=sm_90 -o bench bench.cu 2>&1 | tail -5
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
./bench | tee "$OUT/gemv.csv"
