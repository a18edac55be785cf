"""Helpers for testing code that uses gradscope: tiny deterministic models and hook checks.

Shipped with the package (as Captum's and torchmetrics' test utilities inspire) so users can
assert, in their own suites, that gradscope leaves nothing behind on their models.
"""

from gradscope.testing.hooks import assert_no_hooks, hook_counts
from gradscope.testing.models import TinyCNN, TinyMLP, TwiceCalled

__all__ = ["TinyCNN", "TinyMLP", "TwiceCalled", "assert_no_hooks", "hook_counts"]
