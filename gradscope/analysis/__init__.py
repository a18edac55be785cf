"""What is built on recorded runs: findings in plain language (``gradscope.diagnose``)."""

from gradscope.analysis.findings import Finding, diagnose

__all__ = ["Finding", "diagnose"]
