"""gradscope: see how gradients flow through a PyTorch model while it trains.

``gradscope.watch(model)`` records per-layer activation and gradient statistics on the model's
device; ``gradscope.load_run(path)`` reads a recorded run back as pandas DataFrames.
"""

from gradscope import models
from gradscope.attribution import Attribution
from gradscope.diagnose import Finding, diagnose
from gradscope.recorder import Recorder, watch
from gradscope.store import Run, RunError, RunNotFoundError, load_run

__version__ = "0.1.0"

__all__ = ["Attribution", "Finding", "diagnose", "models", "Recorder", "Run", "RunError", "RunNotFoundError", "__version__", "load_run", "watch"]
