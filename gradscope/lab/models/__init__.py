"""Reference models and their registry (in the spirit of timm).

    >>> from gradscope.lab import models
    >>> models.names("resnet*")
    ['resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110']
    >>> net = models.create("plain56", num_classes=100)

Plain twins share block names with their residual twins, so runs compare block by block.
"""

from gradscope.lab.models import mlp, resnet, transformer  # noqa: F401  (registers the models)
from gradscope.lab.models.registry import (
    ModelEntry,
    UnknownModelError,
    create,
    entry,
    example_input,
    names,
    register_model,
)

__all__ = ["ModelEntry", "UnknownModelError", "create", "entry", "example_input", "names", "register_model"]
