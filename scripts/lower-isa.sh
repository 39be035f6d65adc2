#!/usr/bin/env bash
# Run a command with torch, oneDNN, MKL and numba held to an instruction set below this CPU's own:
# AVX2 on an AVX-512 machine, no vector extensions (ATen's "default") on an AVX2 one. Float32 sums
# then run in another order, as on another machine; CI runs the numerics-sensitive tests this way
# a second time (`make test-lower-isa`).
#   scripts/lower-isa.sh PYTHON CMD [ARGS…]   PYTHON is the interpreter whose torch is asked
set -euo pipefail
python=$1
shift
cap=$("$python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
case "$cap" in
  AVX512*) export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 NUMBA_CPU_NAME=haswell ;;
  *) export ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 NUMBA_CPU_NAME=generic ;;
esac
# torch.compile's (inductor's) on-disk cache is not keyed by the ISA: kernels a run at the CPU's own
# ISA left there fail to build under ATen's "default" (vLLM's sampler: at::vec undeclared)
export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/torchinductor-${USER:-$(id -u)}-$ATEN_CPU_CAPABILITY"
lowered=$("$python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
echo "lower-isa: this CPU's torch kernels are $cap; running with $lowered" \
  "(ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA=$ONEDNN_MAX_CPU_ISA" \
  "MKL_ENABLE_INSTRUCTIONS=$MKL_ENABLE_INSTRUCTIONS NUMBA_CPU_NAME=$NUMBA_CPU_NAME" \
  "TORCHINDUCTOR_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR)" >&2
exec "$@"
