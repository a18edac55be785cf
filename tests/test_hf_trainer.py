"""The Hugging Face Trainer callback: post-clip statistics at on_pre_optimizer_step, the Trainer's
own pre-clip norm and loss from its logs, accumulation, and training left unchanged."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradscope
from gradscope.testing import assert_no_hooks, assert_same_parameters

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from gradscope.integrations.hf import GradScopeCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_trainer_gradscope.py"


class Logs(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.train: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train.append(dict(logs))


def _train(tmp_path: Path, callbacks: list, accumulate: int = 1, clip: float = 0.5, **more_args):
    example = runpy.run_path(str(EXAMPLE))  # its dataset, without running its main()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate, max_grad_norm=clip, learning_rate=1e-3, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, **more_args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=example["Sequences"](n=64),
                                   callbacks=callbacks)
    trainer.train()
    return model


@pytest.mark.parametrize("accumulate", [1, 3])
def test_trainer_records_post_clip_statistics_and_its_own_pre_clip_norm(tmp_path, accumulate):
    logs = Logs()
    model = _train(tmp_path, [GradScopeCallback(tmp_path / "r", noise_scale=True), logs], accumulate=accumulate)
    assert_no_hooks(model)  # detached at on_train_end
    run = gradscope.load_run(tmp_path / "r")
    s = run.scalars.set_index("step")
    assert list(s.index) == [0, 1, 2, 3, 4]
    logged_norm = np.array([log["grad_norm"] for log in logs.train])
    assert s.loss.tolist() == pytest.approx([log["loss"] for log in logs.train], rel=1e-6)
    assert s.grad_norm_pre_clip.to_numpy() == pytest.approx(logged_norm, rel=1e-5)
    assert (logged_norm > 0.5).all()  # every step clipped: the statistics are the clipped gradients'
    assert s.grad_norm_post_clip.to_numpy() == pytest.approx(0.5, rel=1e-4)
    assert s.grad_global_norm.to_numpy() == pytest.approx(0.5, rel=1e-4)
    assert run.meta["gradients"] == "post-clip"
    assert run.meta["optimizer"]["wrapped_by"] == ["AcceleratedOptimizer"]
    facts = run.meta["integration"]
    assert facts["framework"] == "transformers" and facts["gradient_accumulation_steps"] == accumulate
    first_block = next(layer for layer in run.meta["layers"] if layer["name"].startswith("transformer.h.0."))
    assert first_block["calls"] == accumulate  # micro-batches merge into their optimizer step
    # the noise scale's small batches: each micro-batch, its samples counted from input_ids=
    assert (s.small_batches == accumulate).all() and (s.batch_small == 4).all()
    if accumulate == 1:
        with pytest.raises(ValueError, match="accumulation"):
            gradscope.analyses.noise_scale(run)
    else:
        table = gradscope.analyses.noise_scale(run)  # the big batch's norm: the Trainer's pre-clip one
        assert table.g_big_sq.to_numpy() == pytest.approx(logged_norm ** 2, rel=1e-5)


def test_training_is_unchanged_by_the_callback(tmp_path):
    plain = _train(tmp_path / "a", [])
    watched = _train(tmp_path / "b", [GradScopeCallback(tmp_path / "r")])
    assert_same_parameters(plain, watched, "the HF Trainer with GradScopeCallback")


def test_a_compiled_model_records_as_eager_and_trains_unchanged(tmp_path):
    """``TrainingArguments(torch_compile=True)``: the Trainer compiles the model before training
    begins and the callback watches at ``on_train_begin``, before its first compiled call, so the
    probes are traced into the graph. Figures as eager; training as without the callback."""
    from torch._dynamo.utils import counters

    def train(name, callbacks, **compiled):
        torch._dynamo.reset()  # each its own code (Dynamo shares code between instances of a class)
        counters.clear()
        model = _train(tmp_path / name, callbacks, **compiled)
        return model, counters["stats"]["unique_graphs"]

    compiled = {"torch_compile": True, "torch_compile_backend": "aot_eager"}
    train("eager", [GradScopeCallback(tmp_path / "eager", every=2)])
    watched, graphs = train("compiled", [GradScopeCallback(tmp_path / "compiled", every=2)], **compiled)
    unwatched, _ = train("unwatched", [], **compiled)
    assert graphs >= 1  # it did run compiled
    assert_same_parameters(unwatched, watched, "the HF Trainer compiling the model, with GradScopeCallback")
    runs = [gradscope.load_run(tmp_path / name) for name in ("eager", "compiled")]
    layers = [r.layers[r.layers.phase == "train"].set_index(["step", "layer"]).sort_index() for r in runs]
    assert list(layers[1].index.unique("step")) == [0, 2, 4]
    assert layers[1].index.equals(layers[0].index)
    for column in ("act_std", "act_absmax", "grad_out_norm", "grad_norm", "param_norm"):
        assert layers[1][column].to_numpy() == pytest.approx(layers[0][column].to_numpy(), rel=1e-5, abs=1e-7), column
    torch._dynamo.reset()


def test_model_and_optimizer_come_from_the_trainer():
    with pytest.raises(TypeError, match="model= is taken from the Trainer"):
        GradScopeCallback(model=None)


def test_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--run", str(tmp_path / "r"), "--steps", "3", "--accumulate", "2"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "grad_norm_pre_clip" in capsys.readouterr().out
    run = gradscope.load_run(tmp_path / "r")
    assert sorted(run.scalars.step) == [0, 1, 2] and run.meta["status"] == "finished"
