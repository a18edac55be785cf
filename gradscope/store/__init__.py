"""The run format: the schema of every statistic, the writer and the reader of a run directory.

A run is ``meta.json`` plus Parquet parts per table (``layers/``, ``blocks/``, ``scalars/``,
``attribution/``); docs/design.md ("Run format") describes it. Nothing here imports torch hooks
or the recorder, so a run can be read where no model runs.
"""

from gradscope.store.meta import SCHEMA_VERSION, RunError, RunNotFoundError, read_meta
from gradscope.store.reader import (
                                    ATTRIBUTION_SCHEMA,
                                    BLOCK_SCHEMA,
                                    LAYER_SCHEMA,
                                    STEP_SCHEMA,
                                    Run,
                                    Runs,
                                    load_run,
                                    load_runs,
)
from gradscope.store.writer import RunWriter

__all__ = ["ATTRIBUTION_SCHEMA", "BLOCK_SCHEMA", "LAYER_SCHEMA", "SCHEMA_VERSION", "STEP_SCHEMA", "Run",
           "RunError", "RunNotFoundError", "Runs", "RunWriter", "load_run", "load_runs", "read_meta"]
