#!/usr/bin/env bash
# GPU checks (run from the repository root on a CUDA machine with torch installed), in parts:
#   tests     the CUDA tests (no host sync under sync debug mode, observer, accuracy, compiled models)
#   compiled  the overhead benchmark's CUDA workloads under torch.compile(mode="reduce-overhead")
#             (CUDA graphs): resnet56 b128, Pre-LN 12x512 bf16, GPT-2-small-sized LM, ResNet-50-sized CNN
#   eager     the same workloads eager, with the empty-hooks floor and the tools people use today
# PARTS picks and orders them (default "tests compiled eager"); ONLY narrows the workloads
# (comma-separated name fragments, e.g. ONLY=gpt2,resnet50); STEPS timed steps per variant (50).
# Inductor compiles take minutes per variant: where one call is limited (say 10 minutes), split,
# e.g. PARTS=compiled ONLY=resnet56,pre-LN, then PARTS=compiled ONLY=gpt2, then PARTS=compiled
# ONLY=resnet50. PART_TIMEOUT (seconds, default none) stops a part that runs longer. A folder
# .gpu_deps/ (e.g. a copied captum) joins the path.
# Exits non-zero if any part failed (the first failure's status).
set -u -o pipefail
export PYTHONPATH=$PWD:$PWD/.gpu_deps:$PWD/benchmarks PYTHONUNBUFFERED=1
parts=${PARTS:-tests compiled eager}
for part in $parts; do
  case "$part" in
    tests|compiled|eager) ;;
    *) echo "unknown part '$part' (tests, compiled, eager)" >&2; exit 2 ;;
  esac
done
only=()
[ -n "${ONLY:-}" ] && only=(--only "$ONLY")
limit=()
[ -n "${PART_TIMEOUT:-}" ] && limit=(timeout "$PART_TIMEOUT")
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for part in $parts; do
  echo "== $part ($(date -u +%T))"
  rc=0
  case "$part" in
    tests) "${limit[@]}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py \
             tests/test_batching.py tests/test_schedule.py tests/test_observer.py tests/test_compiled.py \
             -rfs --tb=short || rc=$? ;;
    compiled) "${limit[@]}" python3 benchmarks/overhead.py --device cuda --steps "${STEPS:-50}" \
                --compile reduce-overhead "${only[@]}" "$@" || rc=$? ;;
    eager) "${limit[@]}" python3 benchmarks/overhead.py --device cuda --steps "${STEPS:-50}" "${only[@]}" \
             --skip-load "$@" || rc=$? ;;
  esac
  if [ "$rc" != 0 ]; then
    echo "== $part failed: exit status $rc"
    [ "$status" = 0 ] && status=$rc
  fi
done
echo "== done ($(date -u +%T))"
exit "$status"
