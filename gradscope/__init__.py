"""gradscope: see how gradients flow through a PyTorch model while it trains.

``gradscope.watch(model)`` records per-layer activation and gradient statistics on the model's
device; ``gradscope.load_run(path)`` reads a recorded run back as pandas DataFrames;
``gradscope.diagnose(runs)`` states what the data shows. The package is in layers
(docs/design.md): ``recording`` (the hot path), ``store`` (the run format), ``analysis``,
and ``lab`` (reference models, tasks and the trainer); ``gradscope.analyses`` runs the published
analyses of why residual networks train (shattering, lesion, noise scale) on any model.
"""

from gradscope import analyses
from gradscope.analysis.findings import Finding, diagnose
from gradscope.coordinate_check import CoordCheck, coord_check
from gradscope.lab import models
from gradscope.recording import Attribution, Recorder, watch
from gradscope.recording.blocks import BlockSpec
from gradscope.store import Run, RunError, RunNotFoundError, Runs, load_run, load_runs
from gradscope.version import __version__

__all__ = ["Attribution", "BlockSpec", "CoordCheck", "Finding", "Recorder", "Run", "RunError", "RunNotFoundError",
           "Runs", "analyses", "__version__", "coord_check", "diagnose", "load_run", "load_runs", "models", "watch"]
