"""The overhead benchmark's arithmetic and a smoke run (its timings are not asserted)."""

from __future__ import annotations

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
