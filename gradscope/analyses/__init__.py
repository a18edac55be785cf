"""Analyses nobody ships: why residual networks train where plain ones degrade, on any model.

- ``shattering``: how alike dL/dx is at nearby inputs (Balduzzi et al. 2017);
- ``lesion``: loss and accuracy with each block replaced by the identity (Veit et al. 2016);
- ``noise_scale``: B_simple = tr(Sigma) / |G|^2 over training (McCandlish et al. 2018), from the
  small-batch norms ``watch(noise_scale=True)`` records.

Each returns a pandas DataFrame; ``save(run, table, frame)`` stores it in a run (a Parquet table
each, read back as ``load_run(path).shattering``, ``.lesion``, ``.noise_scale``). None of them
runs, or hooks anything, unless called.
"""

from gradscope.analyses.lesion import lesion
from gradscope.analyses.noise_scale import noise_scale
from gradscope.analyses.shattering import shattering
from gradscope.analyses.storing import save

__all__ = ["lesion", "noise_scale", "save", "shattering"]
