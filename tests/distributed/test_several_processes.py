"""Several processes (docs/design.md, "Several processes"): jobs of 2 and 4 gloo CPU processes
started by the tests, compared with the same model trained in one process on the whole batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import compare  # noqa: E402
import scenarios  # noqa: E402
from launch import run_job  # noqa: E402

import gradscope  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

TWO = ["ddp", "every3", "bn", "fsdp2", "fsdp1_orig", "fsdp1_flat", "fsdp1_blocks", "watch_first", "observer",
       "disagree", "noise", "compiled", "compiled_fsdp2", "regional_fsdp2"]


def _job(tmp_path_factory, world: int, names: list[str]) -> Path:
    out = tmp_path_factory.mktemp(f"job{world}")
    ranks = run_job(world, out, names)
    for rank, r in enumerate(ranks):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    return _job(tmp_path_factory, 2, TWO)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> Path:
    return _job(tmp_path_factory, 4, ["hsdp", "ddp"])


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, gradscope.Run]:
    root = tmp_path_factory.mktemp("references")
    return {"mlp": compare.reference(root / "mlp"), "eval": compare.reference(root / "eval", eval_at=1),
            "every3": compare.reference(root / "every3", every=3, flush_every=2, eval_at=1),
            "no_optimizer": compare.reference(root / "no_optimizer", optimizer=False)}


def _result(out: Path, name: str, rank: int) -> dict:
    return json.loads((out / f"{name}.rank{rank}.json").read_text())


def _assert_matches(run: gradscope.Run, ref: gradscope.Run) -> None:
    assert run.status == "finished", run.meta["errors"]
    for table in ("layers", "blocks", "scalars"):
        compare.assert_same(run, ref, table)


def test_ddp_statistics_equal_one_process_over_the_global_batch(two, references):
    run = gradscope.load_run(two / "ddp")
    _assert_matches(run, references["eval"])  # names without "module.", every statistic to 1e-5
    assert run.meta["env"]["world_size"] == 2
    assert run.meta["env"]["processes"]["wrappers"] == ["DistributedDataParallel"]
    assert run.scalars.loc[run.scalars.step == 2, "eval_loss"].tolist() == [0.5]  # rank 0's own evaluation
    assert [layer["calls"] for layer in run.meta["layers"]] == [1] * len(run.meta["layers"])


def test_only_rank_0_writes(two):
    """One run directory per scenario, rank 0's, holding only gradscope's files."""
    assert sorted(p.name for p in two.iterdir() if p.is_dir()) == sorted(TWO)
    assert all(_result(two, "ddp", r)["run"] == str(two / "ddp") for r in range(2))
    assert sorted(p.name for p in (two / "ddp").iterdir()) == sorted(
        [".gradscope.lock", "meta.json", "layers", "blocks", "scalars", "layers_by_rank", "blocks_by_rank",
         "scalars_by_rank"])


def test_the_recorder_is_an_observer_under_ddp(two):
    assert all(_result(two, "observer", rank)["identical"] for rank in range(2))


def test_no_collective_per_step_one_per_flush(two):
    """flush_every=3: the flush after step 3's end (four scheduled steps held) and the one at close."""
    for rank in range(2):
        result = _result(two, "ddp", rank)
        assert result["collectives_per_step"] == [0, 0, 0, 1, 0, 0]
        assert result["collectives_at_close"] == 1


def test_every_n_schedules_agree_across_ranks(two, references):
    run = gradscope.load_run(two / "every3")
    _assert_matches(run, references["every3"])
    assert sorted(run.layers.step.unique()) == [0, 3]
    assert run.scalars.step.tolist() == [0, 2, 3]  # step 2: rank 0's evaluation off the schedule
    by_rank = run.layers_by_rank
    steps = {rank: sorted(by_rank[by_rank["rank"] == rank].step.unique()) for rank in (0, 1)}
    assert steps == {0: [0, 3], 1: [0, 3]}


@pytest.mark.parametrize("name", ["compiled", "compiled_fsdp2", "regional_fsdp2"])
def test_a_compiled_ddp_or_fsdp2_model_records_as_one_process_eager(two, references, name):
    """``torch.compile(DDP(model))`` and ``torch.compile(fully_shard(model))`` after ``watch()``,
    and torchtitan's order (each block compiled on its own, then sharded, then watched): the
    probes traced into the graphs (DDP's buckets and FSDP2's hooks split them) merge across the
    ranks like the eager ones."""
    run = gradscope.load_run(two / name)
    assert run.meta["env"]["compiled"]
    _assert_matches(run, references["every3"])


def test_per_rank_tables_hold_each_ranks_own_statistics(two):
    run = gradscope.load_run(two / "ddp")
    scalars = run.scalars_by_rank
    for rank in range(2):
        losses = _result(two, "ddp", rank)["losses"]
        mine = scalars[scalars["rank"] == rank].sort_values("step")
        np.testing.assert_allclose(mine.loss.to_numpy(), losses, rtol=1e-6)
    # the merged mean of an equal split is the mean of the ranks' means
    layers = run.layers_by_rank
    for step in (0, 5):
        per_rank = layers[(layers.step == step) & (layers.layer == "2.1.lin")].sort_values("rank")
        merged = run.layers[(run.layers.step == step) & (run.layers.layer == "2.1.lin")]
        assert per_rank["rank"].tolist() == [0, 1]
        assert merged.act_mean.item() == pytest.approx(per_rank.act_mean.mean(), rel=1e-5)
        assert merged.act_absmax.item() == pytest.approx(per_rank.act_absmax.max(), rel=1e-6)
        # each rank's dL/dy is of its own mean loss: the merged one is of the ranks' mean loss
        expected = np.sqrt((per_rank.grad_out_norm.to_numpy() ** 2).sum()) / 2
        assert merged.grad_out_norm.item() == pytest.approx(expected, rel=1e-5)


def test_per_rank_is_off_by_default(two):
    run = gradscope.load_run(two / "fsdp2")
    assert run.layers_by_rank.empty and not (two / "fsdp2" / "layers_by_rank").exists()


def test_ddp_with_batchnorm_runs_and_records(two):
    run = gradscope.load_run(two / "bn")
    assert run.status == "finished"
    assert [layer["name"] for layer in run.meta["layers"]] == ["0", "1", "2", "3"]
    assert run.layers.groupby("step").size().tolist() == [4] * scenarios.STEPS
    assert np.isfinite(run.layers[["act_std", "grad_out_norm"]].to_numpy()).all()
    assert np.isfinite(run.layers.loc[run.layers.layer != "2", "grad_norm"]).all()


@pytest.mark.parametrize("name", ["fsdp2", "fsdp1_orig", "fsdp1_flat", "fsdp1_blocks"])
def test_sharded_norms_equal_the_unsharded_models(two, references, name):
    """FSDP2 and FSDP1 (use_orig_params on and off, wrapping leaves or blocks): parameter and
    gradient norms of the full tensors, and every other statistic, as in one process."""
    run = gradscope.load_run(two / name)
    _assert_matches(run, references["mlp"])
    wrapper = "fully_shard" if name == "fsdp2" else "FullyShardedDataParallel"
    assert run.meta["env"]["processes"]["wrappers"] == [wrapper]
    ref_table = [(layer["name"], layer["type"], layer["params"]) for layer in references["mlp"].meta["layers"]]
    assert [(layer["name"], layer["type"], layer["params"]) for layer in run.meta["layers"]] == ref_table


def test_watch_before_fully_shard(two, references):
    """fully_shard after watch() replaces the parameters: the recorder follows them."""
    run = gradscope.load_run(two / "watch_first")
    _assert_matches(run, references["no_optimizer"])
    assert run.meta["env"]["processes"]["wrappers"] == ["fully_shard"]


def test_hsdp_on_a_2x2_mesh(four, references):
    run = gradscope.load_run(four / "hsdp")
    _assert_matches(run, references["mlp"])
    processes = run.meta["env"]["processes"]
    assert processes["world_size"] == 4 and processes["mesh_shape"] == [2, 2]
    assert processes["mesh_dim_names"] == ["replicate", "shard"]


def test_ddp_on_4_processes(four, references):
    _assert_matches(gradscope.load_run(four / "ddp"), references["eval"])


def test_ranks_with_other_settings_all_refuse(two):
    errors = [_result(two, "disagree", rank)["error"] for rank in range(2)]
    assert all(e and "rank 1's every differ" in e for e in errors), errors
    assert gradscope.load_run(two / "disagree").status == "failed"


def test_a_rank_that_raises_fails_the_run_and_leaves_no_process(tmp_path):
    ranks = run_job(2, tmp_path, ["fail"], timeout=60)
    assert [r.returncode for r in ranks] == [1, 1], [r.stderr[-2000:] for r in ranks]  # both ended by themselves
    assert "boom at step 2 on rank 1" in ranks[1].stderr
    run = gradscope.load_run(tmp_path / "fail")
    assert run.status == "failed"
    assert any("rank 1 failed: ValueError: boom at step 2 on rank 1" in e for e in run.meta["errors"])
    assert run.meta["schedule"]["dropped_step"] == 2


def test_a_rank_that_fails_after_training_is_not_waited_for(tmp_path):
    """Rank 1 raises after its last step and stays alive 8 s: rank 0's closing merge stops
    waiting for it within seconds (the failure note in the job's store), and fails the run."""
    ranks = run_job(2, tmp_path, ["fail_late"], timeout=60)
    assert [r.returncode for r in ranks] == [0, 1], [r.stderr[-2000:] for r in ranks]
    result = _result(tmp_path, "fail_late", 0)
    assert result["close_seconds"] < 5, result
    assert "rank 1 failed: ValueError: late boom on rank 1" in result["error"]
    run = gradscope.load_run(tmp_path / "fail_late")
    assert run.status == "failed"
    assert any("rank 1 failed: ValueError: late boom on rank 1" in e for e in run.meta["errors"])
    assert sorted(run.scalars.step) == [0, 1, 2, 3]  # the first flush's steps were merged and written


def test_fsdp2_in_a_job_of_one_process(tmp_path, references):
    """torchrun with one process: the parameters are still DTensors, their local tensors are whole."""
    ranks = run_job(1, tmp_path, ["fsdp2"])
    assert ranks[0].returncode == 0, ranks[0].stderr[-3000:]
    run = gradscope.load_run(tmp_path / "fsdp2")
    _assert_matches(run, references["mlp"])
    assert run.meta["env"]["world_size"] == 1


def test_noise_scale_from_every_ranks_micro_batches(two):
    """2 ranks x 2 micro-batches of 8: the small batches are each rank's micro-batches (taken
    before DDP averages them), the big one the step's 32 samples; over 1,000 steps the estimates
    match the per-example truth to 5%."""
    table = gradscope.analyses.noise_scale(two / "noise")
    assert (table.b_small == 8).all() and (table.b_big == 32).all() and len(table) == 1000
    x, y = scenarios.noise_problem()
    g_sq, trace = scenarios.per_example_truth(scenarios.noise_model(), x, y)
    assert table.g_sq.mean() == pytest.approx(g_sq, rel=0.05)
    assert table.trace_sigma.mean() == pytest.approx(trace, rel=0.05)
