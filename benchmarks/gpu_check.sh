#!/usr/bin/env bash
# GPU checks in one go (run from the repository root on a CUDA machine with torch installed):
# the CUDA tests (no host sync under sync debug mode, observer, accuracy), AMP training through
# the trainer, and the overhead benchmark.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_schedule.py tests/test_observer.py 2>&1 | tail -4
python3 - <<'PY'
import gradscope
from gradscope.train import train
for name, task, ov in [("resnet20", "images", {}), ("transformer_lm_pre", "dyck", {"depth": 6}),
                       ("transformer_seq2seq_post", "reverse", {"depth": 2})]:
    r = train(name, task=task, steps=60, every=5, out="/tmp/gpu", amp=True, device="cuda", overrides=ov,
              progress=False, overwrite=True)
    run = gradscope.load_run(r.run)
    print(f"{name} amp: {r.seconds:.1f}s, final loss {r.final_loss:.3f}, held-out acc {r.final_eval_accuracy:.3f}, "
          f"recorded steps {run.scalars.loss.notna().sum()}, findings {[f.code for f in gradscope.diagnose(run)]}")
PY
python3 benchmarks/overhead.py --steps 20 --rounds 3
