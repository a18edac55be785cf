"""The merge over ranks (``rank_merge.merge_ranks``, ``merge_counts``) on numbers made here: every
rank's accumulators merged equal the statistics of all the data at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradscope.recording.moments import activation_moments
from gradscope.recording.processes import user_name
from gradscope.store.rank_merge import merge_counts, merge_ranks
from gradscope.store.schema import (
    ACT_MEAN,
    BLOCK,
    COUNTS,
    GRAD_OUT_SS,
    LAYER,
    PHASES,
    STEP,
    TRAIN,
    HostCounts,
)


def _rank(y: torch.Tensor, grad: torch.Tensor, garbage: float = 0.0) -> tuple[np.ndarray, HostCounts]:
    """One rank's layer buffer for one slot and one layer (a ReLU-like row), with ``garbage`` in
    the cells it did not write (the eval phase)."""
    buf = np.full((1, len(PHASES), 1, LAYER.width), garbage)
    parts = activation_moments(y, None, True)
    buf[0, TRAIN, 0, ACT_MEAN:ACT_MEAN + len(parts)] = [float(p) for p in parts]
    buf[0, TRAIN, 0, GRAD_OUT_SS] = float(grad.square().sum())
    counts = HostCounts(1, 1)
    counts.act_n[0, TRAIN, 0] = y.numel()
    counts.act_calls[0, TRAIN, 0] = 1
    counts.grad_n[0, 0] = grad.numel()
    return buf, counts


@pytest.mark.parametrize("sizes", [(300, 300), (100, 700, 2)])
def test_activation_moments_merge_as_one_process(sizes):
    """Uneven shares with far-apart means: Chan's update keeps the variance exact (to the
    float32 precision each rank's moments are measured in)."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.relu(torch.randn(n, generator=g, dtype=torch.float64) * (i + 1) + 1e3 * i)
             for i, n in enumerate(sizes)]
    grads = [torch.randn(n, generator=g, dtype=torch.float64) for n in sizes]
    ranks = [_rank(y, gr, garbage=np.nan if i else 7.0) for i, (y, gr) in enumerate(zip(parts, grads))]
    merged = merge_ranks(LAYER, [b for b, _ in ranks], [c for _, c in ranks])[0, TRAIN, 0]
    whole = torch.cat(parts)
    assert merged[LAYER.index["act_mean"]] == pytest.approx(float(whole.mean()), rel=1e-6)
    assert merged[LAYER.index["act_var"]] == pytest.approx(float(whole.var(correction=0)), rel=1e-5)
    assert merged[LAYER.index["act_absmax"]] == pytest.approx(float(whole.abs().max()), rel=1e-7)
    assert merged[LAYER.index["act_nonzero"]] == float((whole != 0).sum())
    world = len(sizes)  # each rank's dL/dy is of its own loss: the merged one of the ranks' mean loss
    assert merged[GRAD_OUT_SS] == pytest.approx(sum(float(gr.square().sum()) for gr in grads) / world ** 2)
    counts = merge_counts([c for _, c in ranks])
    assert counts.act_n[0, TRAIN, 0] == sum(sizes) and counts.act_calls[0, TRAIN, 0] == 1


def test_cells_a_rank_did_not_write_take_no_part():
    a, b = np.full((1, 2, BLOCK.width), 5.0), np.full((1, 2, BLOCK.width), np.inf)
    ca, cb = HostCounts(1, 0, 2), HostCounts(1, 0, 2)
    for name in ("block_calls", "block_samples", "block_grad_in", "block_grad_out", "block_branch", "block_tokens"):
        getattr(ca, name)[0] = [1, 0]
        getattr(cb, name)[0] = [0, 0]  # rank 1 wrote nothing: its inf is never read
    merged = merge_ranks(BLOCK, [a, b], [ca, cb])
    assert np.isfinite(merged[0, 0]).all()


def test_scalars_mean_over_the_ranks_that_wrote_them():
    bufs = [np.zeros((1, STEP.width)) for _ in range(3)]
    counts = [HostCounts(1, 0) for _ in range(3)]
    loss, eval_loss = STEP.index["loss"], STEP.index["eval_loss"]
    for r in range(3):
        bufs[r][0, loss] = r + 1.0
        counts[r].step_set[0, loss] = True
    bufs[0][0, eval_loss] = 0.25  # rank 0's evaluation only
    counts[0].step_set[0, eval_loss] = True
    merged = merge_ranks(STEP, bufs, counts)
    assert merged[0, loss] == pytest.approx(2.0) and merged[0, eval_loss] == 0.25
    assert merge_counts(counts).step_set[0, eval_loss]


def test_every_count_has_a_merge_over_ranks():
    for count in COUNTS:
        assert count.over_ranks is None or count.dtype == "int64"


@pytest.mark.parametrize("name, user", [
    ("_fsdp_wrapped_module.layers.0._fsdp_wrapped_module.attn", "layers.0.attn"),
    ("_orig_mod.encoder._checkpoint_wrapped_module.mlp", "encoder.mlp"),
    ("_fsdp_wrapped_module", ""),
    ("my_module.fc", "my_module.fc"),  # a user's own names are never touched
    ("module.fc", "module.fc"),  # DDP's prefix never appears: the model inside DDP is watched
])
def test_user_names(name, user):
    assert user_name(name) == user
