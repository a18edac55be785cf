"""The gated ops (``recording.gated``): the traced statistics of ``every > 1`` on the CPU.

They take the tensor Inductor gives them as it is laid out (its CPU conv outputs are
channels-last) and must measure what the traced formulas measure, or nothing when the gate is off.
"""

from __future__ import annotations

import pytest
import torch

from gradscope.recording import gated
from gradscope.recording import traced_statistics as formulas

pytestmark = pytest.mark.skipif(not gated.AVAILABLE, reason="the gated ops need torch >= 2.5")

ON, OFF = gated.Gate(), gated.Gate()
OFF.open = False


def _layouts(shape):
    """The same values contiguous, channels-last, and as a transposed (non-dense) view."""
    torch.manual_seed(0)
    t = torch.randn(shape) * 3 + 100  # a mean far from 0: the shift matters
    t[0, 0] = 0  # some exact zeros to count
    return {"contiguous": t, "channels_last": t.to(memory_format=torch.channels_last),
            "transposed": t.transpose(2, 3).contiguous().transpose(2, 3)}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_gated_ops_measure_as_the_formulas_in_any_layout(layout):
    x = _layouts((4, 3, 5, 6))[layout]
    y = (x * 0.5 + 1).contiguous(memory_format=torch.channels_last if layout == "channels_last"
                                 else torch.contiguous_format)
    plain_x, plain_y = x.contiguous(), y.contiguous()
    got = torch.stack(gated.layer_statistics(ON, x, True, (0.0, 100.0)))
    want = torch.stack(formulas.layer_statistics(plain_x, True, (0.0, 100.0)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gated.identity_sums(ON, x, y), formulas.identity_sums(plain_x, plain_y),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gated.gradient_squares(ON, x), (plain_x.double() ** 2).sum().float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(gated.branch_squares(ON, x), (plain_x.double() ** 2).sum().float(), rtol=1e-5, atol=0)
    tokens = plain_x.flatten(2)  # [4, 3, 30]
    torch.testing.assert_close(gated.token_cosine_sum(ON, tokens), formulas.token_cosine_sum(tokens),
                               rtol=1e-5, atol=1e-6)


def test_gated_ops_return_zeros_when_the_gate_is_off():
    x = _layouts((2, 3, 4, 4))["channels_last"]
    assert torch.stack(gated.layer_statistics(OFF, x, False, (0.0, 1.0))).eq(0).all()
    assert len(gated.layer_statistics(OFF, x, False, (0.0, 1.0))) == 5  # the width stays
    assert gated.identity_sums(OFF, x, x).eq(0).all() and gated.identity_sums(OFF, x, x).shape == (3,)
    for value in (gated.token_cosine_sum(OFF, x[0]), gated.branch_squares(OFF, x), gated.gradient_squares(OFF, x)):
        assert value.shape == () and value.item() == 0


def test_without_a_gate_the_formulas_are_traced():
    """gate=None (every=1, CUDA): the formulas themselves, which Inductor fuses into the graph."""
    x = _layouts((2, 3, 4, 4))["contiguous"]
    torch.testing.assert_close(torch.stack(gated.layer_statistics(None, x, True, None)),
                               torch.stack(formulas.layer_statistics(x, True, None)))
    from torch.fx.experimental.proxy_tensor import make_fx

    def ops(gate):
        graph = make_fx(lambda t: gated.branch_squares(gate, t), tracing_mode="fake")(x).graph
        return {str(node.target) for node in graph.nodes if "gradscope" in str(node.target)}

    assert ops(None) == set()
    assert ops(ON) == {"gradscope.gated_squared_norm.default"}


def test_a_tensor_off_the_cpu_keeps_the_traced_formulas():
    """The ops have a CPU kernel only: a tensor elsewhere (a model moved after watch()) is measured
    by the formulas, whatever the gate says."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 3, device="meta")
    graph = make_fx(lambda t: gated.gradient_squares(ON, t), tracing_mode="fake")(x).graph
    assert not any("gradscope" in str(node.target) for node in graph.nodes)


def test_the_gate_is_read_when_a_compiled_graph_runs_not_when_it_is_traced():
    """The graph holds the gate's key, a constant: closing and opening it between calls changes
    what the op returns without a recompile; a gate whose recorder is gone reads as closed."""
    gate, x = gated.Gate(), torch.arange(4.0)
    f = torch.compile(lambda t: gated.branch_squares(gate, t) + 0, backend="aot_eager", fullgraph=True)
    assert f(x).item() == pytest.approx(14, rel=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        gate.open = False
        assert f(x).item() == 0
        gate.open = True
        assert f(x).item() == pytest.approx(14, rel=1e-6)
    dropped = gated.Gate()
    key = dropped.key
    del dropped
    assert gated.is_open(gate.key) and not gated.is_open(key)


def test_a_deposit_on_a_step_the_gate_skips_adds_nothing():
    """``deposits``: a compiled backward's ||dL/dy||^2 lands in the staging only while the gate is
    open (every=1, a ungated staging, takes every one)."""
    from gradscope.recording import deposits
    from gradscope.recording.traced import Staging

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
