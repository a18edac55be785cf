"""Helpers for testing code that uses gradscope: tiny deterministic models, hook checks and
seeded training loops.

Shipped with the package (as Captum's and torchmetrics' test utilities inspire) so users can
assert, in their own suites, that gradscope leaves nothing behind on their models, and so
gradscope's own tests train every model with one loop.
"""

from gradscope.testing.health import assert_healthy
from gradscope.testing.hooks import assert_no_hooks, hook_counts
from gradscope.testing.models import Residual, TinyCNN, TinyMLP, TwiceCalled
from gradscope.testing.training import (
    assert_same_parameters,
    batches,
    forward,
    loss_of,
    reference_batches,
    small_overrides,
    train,
    train_reference,
    train_step,
)

__all__ = ["Residual", "TinyCNN", "TinyMLP", "TwiceCalled", "assert_healthy", "assert_no_hooks",
           "assert_same_parameters", "batches", "forward", "hook_counts", "loss_of", "reference_batches",
           "small_overrides", "train", "train_reference", "train_step"]
