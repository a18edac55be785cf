"""The overhead benchmark's arithmetic and a smoke run (its timings are not asserted)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
overhead = pytest.importorskip("overhead")


def test_schedule_mean_counts_the_recorded_step_once_per_period():
    # two blocks of ten: the recorded step (position 5) costs 11 and 21, the others 1 (one stall: 50)
    blocks = [[1.0] * 10, [1.0] * 10]
    blocks[0][5], blocks[1][5], blocks[1][2] = 11.0, 21.0, 50.0
    assert overhead.schedule_mean(blocks, 10, 5) == pytest.approx((16.0 + 9 * 1.0) / 10)
    assert overhead.schedule_mean(blocks, 1) == 1.0  # every step recorded: the plain median


def test_bench_workload_runs_every_variant_and_leaves_no_hook(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = (torch.randn(4, 8), torch.randint(0, 4, (4,)))
    rows = overhead.bench_workload("tiny", (lambda: model, lambda d: batch, None), torch.device("cpu"),
                                   10, tmp_path, "every,empty,naive")
    names = [r[1] for r in rows]
    assert names[:2] == ["none", "empty hooks (floor, not a tool)"] and "gradscope every=10" in names
    assert all(math.isfinite(r[2]) and r[3] > 0 for r in rows)
    assert rows[0][3] == 1.0  # none against itself
    # the gradscope variants really recorded: warm-up 15 steps + 10 timed, every step or every 10th
    import gradscope

    recorded = sorted(len(gradscope.load_run(p).scalars) for p in tmp_path.glob("gradscope-*"))
    assert recorded == [3, 25]


def test_only_picks_workloads_by_any_of_its_fragments():
    workloads = {"resnet56 b128": 1, "pre-LN 12x512 b32 bf16": 2, "resnet50 224 b128 bf16": 3, "gpt2-small": 4}
    assert list(overhead.selected(workloads, "gpt2, resnet50")) == ["resnet50 224 b128 bf16", "gpt2-small"]
    assert list(overhead.selected(workloads, "resnet")) == ["resnet56 b128", "resnet50 224 b128 bf16"]
    assert overhead.selected(workloads, None) == workloads


def test_above_floor_is_gradscope_every_1_minus_the_empty_hooks():
    rows = [("w", "none", 10.0, 1.0), ("w", "empty hooks (floor, not a tool)", 11.0, 1.1),
            ("w", "gradscope every=1", 12.5, 1.25), ("w", "gradscope every=10", 10.5, 1.05)]
    assert overhead.above_floor(rows) == pytest.approx(0.15)
    assert overhead.above_floor([r for r in rows if "empty" not in r[1]]) is None


def test_the_resnet50_workload_is_torchvisions_size_and_gradscope_finds_its_blocks(tmp_path):
    from imagenet_resnet import ResNet50

    import gradscope

    torch.manual_seed(0)
    model = ResNet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032  # torchvision.models.resnet50()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, tmp_path / "r50", optimizer=opt) as rec:
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
        loss.backward()
        rec.step(loss=loss)
        opt.step()
    run = gradscope.load_run(tmp_path / "r50")
    blocks = {b["name"]: b for b in run.meta["blocks"]}
    assert list(blocks) == [f"layer{s + 1}.{b}" for s, n in enumerate((3, 4, 6, 3)) for b in range(n)]
    changed = sorted(name for name, b in blocks.items() if b["reason"])  # each stage's first block
    assert changed == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    kept = run.blocks.set_index("block").drop(changed)
    assert len(kept) == 12 and kept["id_rel_residual"].gt(0).all() and kept["grad_out_norm"].gt(0).all()


needs_gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def _nproc_args(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{"nproc": 2, "steps": 10, "threads": 1, "timeout": 240.0, "only": "smoke",
                                 "variants": None, **changes})


def test_rank_parts_split_the_batch_once():
    batch = (torch.arange(10).float().unsqueeze(1), torch.arange(10))
    parts = [overhead.rank_part(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[1] for p in parts]), batch[1])
    assert [len(p[0]) for p in parts] == [4, 3, 3]


@pytest.mark.slow
@needs_gloo
def test_nproc_2_times_ddp_and_records_one_run_per_variant(tmp_path):
    import gradscope

    rows = overhead.launch_ddp(_nproc_args(), tmp_path)
    for kind in ("max", "rank0"):  # each step's slowest rank, and rank 0 alone
        got = rows["smoke mlp b8"][kind]
        assert [r[1] for r in got] == ["none", "gradscope every=1", "gradscope every=10"]
        assert got[0][3] == 1.0 and all(math.isfinite(r[2]) and r[3] > 0 for r in got)
    # both ranks watched with the same path, one run each: warm-up 15 steps + 10 timed
    recorded = {p.name: len(gradscope.load_run(p).scalars) for p in tmp_path.glob("gradscope-ddp-*")}
    assert recorded == {"gradscope-ddp-0-every1": 25, "gradscope-ddp-0-every10": 3}


@pytest.mark.slow
@needs_gloo
def test_nproc_stops_every_process_when_one_fails(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nif os.environ.get('RANK') == '1' and '--ddp-worker' in sys.argv:\n"
        "    raise SystemExit('injected failure')\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    with pytest.raises(SystemExit, match=r"rank 1 exited with status 1(.|\n)*injected failure"):
        overhead.launch_ddp(_nproc_args(variants="none"), tmp_path)  # rank 0 waits for rank 1 until stopped


@pytest.mark.slow  # Inductor compiles two small models: about 30 s on 2 cores, cold
def test_the_census_tells_the_statistics_loops_from_the_models(tmp_path):
    from inductor_census import census, describe

    import gradscope
    from gradscope.testing import TinyCNN

    def loops(watched: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TinyCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        rec = gradscope.watch(model, tmp_path / f"r{watched}", optimizer=opt) if watched else None
        compiled = torch.compile(model)
        no_cache = (torch._inductor.config.patch(fx_graph_cache=False),  # a cache hit generates nothing
                    torch._functorch.config.patch(enable_autograd_cache=False))
        with no_cache[0], no_cache[1], census() as tally:
            loss = torch.nn.functional.cross_entropy(compiled(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
            loss.backward()
        if rec is not None:
            rec.step(loss=loss)
            rec.close()
        return tally

    try:
        plain, watched = loops(False), loops(True)
    finally:
        torch._dynamo.reset()
    assert plain["model"] > 0 and plain["fused"] == plain["own, large"] == plain["own, small"] == 0
    assert watched["model"] > 0 and watched["fused"] + watched["own, large"] + watched["own, small"] > 0
    assert describe(watched).startswith(f"model {watched['model']}, fused {watched['fused']}")
