"""Warnings that point at the user's line.

gradscope warns from inside hooks (module, tensor and optimizer hooks) and from methods wrapped in
``torch.compiler.disable``, so the number of frames between the warning and the user's code
depends on the path it came by; a fixed ``stacklevel`` pointed at torch's own files (the
``eval_frame.py`` of the disable wrapper). ``warn_user`` walks out of gradscope and torch first.
(Python 3.12's ``skip_file_prefixes`` does the same; gradscope supports 3.10.)
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

_GRADSCOPE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNAL = (_GRADSCOPE + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside gradscope and torch."""
    frame = sys._getframe(1)
    level = 2  # the caller of warn_user
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
