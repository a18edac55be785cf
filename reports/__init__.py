"""HTML comparison reports over recorded runs (installed as ``gradscope.reports``).

Depends on the core, never the other way round, so ``gradscope.watch`` stays light.
"""
