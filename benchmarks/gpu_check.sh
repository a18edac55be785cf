#!/usr/bin/env bash
# GPU checks in one go (run from the repository root on a CUDA machine with torch installed):
# the CUDA tests (no host sync under sync debug mode, observer, accuracy, attribution, compiled
# models), then the overhead benchmark's CUDA workloads eager and under
# torch.compile(mode="reduce-overhead") (CUDA graphs). A folder .gpu_deps/ (e.g. a copied captum)
# joins the path. COMPILE=0 skips the compiled timings (Inductor compiles take minutes).
set -u
export PYTHONPATH=$PWD:$PWD/.gpu_deps PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py tests/test_batching.py tests/test_schedule.py tests/test_observer.py tests/test_compiled.py -rfs --tb=short 2>&1 | tail -40
python3 benchmarks/overhead.py --device cuda --steps "${STEPS:-50}" "$@"
if [ "${COMPILE:-1}" != 0 ]; then
  python3 benchmarks/overhead.py --device cuda --steps "${STEPS:-50}" --compile reduce-overhead "$@"
fi
