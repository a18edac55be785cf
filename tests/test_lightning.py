"""The Lightning callback: steps at optimizer steps, pre-clip gradients of the right step, AMP,
accumulation, DDP, and a clean detach after an exception."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradscope
from gradscope.testing import assert_no_hooks, assert_same_parameters

pytest.importorskip("pytorch_lightning")
from gradscope.integrations.lightning import GradScope, pl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Net(pl.LightningModule):
    """Notes the global gradient norm Lightning hands to on_before_optimizer_step and each loss."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fail_at, self.seen_norms, self.seen_losses = fail_at, [], []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.seen_losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad.flatten().float() for p in self.parameters() if p.grad is not None]
        self.seen_norms.append(torch.cat(grads).norm().item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g) * 3
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def _fit(module: Net, callbacks: list, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, _loader())
    return trainer


def test_pre_clip_gradients_of_each_step_and_the_post_clip_norm(tmp_path):
    module = Net()
    _fit(module, [GradScope(tmp_path / "r")], max_steps=5, gradient_clip_val=0.5)
    run = gradscope.load_run(tmp_path / "r")
    s = run.scalars.set_index("step")
    assert list(s.index) == [0, 1, 2, 3, 4]  # no step without gradients, none off by one
    assert s.grad_norm_pre_clip.tolist() == pytest.approx(module.seen_norms, rel=1e-5)
    assert s.grad_global_norm.tolist() == pytest.approx(module.seen_norms, rel=1e-5)
    clipped = np.array(module.seen_norms) > 0.5
    assert clipped.any()
    expected_post = np.where(clipped, 0.5, module.seen_norms)
    assert s.grad_norm_post_clip.to_numpy() == pytest.approx(expected_post, rel=1e-4)
    assert s.loss.tolist() == pytest.approx(module.seen_losses, rel=1e-6)
    assert s.lr.tolist() == [0.1] * 5
    assert run.meta["gradients"] == "pre-clip"
    assert run.meta["integration"]["framework"] == "lightning"
    assert run.meta["status"] == "finished"
    assert_no_hooks(module)


def test_accumulation_merges_micro_batches_and_training_is_unchanged(tmp_path):
    plain, watched = Net(), Net()
    _fit(plain, [], max_steps=3, accumulate_grad_batches=4)
    _fit(watched, [GradScope(tmp_path / "r")], max_steps=3, accumulate_grad_batches=4)
    assert_same_parameters(plain, watched, "Lightning with the GradScope callback")
    run = gradscope.load_run(tmp_path / "r")
    s = run.scalars.set_index("step")
    assert list(s.index) == [0, 1, 2]
    per_step = np.array(watched.seen_losses).reshape(3, 4).mean(1)  # Lightning divides each by 4
    assert s.loss.to_numpy() == pytest.approx(per_step, rel=1e-5)
    assert s.grad_global_norm.tolist() == pytest.approx(watched.seen_norms, rel=1e-5)
    assert {layer["calls"] for layer in run.meta["layers"]} == {4}  # four forwards in each step
    assert run.meta["integration"]["accumulate_grad_batches"] == 4


def test_bf16_mixed(tmp_path):
    module = Net()
    _fit(module, [GradScope(tmp_path / "r")], max_steps=3, precision="bf16-mixed")
    run = gradscope.load_run(tmp_path / "r")
    assert sorted(run.scalars.step) == [0, 1, 2]
    train = run.layers[run.layers.phase == "train"]
    assert np.isfinite(train.act_std).all() and np.isfinite(train.grad_out_norm).all()
    assert run.scalars.grad_global_norm.tolist() == pytest.approx(module.seen_norms, rel=1e-3)
    assert run.meta["integration"]["precision"] == "bf16-mixed"


def test_an_exception_detaches_and_marks_the_run_failed(tmp_path):
    module = Net(fail_at=3)
    callback = GradScope(tmp_path / "r")
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module, [callback], max_steps=6)
    assert callback.recorder is None
    assert_no_hooks(module)
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "failed"
    assert sorted(run.scalars.step) == [0, 1, 2]


def test_a_lightning_optimizer_is_unwrapped(tmp_path):
    from gradscope.recording.optimizers import unwrap_optimizer

    sgd = torch.optim.SGD(Net().parameters(), lr=0.1)
    wrapped = pl.core.optimizer.LightningOptimizer(sgd)
    assert unwrap_optimizer(wrapped) == (sgd, ["LightningSGD"])  # the class Lightning makes for it


def test_model_and_optimizer_come_from_the_trainer():
    with pytest.raises(TypeError, match="optimizer= is taken from the Trainer"):
        GradScope(optimizer=None)


@pytest.mark.slow
def test_ddp_example_two_processes(tmp_path):
    """The example under Lightning's DDP strategy (gloo): both ranks record, rank 0 writes one merged run."""
    cmd = [sys.executable, str(ROOT / "examples" / "lightning_gradscope.py"), "--run", str(tmp_path / "r"),
           "--steps", "4", "--devices", "2", "--accumulate", "2", "--clip", "0.05"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "finished"
    assert run.meta["env"]["world_size"] == 2
    s = run.scalars.set_index("step")
    assert list(s.index) == list(range(4))
    assert (s.grad_norm_pre_clip > 0.05).all()
    assert s.grad_norm_post_clip.to_numpy() == pytest.approx(0.05, rel=1e-4)
    assert np.isfinite(s.loss).all()


def test_watching_a_module_twice_through_the_callback_is_refused(tmp_path):
    module = Net()
    with gradscope.watch(copy.deepcopy(module), tmp_path / "other"):
        pass
    with gradscope.watch(module, tmp_path / "mine"), pytest.raises(RuntimeError, match="already watched"):
        _fit(module, [GradScope(tmp_path / "r")], max_steps=1)


def test_noise_scale_from_lightnings_gradient_accumulation(tmp_path):
    """GradScope(noise_scale=True) with accumulate_grad_batches=4 and clipping: each micro-batch's
    gradient (Lightning divides its loss by 4) is put back on its own scale, and the big batch's
    norm is the pre-clip one."""
    module = Net()
    initial = copy.deepcopy(module.net)
    _fit(module, [GradScope(tmp_path / "r", noise_scale=True)], max_steps=2, accumulate_grad_batches=4,
         gradient_clip_val=0.5)
    x, y = _loader().dataset.tensors
    own = []
    for i in range(4):  # step 0's micro-batches, at the initial weights
        initial.zero_grad()
        nn.functional.mse_loss(initial(x[16 * i:16 * (i + 1)]), y[16 * i:16 * (i + 1)]).backward()
        own.append(sum(float(p.grad.square().sum()) for p in initial.parameters()))
    s = gradscope.load_run(tmp_path / "r").scalars.set_index("step")
    assert s.grad_small_sq[0] == pytest.approx(np.mean(own), rel=1e-5)
    assert list(s.batch_small) == [16, 16] and list(s.batch_big) == [64, 64]
    table = gradscope.analyses.noise_scale(tmp_path / "r")
    assert table.g_big_sq.tolist() == pytest.approx(np.square(module.seen_norms).tolist(), rel=1e-5)  # pre-clip


class _NoReads(Net):
    """``Net`` without its host reads (``.item()``): a compiled ``training_step`` keeps one graph."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def on_before_optimizer_step(self, optimizer):
        pass


def test_a_compiled_lightning_module_records_as_eager_and_trains_unchanged(tmp_path):
    """``trainer.fit(torch.compile(module))``, as Lightning documents it: Lightning unwraps the module
    and compiles its ``forward`` and ``training_step``. The callback watches at fit start, before the
    first compiled call, so the probes are traced into that graph: figures as eager, training as
    without the callback, no graph break."""
    from torch._dynamo.utils import counters

    def fit(module, callbacks, compiled):
        torch._dynamo.reset()  # each fit compiles its own code (Dynamo shares it between instances)
        counters.clear()
        _fit(torch.compile(module, backend="aot_eager") if compiled else module, callbacks, max_steps=6)
        return dict(counters["graph_break"]), counters["stats"]["unique_graphs"]

    eager, compiled, unwatched = _NoReads(), _NoReads(), _NoReads()
    fit(eager, [GradScope(tmp_path / "eager", every=2)], compiled=False)
    breaks, graphs = fit(compiled, [GradScope(tmp_path / "compiled", every=2)], compiled=True)
    fit(unwatched, [], compiled=True)
    assert breaks == {} and graphs >= 1  # it did run compiled, in one piece
    assert_same_parameters(unwatched, compiled, "a compiled LightningModule with the GradScope callback")
    runs = [gradscope.load_run(tmp_path / name) for name in ("eager", "compiled")]
    layers = [r.layers[r.layers.phase == "train"].set_index(["step", "layer"]).sort_index() for r in runs]
    assert list(layers[1].index.unique("step")) == [0, 2, 4]
    for column in ("act_mean", "act_std", "act_absmax", "grad_out_norm", "grad_norm", "param_norm"):
        assert layers[1][column].to_numpy() == pytest.approx(layers[0][column].to_numpy(), rel=1e-5, abs=1e-7), column
    assert_no_hooks(compiled)
    torch._dynamo.reset()
