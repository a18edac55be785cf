"""Compiled models: gradscope's hooks run inside ``torch.compile``d models, or watch() refuses.

Dynamo never runs module hooks added after a compiled model's first call, and removing one
makes it recompile without it (docs/design.md, "Compiled models"). With ``every > 1`` the
probes used to come and go with the schedule, so a compiled model recorded step 0 and then
nothing. These tests use Dynamo's ``eager`` backend (the hooks' fate is Dynamo's, not
Inductor's, and it compiles in milliseconds) and one Inductor run for the figures (resnet20 at every
recorded step: test_traced_probes).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gradscope.cli.summary import run_summary

import gradscope
from gradscope.testing import Residual, TinyCNN, TinyMLP, assert_no_hooks, assert_same_parameters, batches, train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model, how, backend="eager"):
    if how == "torch.compile":
        return torch.compile(model, backend=backend)
    model.compile(backend=backend)
    return model


def _record(model, run, every, compile_how=None, watch_first=True, steps=12, backend="eager"):
    data = batches("mlp", steps=steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if watch_first:
        rec = gradscope.watch(model, run, optimizer=opt, every=every, flush_every=4)
        runner = _compiled(model, compile_how, backend) if compile_how else model
    else:
        runner = _compiled(model, compile_how, backend)
        rec = gradscope.watch(runner, run, optimizer=opt, every=every, flush_every=4)
    with rec:
        for x, y in data:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(runner(x), y)
            loss.backward()
            rec.step(loss=loss)
            opt.step()
    return gradscope.load_run(run), runner


COLUMNS = ["act_mean", "act_std", "act_absmax", "act_zero_frac", "grad_out_norm", "param_norm", "grad_norm"]


def _figures(run):
    layers = run.layers[run.layers.phase == "train"].set_index(["step", "layer"]).sort_index()
    return layers[COLUMNS].astype(float)


def _block_figures(run, columns=("grad_in_norm", "grad_out_norm", "id_rel_residual")):
    return run.blocks.set_index(["step", "block"]).sort_index()[list(columns)].astype(float)


class _OwnForward(torch.nn.Module):
    """TinyMLP behind a forward of its own: ``model.compile()`` of a bare ``nn.Sequential`` compiles
    nothing, since Dynamo does not compile torch's own ``forward`` as a frame of its own."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.body = TinyMLP(depth=depth)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(("compile_how", "watch_first", "every"), [
    ("torch.compile", True, 1), ("torch.compile", True, 3), ("torch.compile", False, 3),
    ("model.compile", True, 3), ("model.compile", False, 1)])
def test_compiled_model_records_every_scheduled_step_as_eager(tmp_path, compile_how, watch_first, every):
    torch.manual_seed(0)
    eager_model = _OwnForward()
    compiled_model = copy.deepcopy(eager_model)
    eager, _ = _record(eager_model, tmp_path / "eager", every)
    compiled, runner = _record(compiled_model, tmp_path / "compiled", every, compile_how, watch_first)

    assert compiled.meta["status"] == "finished", compiled.meta["errors"]
    assert compiled.meta["env"]["compiled"] and not eager.meta["env"]["compiled"]
    assert ", compiled)" in run_summary(compiled) and ", compiled)" not in run_summary(eager)
    expected_steps = list(range(0, 12, every))
    assert sorted(compiled.layers.step.unique()) == expected_steps  # every scheduled step, none missing
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)
    assert_same_parameters(eager_model, compiled_model, f"{compile_how}, every={every}")
    assert_no_hooks(compiled_model)


class _WithLSTM(torch.nn.Module):
    """An ``nn.LSTM``, which Dynamo does not trace: it runs that part of the model as Python."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = torch.nn.Linear(1, 8), torch.nn.Linear(8, 4)
        self.rnn = torch.nn.LSTM(8, 8, batch_first=True)

    def forward(self, x):
        h, _ = self.rnn(torch.tanh(self.inp(x.unsqueeze(-1))))
        return self.out(h[:, -1])


@pytest.mark.parametrize("case", ["an nn.LSTM inside", "model.compile() of an nn.Sequential"])
def test_hooks_dynamo_enters_from_python_are_not_compiled_on_their_own(tmp_path, case):
    """Where Dynamo runs part of a compiled model as Python (an ``nn.LSTM``; torch's own ``forward``
    of an ``nn.Sequential`` under ``model.compile()``), it enters gradscope's hooks from there, and
    the probes run as Python too (``compilation.python_when_entered``). Before, Dynamo compiled each
    probe as a frame of its own, once per layer up to its recompile limit of 8 with a warning
    naming gradscope, and under the LSTM the eager path's callees once per step."""
    from torch._dynamo import convert_frame

    if not hasattr(convert_frame, "input_codes"):
        pytest.skip("this torch does not list the frames Dynamo compiled")
    torch.manual_seed(0)
    eager_model = _WithLSTM() if case.startswith("an nn.LSTM") else TinyMLP(depth=5)  # 11 layers: over 8
    compiled_model = copy.deepcopy(eager_model)
    eager, _ = _record(eager_model, tmp_path / "eager", every=3)
    how = "torch.compile" if case.startswith("an nn.LSTM") else "model.compile"
    compiled, _ = _record(compiled_model, tmp_path / "compiled", every=3, compile_how=how)

    package = str(Path(gradscope.__file__).parent)
    entered = {(code.co_filename, code.co_name) for ref in convert_frame.input_codes.seen if (code := ref())}
    # the model's pre-hook and forward hook alone (``hooks.ModelStart``, ``ModelEnd``), once: they
    # read nothing that changes per step
    ours = {(Path(file).relative_to(package).as_posix(), name) for file, name in entered if file.startswith(package)}
    assert ours <= {("recording/hooks.py", "__call__")}
    assert any(name == "forward" for _, name in entered)  # Dynamo did compile parts of the model
    assert compiled.meta["status"] == "finished", compiled.meta["errors"]
    assert sorted(compiled.layers.step.unique()) == [0, 3, 6, 9]
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)
    assert_same_parameters(eager_model, compiled_model, case)


class _TwoGraphs(torch.nn.Module):
    """Residual blocks with a graph break between them, and a Linear called on both sides of it:
    Dynamo compiles two graphs that both write gradscope's staging, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        self.blocks = torch.nn.ModuleList([Residual(16), Residual(16)])  # found as blocks: siblings

    def forward(self, x):
        h = self.blocks[0](self.shared(torch.relu(self.inp(x))))
        torch._dynamo.graph_break()
        return self.out(self.shared(self.blocks[1](h)))


@pytest.mark.parametrize(("backend", "every"), [
    ("aot_eager", 1), ("aot_eager", 3), pytest.param("inductor", 1, marks=pytest.mark.slow)])
def test_a_model_compiled_into_several_graphs_trains_and_records_as_eager(tmp_path, backend, every):
    """Written directly from the backward, the staging was saved for each graph's backward with a
    version check that the next graph's writes failed: training raised "modified by an inplace
    operation". The statistics reach it through ``gradscope::deposit`` now."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager_model = _TwoGraphs()
    compiled_model, unwatched = copy.deepcopy(eager_model), copy.deepcopy(eager_model)
    eager, _ = _record(eager_model, tmp_path / "eager", every)
    compiled, _ = _record(compiled_model, tmp_path / "compiled", every, "torch.compile", backend=backend)
    assert counters["stats"]["unique_graphs"] >= 2
    assert compiled.meta["status"] == "finished" and compiled.meta["env"]["compiled"]
    rtol = 1e-5 if backend == "aot_eager" else 1e-4
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index) and sorted(a.index.get_level_values(0).unique()) == list(range(0, 12, every))
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=rtol, atol=1e-6)
    a, b = _block_figures(eager), _block_figures(compiled)
    assert len(a) == 2 * len(range(0, 12, every)) and a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=rtol, atol=1e-6)
    runner, opt = torch.compile(unwatched, backend=backend), torch.optim.SGD(unwatched.parameters(), lr=0.05)
    for x, y in batches("mlp", steps=12):  # the same compiled training without gradscope
        opt.zero_grad()
        torch.nn.functional.cross_entropy(runner(x), y).backward()
        opt.step()
    assert_same_parameters(unwatched, compiled_model, f"{backend}, every={every}")


@pytest.mark.parametrize("compiled_part", ["optimizer step", "training step"])
def test_a_compiled_optimizer_or_training_step_runs_gradscopes_bookkeeping_eagerly(tmp_path, compiled_part):
    """``torch.compile(opt.step)`` (PyTorch's recipe for a fused optimizer) or a whole compiled
    training step that calls ``rec.step()``: Dynamo used to trace the recorder's step-end code and
    its numpy, and the first recorded step raised. It now runs eagerly (a graph break where it is
    called), records as eager, trains as unwatched and compiles no graph per step."""
    from torch._dynamo.utils import counters

    def train_on(model, run, watched, steps=12):
        torch._dynamo.reset()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)  # as _record, the eager reference
        rec = gradscope.watch(model, run, optimizer=opt, every=3, flush_every=4) if watched else None
        runner, update = model, opt.step
        if compiled_part == "optimizer step":
            runner, update = torch.compile(model, backend="aot_eager"), torch.compile(opt.step, backend="aot_eager")

        def train_step(x, y):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(runner(x), y)
            loss.backward()
            if rec is not None:
                rec.step(loss=loss)
            update()

        if compiled_part == "training step":
            train_step = torch.compile(train_step, backend="aot_eager")
        graphs = []
        for x, y in batches("mlp", steps=steps):
            train_step(x, y)
            graphs.append(counters["stats"]["unique_graphs"])
        if rec is not None:
            rec.close()
        return graphs

    torch.manual_seed(0)
    eager_model = TinyMLP()
    watched, unwatched = copy.deepcopy(eager_model), copy.deepcopy(eager_model)
    eager, _ = _record(eager_model, tmp_path / "eager", every=3)
    counters.clear()
    graphs = train_on(watched, tmp_path / "compiled", watched=True)
    train_on(unwatched, None, watched=False)

    compiled = gradscope.load_run(tmp_path / "compiled")
    assert compiled.meta["status"] == "finished", compiled.meta["errors"]
    assert sorted(compiled.layers.step.unique()) == [0, 3, 6, 9]
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)
    assert_same_parameters(unwatched, watched, f"compiled {compiled_part}, watched against unwatched")
    assert graphs[-1] == graphs[5]  # nothing compiled after the first two periods of the schedule
    assert_no_hooks(watched)


def _train_lm(run, every=3, steps=7, compile_at=None, part="layers", how="torch.compile(layer)",
              before_watch=False, warm_up=False):
    """The small Pre-LN LM (seeded) trained watched, and its run: its layers (``how``), or the whole
    model (``part="model"``), compiled at step ``compile_at``, or before ``watch()`` (and called
    once there, ``warm_up``)."""
    from gradscope.lab import models
    from gradscope.testing import reference_batches, small_overrides

    def compile_layers():
        for j, layer in enumerate(model.layers):
            if how == "layer.compile()":
                layer.compile(backend="aot_eager")
            else:
                model.layers[j] = torch.compile(layer, backend="aot_eager")

    name = "transformer_lm_pre"
    overrides = small_overrides(name)
    torch.manual_seed(0)
    model = models.create(name, **overrides)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = reference_batches(name, steps, **overrides)
    if before_watch or warm_up:
        compile_layers()
    if warm_up:  # a sanity check before training: the compiled layers run without gradscope's hooks
        model(data[0][0]).sum().backward()
        model.zero_grad()
    runner = model
    with gradscope.watch(model, run, optimizer=opt, every=every) as rec:
        for i, (x, y) in enumerate(data):
            if i == compile_at and part == "layers":
                compile_layers()
            elif i == compile_at and part == "forward":  # an older way: the model's own forward compiled
                model.forward = torch.compile(model.forward, backend="aot_eager")
            elif i == compile_at:
                runner = torch.compile(model, backend="aot_eager")
            opt.zero_grad()
            out = runner(x)
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            loss.backward()
            rec.step(loss=loss)
            opt.step()
    return gradscope.load_run(run), model


@pytest.mark.parametrize(("regional", "watch_first"), [
    ("torch.compile(layer)", False), ("torch.compile(layer)", True), ("layer.compile()", False)])
def test_regional_compilation_of_each_block_records_as_eager(tmp_path, regional, watch_first):
    """PyTorch's regional compilation: each repeated layer compiled on its own, to compile once for
    all of them. ``model.layers[i] = torch.compile(layer)`` before ``watch()`` puts ``_orig_mod``
    into the names the model's ``gradscope_blocks()`` declares, and watch() used to refuse them as
    not its modules; every block and layer now keeps its eager name and figures."""
    eager, eager_model = _train_lm(tmp_path / "eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, compiled_model = _train_lm(tmp_path / "compiled", how=regional, before_watch=not watch_first,
                                             compile_at=0 if watch_first else None)
    assert not [w for w in caught if "did not run" in str(w.message)]
    assert compiled.meta["status"] == "finished" and compiled.meta["env"]["compiled"]
    assert [b["name"] for b in compiled.meta["blocks"]] == [b["name"] for b in eager.meta["blocks"]]
    assert [b["branch"] for b in compiled.meta["blocks"]] == [b["branch"] for b in eager.meta["blocks"]]
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index) and sorted(compiled.layers.step.unique()) == [0, 3, 6]
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_block_figures(compiled).to_numpy(), _block_figures(eager).to_numpy(),
                               rtol=1e-5, atol=1e-7)
    assert_same_parameters(eager_model, compiled_model, regional)


@pytest.mark.parametrize("how", ["compiled on a skipped step", "compiled and called before watch()"])
def test_layers_compiled_without_gradscopes_hooks_are_named_in_a_warning(tmp_path, how):
    """Compiled on a step the schedule skips (the probes are detached while Dynamo traces), or
    compiled and called before ``watch()``, the layers run code without gradscope's probes, and
    Dynamo keeps it: their rows would be empty while the other layers record. The steps are kept
    and a warning names them, at the first step it happens (step 0 in the second case)."""
    first = 3 if how == "compiled on a skipped step" else 0
    with pytest.warns(RuntimeWarning, match=rf"in step {first} gradscope's hooks did not run on 12 watched "
                      r"layer\(s\) inside compiled modules.*layers\.0\.attn\.fn\.qkv") as caught:
        if first:
            run, _ = _train_lm(tmp_path / "r", compile_at=1)  # step 1 is not recorded
        else:
            run, _ = _train_lm(tmp_path / "r", warm_up=True)
    assert {w.filename for w in caught if "did not run" in str(w.message)} == {__file__}  # the user's line
    assert run.meta["status"] == "finished"
    layers = run.layers[(run.layers.phase == "train") & (run.layers.step == first)].set_index("layer")
    assert layers.act_std.isna().sum() == 12 and layers.loc["head"].act_std > 0  # as the warning says


@pytest.mark.parametrize("part", ["model", "forward"])
def test_a_whole_model_compiled_on_a_skipped_step_is_refused(tmp_path, part):
    """Compiled whole on a step the schedule skips, after recorded steps in eager: no hook runs on
    the next recorded step, and it is refused as the first would be, never recorded empty. Also
    where only its ``forward`` is compiled: its pre-hook then runs as Python."""
    with pytest.raises(RuntimeError, match="in step 3 the watched layers' parameters have gradients, but none"):
        _train_lm(tmp_path / "r", compile_at=1, part=part)
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "failed" and "compiled on a step the schedule did not record" in run.meta["errors"][0]
    assert sorted(run.layers.step.unique()) == [0]


def test_layers_whose_hooks_never_run_in_an_eager_model_are_not_warned_about(tmp_path):
    """Ordinary eager models have watched layers with gradients whose hooks never run:
    ``nn.MultiheadAttention`` uses its ``out_proj``'s weight without calling it, and a position
    table is often read as ``.weight``. Nothing is compiled, so no warning, and no refusal."""

    class Positions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(16, 8), torch.nn.Embedding(5, 8)
            self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
            self.head = torch.nn.Linear(8, 16)

        def forward(self, ids):
            return self.head(self.encoder(self.tok(ids) + self.pos.weight[: ids.shape[1]]))

    torch.manual_seed(0)
    model = Positions()
    opt = torch.optim.AdamW(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, tmp_path / "r", optimizer=opt) as rec:
            for _ in range(3):
                opt.zero_grad()
                model(torch.randint(0, 16, (4, 5))).sum().backward()
                opt.step()
    layers = {layer["name"]: layer["calls"] for layer in gradscope.load_run(tmp_path / "r").meta["layers"]}
    assert layers["pos"] == 0 and layers["encoder.layers.0.self_attn.out_proj"] == 0  # the case this is about
    assert not [w for w in caught if "did not run" in str(w.message)]
    assert rec.closed and gradscope.load_run(tmp_path / "r").meta["status"] == "finished"


@pytest.mark.parametrize("compiled_part", [None, "an unwatched trunk", "the model, for evaluation only"])
def test_an_eager_step_that_leaves_the_watched_part_unused_is_recorded_not_refused(tmp_path, compiled_part):
    """A multi-task model watched on one head, with a step that trains only the other one and
    gradients zeroed in place (``zero_grad(set_to_none=False)``): the watched parameters hold
    gradients while none of their hooks ran. Ordinary in an eager model (so is DDP handing a rank
    the others' gradients of a part it did not use), so the step is kept; the refusal is for
    compiled training, whose code may run without the hooks, not for a compiled part that holds no
    watched layer or a compiled copy used only under ``no_grad``."""

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(4, 4)
            self.a, self.b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

        def forward(self, x, task):
            h = self.trunk(x)
            return self.a(h) if task == "a" else self.b(h)

    torch.manual_seed(0)
    model = TwoHeads()
    if compiled_part == "an unwatched trunk":
        model.trunk.compile(backend="eager")
    evaluate = torch.compile(model, backend="eager") if compiled_part == "the model, for evaluation only" else None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, tmp_path / "r", optimizer=opt, modules="b", blocks=[]):
        for task in ["b", "a", "b"]:
            opt.zero_grad(set_to_none=False)
            model(torch.randn(8, 4), task).pow(2).mean().backward()
            opt.step()
            if evaluate is not None:
                with torch.no_grad():
                    evaluate(torch.randn(8, 4), "a")
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "finished"
    layers = run.layers.set_index("step")
    assert sorted(layers.index) == [0, 1, 2] and np.isnan(layers.loc[1, "act_std"]) and layers.loc[2, "act_std"] > 0


def test_blocks_compiled_and_called_before_watch_name_their_layers_in_a_warning(tmp_path):
    """Regional compilation whose compiled units are the watched blocks themselves, compiled and
    called before ``watch()``: the blocks' own probes run (Dynamo enters them from Python), their
    layers' never do, and the warning names those layers (it was skipped once a probe had run
    compiled, and Dynamo then compiled the block probes on their own)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))

        def forward(self, x):
            return x + self.f(x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.blocks, self.out = torch.nn.Linear(4, 8), torch.nn.ModuleList([Block(), Block()]), \
                torch.nn.Linear(8, 1)

        def forward(self, x):
            x = self.inp(x)
            for block in self.blocks:
                x = block(x)
            return self.out(x)

    torch.manual_seed(0)
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = torch.compile(block, backend="eager")
    model(torch.randn(16, 4))  # compiled without gradscope's hooks
    with pytest.warns(RuntimeWarning, match=r"in step 0 gradscope's hooks did not run on 4 watched layer\(s\) "
                      r"inside compiled modules.*blocks\.0\.f\.0, blocks\.0\.f\.2, blocks\.1\.f\.0"):
        with gradscope.watch(model, tmp_path / "r", optimizer=opt):
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(16, 4)).pow(2).mean().backward()
                opt.step()
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "finished"
    assert [b["name"] for b in run.meta["blocks"]] == ["blocks.0", "blocks.1"]
    assert run.blocks.id_rel_residual.notna().all()  # the blocks' own probes ran
    train = run.layers.set_index("layer")
    assert train.loc["blocks.0.f.0", "act_std"].isna().all() and (train.loc["inp", "act_std"] > 0).all()


def test_a_pre_hook_that_replaces_a_blocks_input_is_seen_by_the_compiled_probes(tmp_path):
    """Documented, not wished for (README, "Compiled models"): eager probes keep a block's input
    as its caller passed it; compiled ones take it after the user's pre-hook (here doubled), so
    that block's dL/dx reads half of eager's. Every other figure is eager's."""
    torch.manual_seed(0)
    eager_model = torch.nn.Sequential(torch.nn.Linear(8, 16), Residual(16), Residual(16), torch.nn.Linear(16, 4))
    compiled_model = copy.deepcopy(eager_model)
    runs = []
    for model, how in ((eager_model, None), (compiled_model, "torch.compile")):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        with gradscope.watch(model, tmp_path / str(how), optimizer=opt):
            model[2].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
            runner = _compiled(model, how, "aot_eager") if how else model
            for x, y in batches("mlp", steps=3):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(runner(x), y).backward()
                opt.step()
        runs.append(gradscope.load_run(tmp_path / str(how)))
    a, b = (_block_figures(r, ["grad_in_norm", "grad_out_norm"]) for r in runs)
    assert runs[1].meta["env"]["compiled"] and len(a) == 6 and a.index.equals(b.index)
    np.testing.assert_allclose(b.xs("2", level="block").grad_in_norm * 2, a.xs("2", level="block").grad_in_norm,
                               rtol=1e-5)
    b.loc[(slice(None), "2"), "grad_in_norm"] *= 2
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)
    a, b = (_block_figures(r).id_rel_residual for r in runs)
    np.testing.assert_allclose(b.xs("1", level="block"), a.xs("1", level="block"), rtol=1e-5)
    assert not np.allclose(b.xs("2", level="block"), a.xs("2", level="block"), rtol=1e-2)  # y against 2x, not x


class _Checkpointed(torch.nn.Module):
    """Residual blocks under activation checkpointing: their forward runs again in the backward."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inp, self.out, self.reentrant = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4), reentrant
        self.blocks = torch.nn.ModuleList([Residual(16), Residual(16)])

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.reentrant)
        return self.out(h)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("every", [1, 3])  # 3: the gated ops (``recording.gated``), which the recompute must not rerun
def test_activation_checkpointing_in_a_compiled_model_records_each_forward_once(tmp_path, reentrant, every):
    torch.manual_seed(0)
    eager_model = _Checkpointed(reentrant)
    compiled_model = copy.deepcopy(eager_model)
    eager, _ = _record(eager_model, tmp_path / "eager", every, steps=4)
    compiled, _ = _record(compiled_model, tmp_path / "compiled", every, "torch.compile", steps=4, backend="aot_eager")
    assert compiled.meta["status"] == "finished" and compiled.meta["env"]["compiled"]
    assert {layer["calls"] for layer in compiled.meta["layers"] + compiled.meta["blocks"]} == {1}  # not 2
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)
    a, b = _block_figures(eager), _block_figures(compiled)
    assert len(a) == (8 if every == 1 else 4) and a.index.equals(b.index)  # 2 blocks, 4 or 2 steps
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)


def test_inductor_compiled_model_matches_eager(tmp_path):
    torch.manual_seed(0)
    eager_model = TinyCNN()
    compiled_model = copy.deepcopy(eager_model)
    data = batches("cnn", steps=4)
    eager_rec = train(eager_model, data, run=tmp_path / "eager", every=2)
    runner = torch.compile(compiled_model)  # Inductor; watched through the wrapper
    compiled_rec = train(runner, data, run=tmp_path / "compiled", every=2)
    eager, compiled = gradscope.load_run(eager_rec.path), gradscope.load_run(compiled_rec.path)
    assert compiled.meta["status"] == "finished"
    assert list(compiled.layers.layer.unique()) == list(eager.layers.layer.unique())  # _orig_mod. removed
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compile_how", ["torch.compile", "model.compile"])
def test_watch_after_the_compiled_model_ran_records_or_refuses_with_the_reason(tmp_path, compile_how):
    """torch.compile(model) never runs hooks added after its first call: the first recorded
    step is refused, with why and what to do. model.compile() notices new hooks (it recompiles):
    then the steps are recorded, as in eager."""
    torch.manual_seed(0)
    model = TinyMLP()
    reference = copy.deepcopy(model)
    runner = _compiled(model, compile_how)
    x, y = next(iter(batches("mlp", steps=1)))
    runner(x)  # compiled and called before watch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gradscope.watch(runner, tmp_path / "r", optimizer=opt)
    torch.nn.functional.cross_entropy(runner(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    if compile_how == "torch.compile":
        with pytest.raises(RuntimeError, match="compiled .* and called before watch"):
            opt.step()
        assert rec.closed
        run = gradscope.load_run(tmp_path / "r")
        assert run.meta["status"] == "failed"
        assert any("called before watch" in e for e in run.meta["errors"])
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step was refused
        assert_no_hooks(model, opt)
        return
    opt.step()
    rec.close()
    eager_rec = gradscope.watch(reference, tmp_path / "eager")
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    eager_rec.step()
    eager_rec.close()
    a, b = _figures(gradscope.load_run(tmp_path / "eager")), _figures(gradscope.load_run(tmp_path / "r"))
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)


class _OwnForward(torch.nn.Module):
    """A forward of its own (Dynamo runs such a module's hooks outside its forward's frame) that
    calls only the elements of a ModuleList."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)])

    def forward(self, x):
        return self.layers[1](torch.relu(self.layers[0](x)))


@pytest.mark.parametrize("in_place", [False, True], ids=["torch.compile", "model.compile()"])
@pytest.mark.parametrize("make", [TinyMLP, _OwnForward, lambda: torch.nn.Linear(8, 4)],
                         ids=["Sequential", "own forward", "a single Linear"])
def test_a_graph_compiled_before_watch_is_refused_on_any_step_it_serves(tmp_path, make, in_place):
    """Dynamo keeps the code compiled before watch(): a batch of 1 (a size it specialises) traces a
    graph with gradscope's hooks, and a later batch of 8 runs the old dynamic graph, which measures
    nothing. That step is refused rather than recorded empty beside step 0: the torch.compile
    wrapper's own hooks, or around a model compiled in place its compiled call, which run eagerly,
    see a forward that never entered the model's modules. Compiled in place, Dynamo compiles only
    a forward of the model's own class (recorded empty before 2026-12-02); a bare torch.nn model
    compiles nothing and runs eagerly: recorded, not refused, with gradscope's call around it."""
    torch.manual_seed(0)
    model = make()
    if in_place:
        model.compile(backend="eager")
        runner, compiled_call = model, model._compiled_call_impl
    else:
        runner = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for size in (8, 16):  # a graph with a dynamic batch, compiled without gradscope's hooks
        runner(torch.randn(size, 8)).sum().backward()
    opt.zero_grad()
    rec = gradscope.watch(runner, tmp_path / "r", optimizer=opt)
    runner(torch.randn(1, 8)).sum().backward()
    opt.step()  # step 0: a new graph, traced with the hooks
    opt.zero_grad()
    runner(torch.randn(8, 8)).sum().backward()
    if in_place and not isinstance(model, _OwnForward):  # nothing compiled: step 1 recorded as eager
        opt.step()
        rec.close()
        steps = [0, 1]
    else:
        with pytest.raises(RuntimeError, match="in step 1 a training forward of the compiled model ran code that "
                           "has none of gradscope's hooks.*compiled .* and called before watch"):
            opt.step()
        steps = [0]
    assert rec.closed
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == ("finished" if steps == [0, 1] else "failed")
    assert list(run.layers.step.unique()) == steps and run.layers.act_mean.notna().all()
    assert_no_hooks(model, opt)
    assert_no_hooks(runner, opt)
    if in_place:  # gradscope's call around the compiled one is gone
        assert model._compiled_call_impl is compiled_call


def test_a_recorder_after_one_closed_on_the_compiled_model_is_refused_with_that_cause(tmp_path):
    """Closing a recorder removes its hooks, so Dynamo compiles the model again without them
    and runs that code for a later recorder's hooks too: the later recorder's first step is
    refused naming that cause. After ``torch._dynamo.reset()`` a new recorder records as eager."""
    torch.manual_seed(0)
    model = TinyMLP()
    reference = copy.deepcopy(model)
    runner = torch.compile(model, backend="eager")
    data = list(batches("mlp", steps=4))
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, reference))

    def train_on(m, optimizer, x, y):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        optimizer.step()

    with gradscope.watch(model, tmp_path / "first", optimizer=opt):
        train_on(runner, opt, *data[0])
    train_on(runner, opt, *data[1])  # compiled again, without hooks
    gradscope.watch(model, tmp_path / "second", optimizer=opt)
    with pytest.raises(RuntimeError, match="earlier gradscope recorder watched this model while it ran compiled"):
        train_on(runner, opt, *data[2])
    assert gradscope.load_run(tmp_path / "second").meta["status"] == "failed"
    for x, y in data[:2]:
        train_on(reference, ref_opt, x, y)

    torch._dynamo.reset()
    with gradscope.watch(model, tmp_path / "third", optimizer=opt):
        train_on(runner, opt, *data[3])
    with gradscope.watch(reference, tmp_path / "eager", optimizer=ref_opt):
        train_on(reference, ref_opt, *data[3])
    a, b = (_figures(gradscope.load_run(tmp_path / r)) for r in ("eager", "third"))
    assert len(a) > 0 and a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)


def test_a_step_that_ran_no_forward_is_not_refused(tmp_path):
    """Gradients without any forward in the step (a second rec.step() per iteration) are no
    sign of hooks that never run once some hook has run."""
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = next(iter(batches("mlp", steps=1)))
    with gradscope.watch(model, tmp_path / "r") as rec:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        rec.step()
        rec.step()  # gradients still there, no forward
    assert gradscope.load_run(tmp_path / "r").meta["status"] == "finished"


@pytest.mark.parametrize("compile_how", ["torch.compile", "model.compile"])
def test_a_step_the_gradscaler_skips_is_its_own_step_in_a_compiled_model(tmp_path, compile_how):
    """The compiled model's own pre-hook is traced (it only writes constants there), so the step
    the scaler skips is ended by its ``update()``, which runs in Python: not merged into the next."""
    torch.manual_seed(0)
    model = _OwnForward()
    start = copy.deepcopy(model.state_dict())
    runs = {}
    for how in (None, compile_how):
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        run = tmp_path / str(how)
        with gradscope.watch(model, run, optimizer=opt, scaler=scaler, every=2, flush_every=2):
            runner = _compiled(model, how) if how else model
            for i, (x, y) in enumerate(batches("mlp", steps=6)):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(runner(x), y) * (float("inf") if i == 2 else 1.0)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        assert "update" not in vars(scaler)  # the wrapper went with the recorder
        runs[how] = gradscope.load_run(run)
        torch._dynamo.reset()
    eager, compiled = runs[None], runs[compile_how]
    assert compiled.meta["status"] == "finished", compiled.meta["errors"]
    assert sorted(compiled.layers.step.unique()) == [0, 2, 4]
    assert compiled.layer_table.calls.max() == 1  # no two iterations merged into one step
    skipped = compiled.layers[compiled.layers.step == 2]
    assert skipped.param_norm.isna().all() and skipped.act_std.notna().all()  # its forward, not its update
    assert compiled.scalars.loss_scale.tolist() == [1024.0, 1024.0, 512.0]  # backed off after the skip
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)


def test_compiled_step_does_not_recompile_after_warm_up(tmp_path):
    """every=3 across 12 steps: the schedule flips the probes' work on and off, which may take one
    more compiled variant, but never one per step (Dynamo's cache limit would fall back to eager)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    counters.clear()
    _record(TinyMLP(), tmp_path / "r", every=3, compile_how="torch.compile", steps=6)
    warm = counters["stats"]["unique_graphs"]
    counters.clear()
    _record(TinyMLP(), tmp_path / "r2", every=3, compile_how="torch.compile", steps=12)
    assert counters["stats"]["unique_graphs"] <= warm


def test_modules_called_through_forward_are_refused_not_recorded_empty(tmp_path):
    """The same check in eager: a module called as ``m.forward(x)`` skips its hooks."""

    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc.forward(x)

    model = Direct()
    x, y = next(iter(batches("mlp", steps=1)))
    rec = gradscope.watch(model, tmp_path / "r")
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"\.forward\(\)"):
        rec.step()
    assert gradscope.load_run(tmp_path / "r").meta["status"] == "failed"


def test_a_sibling_instance_compiled_first_is_refused_or_recorded_with_hook_guards(tmp_path):
    """Dynamo does not guard on module hooks: a second instance of a class whose first instance
    was compiled and called runs that code, without gradscope's hooks. Refused, saying so; with
    ``skip_nnmodule_hook_guards = False`` Dynamo recompiles for the hooks and the step is recorded."""
    x, y = next(iter(batches("mlp", steps=1)))
    for guards in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        first, second = TinyMLP(), TinyMLP()
        old = torch._dynamo.config.skip_nnmodule_hook_guards
        torch._dynamo.config.skip_nnmodule_hook_guards = not guards
        try:
            torch.compile(first, backend="eager")(x)
            rec = gradscope.watch(second, tmp_path / f"guards-{guards}")
            torch.nn.functional.cross_entropy(torch.compile(second, backend="eager")(x), y).backward()
            if not guards:
                with pytest.raises(RuntimeError, match="another instance of its class"):
                    rec.step()
                continue
            rec.step()
            rec.close()
        finally:
            torch._dynamo.config.skip_nnmodule_hook_guards = old
        run = gradscope.load_run(tmp_path / "guards-True")
        assert run.meta["status"] == "finished"
        assert run.layers.act_std.notna().all()


@pytest.mark.slow
def test_changing_lengths_compile_no_more_graphs_than_without_gradscope(tmp_path):
    """Padding each batch to its longest sequence (or an epoch's short last batch) changes a
    length from step to step, and Dynamo then compiles one graph for every length. gradscope's
    statistics must not pin the length to ranges (a strided slice's bounds; Inductor's choice of
    how to accumulate a float32 sum over more than 4096 elements): each new range would recompile
    the model, up to Dynamo's cache limit. The figures at every length match eager."""
    from torch._dynamo.utils import counters

    from gradscope import models

    g = torch.Generator().manual_seed(0)
    data = [(ids, ids) for ids in (torch.randint(0, 64, (4, t), generator=g) for t in (64, 50, 17, 9))]
    graphs = {}
    for watched in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = models.create("transformer_lm_pre", depth=1, d_model=32, d_ff=64, heads=4, seq_len=128,
                              vocab_size=64)
        reference = copy.deepcopy(model)
        train(torch.compile(model), data, run=tmp_path / "compiled" if watched else None, lr=0.0)
        graphs[watched] = counters["stats"]["unique_graphs"]
    assert graphs[True] == graphs[False], graphs
    train(reference, data, run=tmp_path / "eager", lr=0.0)
    a, b = (_figures(gradscope.load_run(tmp_path / name)) for name in ("eager", "compiled"))
    assert a.index.equals(b.index) and len(a.index.unique("step")) == len(data)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-4, atol=1e-6)


def test_calls_around_a_model_compiled_in_place_are_removed_in_either_order():
    """Two recorders on a model compiled in place each wrap its compiled call; whichever is removed
    first stops running and the compiled call is back once both are."""
    from gradscope.recording.compilation import AroundCompiledCall

    model = torch.nn.Linear(2, 2)
    model.compile(backend="eager")
    compiled_call, x = model._compiled_call_impl, torch.randn(1, 2)
    for first in (0, 1):
        seen = []
        arounds = [AroundCompiledCall(model, lambda m, args, n=n: seen.append(f"{n}<"),
                                      lambda m, args, out, n=n: seen.append(f"{n}>")) for n in (0, 1)]
        model(x)
        assert seen == ["1<", "0<", "0>", "1>"]
        arounds[first].remove()
        seen.clear()
        model(x)
        assert seen == [f"{1 - first}<", f"{1 - first}>"]
        arounds[1 - first].remove()
        assert model._compiled_call_impl is compiled_call
        seen.clear()
        model(x)
        assert seen == []


class _ParametersDirectly(torch.nn.Module):
    """A forward that uses its layer's parameters without calling the layer."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.lin.weight, self.lin.bias)


@pytest.mark.parametrize("in_place", [False, True], ids=["torch.compile", "model.compile()"])
def test_a_compiled_forward_that_calls_no_module_is_refused_naming_that_cause(tmp_path, in_place):
    """Compiled after watch() (the order asked for), a forward that calls none of the model's
    modules ran no gradscope hook: refused, and the message says so beside the usual cause."""
    model = _ParametersDirectly()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if in_place:
        model.compile(backend="eager")
        runner = model
    else:
        runner = torch.compile(model, backend="eager")
    gradscope.watch(runner, tmp_path / "r", optimizer=opt)
    runner(torch.randn(2, 8)).sum().backward()
    with pytest.raises(RuntimeError, match="called none of the model's modules, using their parameters directly"):
        opt.step()
    assert gradscope.load_run(tmp_path / "r").meta["status"] == "failed"
    assert_no_hooks(model, opt)
