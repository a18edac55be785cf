"""Training setups that trip naive recorders: dtypes, AMP skips, late step() calls, checkpointing."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradscope
from gradscope.testing import TinyMLP, assert_no_hooks, assert_same_parameters, batches


def test_float64_model_records_and_trains(run_dir):
    torch.manual_seed(0)
    model = TinyMLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 4, (16,))
    outs = []
    model[0].register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    with gradscope.watch(model, run_dir, optimizer=opt) as rec:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        rec.step()
        want_grad = float(model[0].weight.grad.norm() ** 2 + model[0].bias.grad.norm() ** 2) ** 0.5
        opt.step()
    row = gradscope.load_run(run_dir).layers.set_index("layer").loc["0"]
    assert math.isclose(row["act_std"], float(outs[0].std(unbiased=False)), rel_tol=1e-5)
    assert math.isclose(row["grad_norm"], want_grad, rel_tol=1e-5)


def test_loss_lands_in_its_step_when_training_in_eval_mode(run_dir):
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.eval()  # e.g. fine-tuning with BatchNorm statistics frozen
    with gradscope.watch(model, run_dir, optimizer=opt) as rec:
        for i, (x, y) in enumerate(batches("mlp", steps=3)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.step(loss=torch.tensor(float(i + 1)))
            opt.step()
    assert gradscope.load_run(run_dir).scalars.set_index("step").loss.to_dict() == {0: 1.0, 1: 2.0, 2: 3.0}


@pytest.mark.parametrize("flush_every", [1, 2, 50])
def test_step_after_optimizer_step_and_eval_pass_keeps_the_loss(flush_every, run_dir):
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, run_dir, optimizer=opt, flush_every=flush_every) as rec:
        for i, (x, y) in enumerate(batches("mlp", steps=6)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            with torch.no_grad():  # validation between the optimizer step and step(loss=)
                model.eval()
                model(x)
                model.train()
            rec.step(loss=float(i))
    scalars = gradscope.load_run(run_dir).scalars.set_index("step").loss
    assert scalars.to_dict() == {i: float(i) for i in range(6)}


def test_loss_given_after_manual_flush_is_dropped_with_a_warning(run_dir):
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    (x, y), = batches("mlp", steps=1)
    with gradscope.watch(model, run_dir, optimizer=opt) as rec:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rec.flush()
        with pytest.warns(RuntimeWarning, match="dropped") as caught:
            rec.step(loss=1.0)
    assert caught[0].filename == __file__  # the user's line, not torch.compiler.disable's wrapper


def _amp_loop(model, opt, scaler, rec, losses_scale, unscale_first=False, data=None):
    """A GradScaler loop; ``losses_scale`` multiplies each step's loss (inf forces a skip)."""
    for i, (x, y) in enumerate(data or batches("mlp", steps=len(losses_scale))):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * losses_scale[i]
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
        rec.step(loss=loss)
        scaler.step(opt)
        scaler.update()


def test_scaler_skipped_step_is_recorded_as_its_own_step(run_dir):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gradscope.watch(model, run_dir, optimizer=opt, scaler=scaler) as rec:
        _amp_loop(model, opt, scaler, rec, [1.0, float("inf"), 1.0, 1.0])
    run = gradscope.load_run(run_dir)
    assert run.scalars.step.tolist() == [0, 1, 2, 3]
    assert run.scalars.loss_scale.tolist() == [1024.0, 1024.0, 512.0, 512.0]  # backed off after the skip
    assert run.layer_table.calls.max() == 1  # no two iterations merged
    train = run.layers[run.layers.phase == "train"]
    skipped = train[train.step == 1]
    assert skipped.param_norm.isna().all()  # no optimizer step: no parameter row data
    assert not math.isfinite(float(run.scalars.loss[1]))
    ok = train[train.step == 2]
    assert ok.grad_out_norm.notna().all() and ok.grad_out_norm.lt(10).all()  # unscaled by 512, not 1024


def _scaled_training(run, *, wrap_before=None, while_watched=None):
    """Four GradScaler steps, the second skipped (inf loss); the model and scaler after them.
    ``while_watched(scaler)`` runs between the steps, inside the recorder."""
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    if wrap_before is not None:
        scaler.update = wrap_before(scaler.update)
    if run is None:
        for i, (x, y) in enumerate(batches("mlp", steps=4)):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y) * (float("inf") if i == 1 else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
        return model, scaler
    with gradscope.watch(model, run, optimizer=opt, scaler=scaler) as rec:
        for i, (x, y) in enumerate(batches("mlp", steps=4)):
            _amp_loop(model, opt, scaler, rec, [float("inf") if i == 1 else 1.0], data=[(x, y)])
            if while_watched is not None:
                while_watched(scaler)
    return model, scaler


def _counting(calls):
    def wrap(update):
        def counted(*args, **kwargs):
            calls.append(1)
            return update(*args, **kwargs)
        return counted
    return wrap


def test_scaler_update_is_watched_on_the_instance_only_and_left_as_it_was(run_dir):
    """GradScaler has no hooks: watch() wraps this scaler's update() (how a skipped step ends
    under a compiled model) and close() puts back what was there, a user's own wrapper included.
    A copy or a pickle of the scaler taken meanwhile is a plain scaler of its own."""
    plain, plain_scaler = _scaled_training(None)
    copies = []

    def copy_it(scaler):
        assert "update" in vars(scaler)  # watched
        copies.extend([copy.deepcopy(scaler), pickle.loads(pickle.dumps(scaler))])

    watched, scaler = _scaled_training(run_dir, while_watched=copy_it)
    assert_same_parameters(plain, watched, "GradScaler training with gradscope attached")
    assert float(scaler.get_scale()) == float(plain_scaler.get_scale()) == 512.0
    assert "update" not in vars(scaler) and scaler.update.__func__ is torch.amp.GradScaler.update
    for twin in copies:  # each updates itself, not the watched scaler
        assert twin.update.__self__ is twin and twin.update.__func__ is torch.amp.GradScaler.update

    calls = []
    _, scaler = _scaled_training(run_dir.parent / "own", wrap_before=_counting(calls))
    assert len(calls) == 4 and vars(scaler)["update"].__name__ == "counted"  # the user's, put back
    assert gradscope.load_run(run_dir.parent / "own").scalars.step.tolist() == [0, 1, 2, 3]


def test_a_scaler_update_wrapped_again_after_watch_keeps_no_closed_recorder(run_dir):
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    calls = []
    with gradscope.watch(model, run_dir, optimizer=opt, scaler=scaler) as rec:
        scaler.update = _counting(calls)(scaler.update)  # wrapped after watch(): gradscope's stays inside
        _amp_loop(model, opt, scaler, rec, [1.0])
    x, y = next(iter(batches("mlp", steps=1)))
    scaler.scale(F.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)  # skipped, but the recorder is closed: its step does not move
    scaler.update()
    assert rec.step_index == 1 and len(calls) == 2
    closed = weakref.ref(rec)
    del rec
    gc.collect()
    assert closed() is None  # the wrapper left in place does not keep the recorder (and its buffers)


def test_two_recorders_on_one_scaler_leave_it_plain_whichever_closes_first(run_dir):
    scaler = torch.amp.GradScaler("cpu")
    parts = [TinyMLP() for _ in range(2)]
    recs = [gradscope.watch(m, run_dir / str(i), optimizer=torch.optim.SGD(m.parameters(), lr=0.01),
                            scaler=scaler) for i, m in enumerate(parts)]
    for rec in recs:  # closed in the order they were opened: the first's wrapper is inside the second's
        rec.close()
    assert "update" not in vars(scaler)


def test_one_scaler_for_two_optimizers_skips_no_step_it_did_not_skip(run_dir):
    """A GAN's loop, one scaler updated after each optimizer (as accelerate does): the update for
    the other optimizer, after the watched model's forward, ends no step; a real skip of the
    watched one is still its own step."""
    torch.manual_seed(0)
    watched, other = TinyMLP(), nn.Linear(4, 1)
    opt_w = torch.optim.SGD(watched.parameters(), lr=0.01)
    opt_o = torch.optim.SGD(other.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gradscope.watch(watched, run_dir, optimizer=opt_w, scaler=scaler) as rec:
        for i, (x, y) in enumerate(batches("mlp", steps=4)):
            out = watched(x)  # the generator's output
            opt_o.zero_grad()
            scaler.scale(other(out.detach()).square().mean()).backward()  # the critic's step
            scaler.step(opt_o)
            scaler.update()
            opt_w.zero_grad()
            scaler.scale(F.cross_entropy(out, y) * (float("inf") if i == 2 else 1.0)).backward()
            scaler.step(opt_w)
            scaler.update()
    assert rec.step_index == 4
    run = gradscope.load_run(run_dir)
    assert run.scalars.step.tolist() == [0, 1, 2, 3] and run.layer_table.calls.max() == 1
    assert run.layers[run.layers.step == 2].param_norm.isna().all()  # the skipped one


def test_scaler_without_optimizer_after_unscale(run_dir):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    seen = {}

    def remember(optimizer, args, kwargs):  # the unscaled, final gradients
        seen["g"] = math.sqrt(sum(float(p.grad.double().norm() ** 2) for p in model.parameters()))

    opt.register_step_pre_hook(remember)
    with gradscope.watch(model, run_dir, scaler=scaler) as rec:
        _amp_loop(model, opt, scaler, rec, [1.0], unscale_first=True)
    s = gradscope.load_run(run_dir).scalars.iloc[0]
    assert math.isclose(s["grad_global_norm"], seen["g"], rel_tol=1e-4)
    assert s["loss_scale"] == 256.0


def test_module_returning_a_parameter_leaves_no_hook(run_dir):
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(4, 8))

        def forward(self, x):
            return self.pos

    model = nn.Sequential(Positions(), nn.Linear(8, 2))
    with gradscope.watch(model, run_dir) as rec:
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
            rec.step()
    assert_no_hooks(model)
    rows = gradscope.load_run(run_dir).layers.set_index(["step", "layer"])
    assert rows.loc[(2, "0"), "grad_norm"] > 0  # the parameter's own gradient is still recorded


def test_sparse_gradients_do_not_break_training(run_dir):
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, run_dir, optimizer=opt):
        model(torch.tensor([1, 2, 3])).sum().backward()
        opt.step()
    rows = gradscope.load_run(run_dir).layers.set_index("layer")
    assert math.isnan(rows.loc["0", "grad_norm"]) and rows.loc["0", "param_norm"] > 0
    assert rows.loc["1", "grad_norm"] > 0


def test_activation_checkpointing_recomputation_is_not_counted(run_dir, tmp_path):
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 2)

        def forward(self, x, use_checkpoint=True):
            h = checkpoint(self.inner, x, use_reentrant=False) if use_checkpoint else self.inner(x)
            return self.head(h)

    torch.manual_seed(0)
    model = Checkpointed()
    x = torch.randn(4, 8)
    tables = []
    for i, use in enumerate((True, False)):
        with gradscope.watch(model, tmp_path / str(i)) as rec:
            model(x, use_checkpoint=use).sum().backward()
            rec.step()
        model.zero_grad()
        tables.append(gradscope.load_run(tmp_path / str(i)))
    assert tables[0].layer_table.calls.tolist() == [1, 1, 1]
    cols = ["act_std", "grad_out_norm", "grad_norm"]
    a, b = (t.layers.set_index("layer")[cols] for t in tables)
    assert (a - b).abs().max().max() < 1e-6


@pytest.mark.slow
def test_unclosed_recorder_writes_its_data_at_exit(tmp_path):
    script = textwrap.dedent("""
        import sys, torch, gradscope
        from gradscope.testing import TinyMLP
        def train():
            model = TinyMLP()
            rec = gradscope.watch(model, sys.argv[1])
            for _ in range(3):
                model(torch.randn(2, 8)).sum().backward()
                rec.step()
        train()   # the recorder and model go out of scope without close()
        import gc; gc.collect()
    """)
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "r")], check=True, timeout=120)
    run = gradscope.load_run(tmp_path / "r")
    assert run.status == "finished" and run.scalars.step.tolist() == [0, 1, 2]


def test_run_without_rows_has_the_full_schema(run_dir):
    model = TinyMLP()
    gradscope.watch(model, run_dir).close()
    run = gradscope.load_run(run_dir)
    assert len(run.layers) == 0
    assert {"step", "phase", "layer", "type", "depth", "rel_depth", "act_std"} <= set(run.layers.columns)
    assert run.layers[run.layers.phase == "train"].empty
    assert str(run.scalars.step.dtype) == "int64"


def test_block_first_model_after_scaler_skipped_steps(run_dir):
    """A skipped AMP step ends inside the next forward; a block running first must still pair
    its input with this call's output (not a stale one from an earlier iteration)."""
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.f(x)

    torch.manual_seed(0)
    model = nn.Sequential(Blk(), Blk(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38, growth_interval=1000)  # overflows, skips
    xs = [torch.randn(5, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with gradscope.watch(model, run_dir, optimizer=opt, scaler=scaler, every=2):
        for x in xs:
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean() * 1e3).backward()
            scaler.step(opt)
            scaler.update()
    blocks = gradscope.load_run(run_dir).blocks.set_index(["step", "block"])
    with torch.no_grad():
        for step in (2, 4):
            x = xs[step]
            want = float((model[0](x) - x).norm() / x.norm())
            assert blocks.loc[(step, "0"), "id_rel_residual"] == pytest.approx(want, rel=1e-4)


def test_create_graph_backward_is_recorded_without_joining_the_graph(run_dir):
    """A gradient penalty's backward(create_graph=True) hands the probes gradients that require grad."""
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8, requires_grad=True), torch.randint(0, 4, (16,))
    with gradscope.watch(model, run_dir, optimizer=opt) as rec:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (loss + gx.square().sum()).backward()
        rec.step(loss=loss)
        opt.step()
    layers = gradscope.load_run(run_dir).layers
    assert layers.grad_out_norm.notna().all() and (layers.grad_out_norm > 0).all()
