#!/usr/bin/env bash
# Sets up a CUDA 13.0 build toolkit on a machine with no GPU and no CUDA install, from PyPI wheels,
# so that crates with a `cuda` feature (candle, mistralrs-core, our kernels) build on a CPU-only
# machine and run on the H200 GPU machine (driver 580, CUDA 13.0). Usage, from the repository root:
#   source scripts/gpu/cuda-toolkit.sh [DIR]     # DIR defaults to $HOME/.cache/cuda13
# Run `cargo fetch` first (cudarc's source must be in cargo's registry). scripts/gpu/build.sh sources
# it; docs/gpu.md, "Building for the GPU", says what it sets up and why.
# Idempotent: a second call only exports the environment.
set -e
CU="${1:-$HOME/.cache/cuda13}"
R="$CU/root"
if [ ! -x "$R/bin/nvcc" ]; then
  python3 -m pip install -q --no-deps --target "$CU/py" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
  W="$CU/py/nvidia/cu13"
  rm -rf "$R"; mkdir -p "$R/lib64/stubs" "$R/targets/x86_64-linux"
  ln -s "$W/bin" "$R/bin"; ln -s "$W/include" "$R/include"; ln -s "$W/nvvm" "$R/nvvm"; ln -s lib64 "$R/lib"
  for f in "$W"/lib/*.so.*; do ln -s "$f" "$R/lib64/"; done
  (cd "$R/lib64" && for l in cublas cublasLt cudart curand nvrtc; do ln -s "$(ls lib$l.so.* | head -1)" "lib$l.so"; done)
  ln -s ../../include "$R/targets/x86_64-linux/include"; ln -s ../../lib64 "$R/targets/x86_64-linux/lib"
  # There is no driver here: link against a stub libcuda.so.1 that exports every driver entry point
  # cudarc declares. The real libcuda.so.1 on the GPU machine is found at run time.
  CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys 2>/dev/null | tail -1)
  if [ -z "$CUDARC_SRC" ]; then echo "cuda-toolkit.sh: fetch your crate's dependencies first (cargo fetch), cudarc source not found" >&2; return 1 2>/dev/null || exit 1; fi
  grep -ohE '^\s+(pub )?fn (cu[A-Za-z0-9_]+)\(' "$CUDARC_SRC"/*.rs | sed -E 's/^\s+(pub )?fn (cu[A-Za-z0-9_]+)\(/\2/' \
    | sort -u | sed 's/.*/int &(void){return 999;}/' > "$CU/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$R/lib64/stubs/libcuda.so" "$CU/cuda_stub.c"
  ln -sf libcuda.so "$R/lib64/stubs/libcuda.so.1"
fi
export CUDA_ROOT="$R" CUDA_PATH="$R" CUDA_HOME="$R" CUDA_TOOLKIT_ROOT_DIR="$R" PATH="$R/bin:$PATH"
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$R/lib64:$R/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
set +e
nvcc --version | tail -1
