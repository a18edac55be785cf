"""Schedule and hot-path discipline: every=N, no tensor work off-schedule, no host sync, batched norms."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gradscope
from gradscope import models
from gradscope.recording import kernels
from gradscope.testing import TinyCNN, TinyMLP, batches, reference_batches, train, train_step


class OpLog(TorchDispatchMode):
    """Counts every aten op; fails on ops that make the host wait for the device."""

    SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal"}

    def __init__(self, forbid_sync: bool = False) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.forbid_sync = forbid_sync

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if self.forbid_sync and name in self.SYNCING:
            raise AssertionError(f"host synchronisation in the hot path: {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("every", [1, 3])
def test_every_n_records_steps_0_n_2n(every, run_dir):
    torch.manual_seed(0)
    train(TinyMLP(), batches("mlp", steps=10), run=run_dir, every=every, flush_every=2)
    run = gradscope.load_run(run_dir)
    want = list(range(0, 10, every))
    assert sorted(run.layers.step.unique().tolist()) == want
    assert run.scalars.step.tolist() == want


def test_unrecorded_steps_do_no_tensor_work_in_hooks(run_dir):
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), = batches("cnn", steps=1)

    baseline = OpLog()
    with baseline:
        train_step(model, opt, x, y)

    with gradscope.watch(model, run_dir, optimizer=opt, every=2) as rec:
        train_step(model, opt, x, y, rec)  # step 0: recorded
        off = OpLog()
        with off:
            train_step(model, opt, x, y, rec)  # step 1: not recorded
        on = OpLog()
        with on:
            train_step(model, opt, x, y, rec)  # step 2: recorded
    assert off.ops == baseline.ops
    assert sum(on.ops.values()) > sum(baseline.ops.values())  # the check can see hook work


def test_module_probes_are_attached_only_for_recorded_steps(run_dir):
    from gradscope.testing import hook_counts

    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), = batches("cnn", steps=1)
    seen = []
    with gradscope.watch(model, run_dir, optimizer=opt, every=3) as rec:
        for _ in range(7):
            seen.append(sum(n for key, n in hook_counts(model).items() if not key.startswith("<root>")))
            train_step(model, opt, x, y, rec)
    assert [n > 0 for n in seen] == [True, False, False, True, False, False, True]
    assert hook_counts(model) == {}
    assert sorted(gradscope.load_run(run_dir).scalars.step) == [0, 3, 6]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_recorded_steps_never_synchronise_with_host(kind, run_dir):
    torch.manual_seed(0)
    model = TinyCNN() if kind == "cnn" else TinyMLP()
    # SGD: Adam's single-tensor path itself calls .item() on its step counter
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    data = batches(kind, steps=6)
    # flush_every above the step count: flushes (which may wait) happen only at close
    with gradscope.watch(model, run_dir, optimizer=opt, flush_every=10) as rec:
        log = OpLog(forbid_sync=True)
        with log:
            for x, y in data:
                train_step(model, opt, x, y, rec)
                with torch.no_grad():
                    model.eval()
                    model(x)
                    model.train()
    assert log.ops["aten._foreach_norm"] > 0


def test_parameter_norms_come_from_batched_foreach_norm(run_dir, monkeypatch):
    monkeypatch.setattr(kernels, "MODE", None)  # gradients reduced at once, even in a batched test run
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), = batches("cnn", steps=1)
    n_params = len(list(model.parameters()))
    with gradscope.watch(model, run_dir, optimizer=opt):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        log = OpLog()
        with log:
            opt.step()  # the optimizer pre-hook records parameter and gradient norms
    # one call for parameters and one for gradients, not one kernel per tensor
    assert log.ops["aten._foreach_norm"] == 2
    assert log.ops["aten.linalg_vector_norm"] == 0
    assert n_params > 2


@pytest.mark.parametrize("name, overrides", [("resnet20", {"input_size": 8}),
                                             ("transformer_lm_pre", {"depth": 2, "seq_len": 8})])
def test_block_metrics_never_synchronise_with_host(name, overrides, run_dir):
    torch.manual_seed(0)
    model = models.create(name, **overrides)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    data = reference_batches(name, 3, batch=4, **overrides)
    with gradscope.watch(model, run_dir, optimizer=opt, flush_every=10) as rec:
        assert rec.blocks
        with OpLog(forbid_sync=True):
            for x, y in data:
                train_step(model, opt, x, y)  # steps end at the optimizer's: no rec.step()
    assert len(gradscope.load_run(run_dir).blocks) == 3 * len(rec.blocks)
