"""The recording core: the hot path that runs inside the user's training step.

``watch(model)`` returns a ``Recorder``, which wires the parts (docs/design.md, "Recording
core"): the step clock, the probe hooks, the sink they write through, the statistics buffer,
the GPU batcher and its kernels, and the parameter norms. Nothing here imports the analysis,
the reports or the lab.
"""

from gradscope.recording.attribution import Attribution
from gradscope.recording.entry import watch
from gradscope.recording.recorder import Recorder

__all__ = ["Attribution", "Recorder", "watch"]
