"""Adapters for the trainers people already use, each a few dozen lines over ``watch()``.

``gradscope.integrations.lightning.GradScope`` (a Lightning ``Callback``),
``gradscope.integrations.hf.GradScopeCallback`` (a Hugging Face ``TrainerCallback``) and
``gradscope.integrations.tensorboard`` (export of recorded runs as TensorBoard scalars). Nothing
here is imported by ``import gradscope``: each module imports its framework, an optional extra.
"""
