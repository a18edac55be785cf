"""The trainer: family recipes, schedules, and a recorded run with held-out accuracy."""

from __future__ import annotations

import math

import pytest
import torch

import gradscope
from gradscope.lab.train import build, lr_factor, recipe_for, resolve_device, train


def test_recipes_follow_each_family():
    r = recipe_for("resnet56", 64000)
    assert (r.optimizer, r.lr, r.momentum, r.weight_decay, r.batch_size) == ("sgd", 0.1, 0.9, 1e-4, 128)
    f = lr_factor(r, 64000)
    assert [f(0), f(31999), f(32000), f(47999), f(48000)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1),
                                                              pytest.approx(0.01)]
    deep = recipe_for("plain110", 64000)
    assert deep.warmup_steps == 400
    assert lr_factor(deep, 64000)(399) == pytest.approx(0.1) and lr_factor(deep, 64000)(400) == 1.0
    t = recipe_for("transformer_lm_post", 1000)
    assert t.optimizer == "adam" and t.warmup_steps == 100
    ft = lr_factor(t, 1000)
    assert ft(0) == pytest.approx(0.01) and ft(99) == 1.0 and ft(399) == pytest.approx(0.5)
    assert recipe_for("mlp_plain", 10).schedule == "constant"


def test_build_matches_model_and_task():
    model, task = build("transformer_lm_pre", overrides={"depth": 2, "seq_len": 16})
    assert task.name == "dyck" and task.train_inputs.shape[1] == 16
    assert model.embed.tokens.num_embeddings == task.model_overrides["vocab_size"]
    with pytest.raises(ValueError, match="fixes num_classes=10"):
        build("resnet20", overrides={"num_classes": 100})
    with pytest.raises(ValueError, match="no setting"):
        build("resnet20", overrides={"colour": 1})


def test_device_and_amp_checks():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="AMP"):
            train("mlp_plain", steps=1, amp=True, out="unused", progress=False)


@pytest.mark.parametrize("name, overrides, task", [
    ("mlp_residual", {"depth": 4, "width": 16}, None),
    ("transformer_seq2seq_post", {"depth": 1, "seq_len": 8, "d_model": 16}, "copy"),
])
def test_train_records_a_run_with_eval_accuracy(name, overrides, task, tmp_path):
    result = train(name, task=task, steps=6, every=2, out=tmp_path, overrides=overrides, batch_size=16,
                   eval_every=2, progress=False)
    run = gradscope.load_run(result.run)
    assert run.status == "finished" and result.run == tmp_path / name
    trained = run.scalars.dropna(subset=["loss"])
    assert trained.step.tolist() == [0, 2, 4]
    assert trained.accuracy.between(0, 1).all() and trained.lr.notna().all()
    evals = run.scalars.dropna(subset=["eval_accuracy"])
    assert len(evals) >= 3 and evals.eval_loss.gt(0).all()
    assert run.meta["task"]["name"] == (task or "images") and run.meta["recipe"]["steps"] == 6
    assert run.meta["model"]["registry_name"] == name
    assert math.isfinite(result.final_loss) and 0 <= result.final_eval_accuracy <= 1


def test_training_is_reproducible_by_seed(tmp_path):
    runs = [train("mlp_plain", steps=3, every=1, out=tmp_path / str(i), overrides={"depth": 3, "width": 8},
                  batch_size=8, seed=7, progress=False) for i in range(2)]
    a, b = (gradscope.load_run(r.run).scalars.loss.dropna().tolist() for r in runs)
    assert a == b
