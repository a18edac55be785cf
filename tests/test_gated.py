"""The gated ops (``recording.gated``): the traced statistics of ``every > 1`` on the CPU.

They take the tensor Inductor gives them as it is laid out (its CPU conv outputs are
channels-last) and must stage what the traced formulas stage, or nothing when the gate is closed.
"""

from __future__ import annotations

import pytest
import torch

from gradscope.recording import deposits, gated
from gradscope.recording import traced_statistics as formulas
from gradscope.recording.traced import Staging
from gradscope.store.schema import B_BRANCH_SS, TRAIN

pytestmark = pytest.mark.skipif(not gated.AVAILABLE, reason="the gated ops need torch >= 2.5")


def _layouts(shape):
    """The same values contiguous, channels-last, and as a transposed (non-dense) view."""
    torch.manual_seed(0)
    t = torch.randn(shape) * 3 + 100  # a mean far from 0: the shift matters
    t[0, 0] = 0  # some exact zeros to count
    return {"contiguous": t, "channels_last": t.to(memory_format=torch.channels_last),
            "transposed": t.transpose(2, 3).contiguous().transpose(2, 3)}


def _measure(staging, x, y, gated_ops):
    """Every statistic a traced probe stages, of ``x`` (a layer's output, a block's input, a branch's
    output and a gradient) and ``y`` (the block's output), through the ops or the formulas."""
    tokens = y.flatten(2)  # [4, 3, 30]
    if gated_ops:
        gated.layer_output(staging, TRAIN, 0, x, True, (0.0, 100.0))
        gated.block_output(staging, 0, x, y, True, False)
        gated.block_output(staging, 1, tokens, tokens, False, True)
        gated.branch_output(staging, 0, x)
        gated.gradient(staging, deposits.LAYER_GRAD_OUT, 0, x)
    else:
        staging.merge_layer(TRAIN, 0, formulas.layer_statistics(x, True, (0.0, 100.0)), x.numel())
        staging.add_block(0, formulas.identity_sums(x, y), None, x.shape[0], 0)
        staging.add_block(1, None, formulas.token_cosine_sum(tokens), 0, tokens.shape[0])
        staging.add_branch(0, formulas.branch_squares(x))
        deposits.add(staging, deposits.LAYER_GRAD_OUT, 0, formulas.branch_squares(x), x.numel())


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_gated_ops_stage_what_the_formulas_stage_in_any_layout(layout):
    x = _layouts((4, 3, 5, 6))[layout]
    y = (x * 0.5 + 1).contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)
    ops, formula = (Staging(1, 2, torch.device("cpu"), every) for every in (10, 1))
    for _ in range(2):  # a second call merges with the first
        _measure(ops, x, y, gated_ops=True)
        _measure(formula, x.contiguous(), y.contiguous(), gated_ops=False)
    torch.testing.assert_close(ops.layer, formula.layer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ops.block, formula.block, rtol=1e-5, atol=1e-6)
    assert torch.equal(ops.counts, formula.counts)
    assert ops.layer.count_nonzero() == 6 and ops.block.count_nonzero() == 5  # all that was measured


def test_gated_ops_stage_nothing_when_the_gate_is_closed_or_the_recorder_gone():
    x = _layouts((2, 3, 4, 4))["channels_last"]
    closed, released = (Staging(1, 2, torch.device("cpu"), 10) for _ in range(2))
    closed.gate.open = False
    deposits.release(released.key)
    for staging in (closed, released):
        _measure(staging, x, x * 2, gated_ops=True)
        assert not (staging.layer.any() or staging.block.any() or staging.counts.any())


def test_without_a_gate_or_off_the_cpu_the_formulas_are_traced():
    """every=1 (no gate) traces the formulas, which Inductor fuses into the graph; so does a tensor
    off the CPU (a model moved after watch()), since the ops have a CPU kernel only."""
    assert gated.applies(Staging(1, 0, torch.device("cpu"), 10), torch.ones(2))
    assert not gated.applies(Staging(1, 0, torch.device("cpu"), 1), torch.ones(2))
    assert not gated.applies(Staging(1, 0, torch.device("cpu"), 10), torch.ones(2, device="meta"))


def test_the_gate_is_read_when_a_compiled_graph_runs_not_when_it_is_traced():
    """The graph holds the staging's key, a constant: closing and opening the gate between calls
    changes what the op stages without a recompile."""
    staging, x = Staging(0, 1, torch.device("cpu"), 10), torch.arange(4.0)
    f = torch.compile(lambda t: gated.branch_output(staging, 0, t), backend="aot_eager", fullgraph=True)
    f(x)
    assert staging.block[0, B_BRANCH_SS].item() == pytest.approx(14, rel=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        staging.gate.open = False
        f(x)
        assert staging.block[0, B_BRANCH_SS].item() == pytest.approx(14, rel=1e-6)
        staging.gate.open = True
        f(x)
        assert staging.block[0, B_BRANCH_SS].item() == pytest.approx(28, rel=1e-6)
    assert staging.block_branch[0].item() == 2


def test_a_deposit_on_a_step_the_gate_skips_adds_nothing():
    """``deposits``: a compiled backward's ||dL/dy||^2 lands in the staging only while the gate is
    open (every=1, a ungated staging, takes every one)."""
    for every, closed_adds in ((10, 0.0), (1, 4.0)):
        staging = Staging(2, 0, torch.device("cpu"), every)
        if staging.gate is not None:
            staging.gate.open = False
        deposits.deposit(staging, deposits.LAYER_GRAD_OUT, 1, torch.tensor(4.0), 3)
        total, seen, calls = staging.backward_cells(deposits.LAYER_GRAD_OUT, 1)
        assert (total.item(), seen.item(), calls.item()) == (closed_adds, 3 * (closed_adds > 0), closed_adds > 0)
        if staging.gate is not None:
            staging.gate.open = True
            deposits.deposit(staging, deposits.LAYER_GRAD_OUT, 1, torch.tensor(4.0), 3)
            assert (total.item(), seen.item(), calls.item()) == (4.0, 3, 1)
