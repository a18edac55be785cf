"""One schema (gradscope.store.schema): everything about a statistic is derived from its declaration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import gradscope
from gradscope.recording.moments import activation_moments
from gradscope.store import reader, schema
from gradscope.store.schema import BLOCK, COUNTS, LAYER, STEP, HostCounts, Merge, merge_partial
from gradscope.testing import TinyMLP

ROOT = Path(__file__).resolve().parents[1]


def test_names_are_unique_and_references_resolve():
    for layout in (LAYER, BLOCK, STEP):
        names = [a.name for a in layout.accumulators]
        assert len(names) == len(set(names)) == layout.width
        assert [layout.index[n] for n in names] == list(range(layout.width))
    counts = {c.name for c in COUNTS}
    for acc in schema.ACCUMULATORS:
        assert acc.count in counts, f"{acc.name}: unknown count {acc.count}"
        if acc.merge is Merge.WEIGHTED_VARIANCE:
            assert acc.mean is not None and schema.LAYER[acc.mean].merge is Merge.WEIGHTED
    for table in schema.TABLES:
        names = [c.name for c in schema.columns(table)]
        assert len(names) == len(set(names)) and names
        stored_as_computed = table in ("attribution", *schema.ANALYSES)
        assert all(c.finalize is not None for c in schema.columns(table)) == (not stored_as_computed)


def test_hot_path_constants_are_the_layout():
    assert (schema.ACT_MEAN, schema.ACT_VAR, schema.GRAD_OUT_SS) == tuple(
        LAYER.index[n] for n in ("act_mean", "act_var", "grad_out_ss"))
    assert schema.B_TOKEN_COS_SUM == BLOCK.index["token_cos_sum"]
    assert schema.LOSS_SCALE == STEP.index["loss_scale"]
    assert [a.name for a in schema.ACTIVATION] == ["act_mean", "act_var", "act_absmax", "act_nonzero", "act_saturated"]


def test_host_counts_follow_the_declarations():
    counts = HostCounts(slots=3, layers=4, blocks=2)
    shapes = {"phase_layer": (3, 2, 4), "layer": (3, 4), "block": (3, 2), "step": (3,), "step_stat": (3, STEP.width)}
    for c in COUNTS:
        array = getattr(counts, c.name)
        assert array.shape == shapes[c.per] and array.dtype == np.dtype(c.dtype), c.name
        assert np.isnan(array).all() if c.dtype == "float64" else not array.any()
    counts.act_n[1, 0, 2] = 7
    counts.lr[1, 3] = 0.1
    taken = counts.take(2)
    assert taken.act_n[1, 0, 2] == 7 and taken.lr[1, 3] == 0.1 and taken.slots == 2
    counts.move(1, 0)
    counts.clear(1)
    assert counts.act_n[0, 0, 2] == 7 and counts.act_n[1].sum() == 0 and np.isnan(counts.lr[1]).all()


def test_a_cleared_slot_is_a_fresh_one_and_the_others_are_kept():
    """Slots are reused after a flush: ``clear`` (in place) must leave nothing of the old step."""
    counts, fresh = HostCounts(slots=3, layers=4, blocks=2), HostCounts(slots=1, layers=4, blocks=2)
    for c in COUNTS:
        getattr(counts, c.name)[...] = True if c.dtype == "bool" else 5
    counts.clear(1)
    for c in COUNTS:
        array = getattr(counts, c.name)
        np.testing.assert_array_equal(array[1], getattr(fresh, c.name)[0], err_msg=c.name)
        assert (array[[0, 2]] == (True if c.dtype == "bool" else 5)).all(), c.name


def test_reader_dtypes_are_the_schema():
    assert list(reader.LAYER_SCHEMA) == ["step", "phase", "layer", *(c.name for c in schema.columns("layers"))]
    assert reader.STEP_SCHEMA["grad_global_norm"] == "float64"
    assert reader.BLOCK_SCHEMA["token_cos"] == "float32"


def _moments(y: torch.Tensor, bounds=(0.0, 1.0)) -> list[torch.Tensor]:
    return activation_moments(y, bounds, count_zeros=True)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_merging_two_partial_accumulators_gives_the_whole(backend):
    """The declared merges are exact: halves of a tensor (two calls, micro-batches or ranks)
    merge to the accumulator of the whole, even with a mean large against the spread."""
    g = torch.Generator().manual_seed(0)
    y = 1000.0 + torch.sigmoid(torch.randn(3000, generator=g)).relu()
    y[:100] = 0.0
    a, b = y[:1000], y[1000:]
    parts_a, parts_b, whole = _moments(a), _moments(b), _moments(y)
    if backend == "torch":
        merged = merge_partial(schema.ACTIVATION, torch.stack(parts_a), torch.stack(parts_b), a.numel(), b.numel())
        merged = [float(v) for v in merged]
    else:
        merged = merge_partial(schema.ACTIVATION, np.array([float(v) for v in parts_a], np.float64)[:, None],
                               np.array([float(v) for v in parts_b], np.float64)[:, None],
                               np.array([a.numel()]), np.array([b.numel()]))
        merged = [float(v[0]) for v in merged]
    expected = [float(v) for v in whole]
    assert merged[0] == pytest.approx(expected[0], rel=1e-6)  # mean
    assert merged[1] == pytest.approx(float(y.double().var(correction=0)), rel=1e-3)  # variance
    assert merged[2:] == expected[2:]  # max |y|, nonzero and saturated counts


def test_merge_rules_for_sum_max_min_and_empty_cells():
    accs = tuple(schema.Accumulator(n, "layers", m, "act_n", "-", "-")
                 for n, m in (("s", Merge.SUM), ("hi", Merge.MAX), ("lo", Merge.MIN), ("w", Merge.WEIGHTED)))
    a, b = np.array([[1.0], [2.0], [2.0], [5.0]]), np.array([[3.0], [1.0], [1.0], [9.0]])
    s, hi, lo, w = merge_partial(accs, a, b, np.array([0]), np.array([4]))
    assert (s[0], hi[0], lo[0], w[0]) == (4.0, 2.0, 1.0, 9.0)  # a's cell is empty: the mean is b's


def test_stored_parquet_columns_are_the_schema(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, tmp_path / "r", optimizer=opt, blocks=["0"]) as rec:
        for _ in range(2):
            opt.zero_grad()
            loss = model(torch.randn(4, 8)).square().mean()
            loss.backward()
            rec.step(loss=loss)
            opt.step()
    for table in ("layers", "blocks", "scalars"):
        part = sorted((tmp_path / "r" / table).glob("part-*.parquet"))[0]
        names = pq.read_schema(part).names
        assert names == [*schema.KEYS[table], *(c.name for c in schema.columns(table))]


def test_design_document_carries_the_schema():
    """docs/design.md holds the generated tables; regenerate them with
    ``python -c "from gradscope.store import schema; print(schema.markdown(), end='')"``."""
    text = (ROOT / "docs" / "design.md").read_text()
    begin, end = "<!-- schema:begin -->\n", "<!-- schema:end -->"
    assert begin in text and end in text
    assert text[text.index(begin) + len(begin):text.index(end)] == schema.markdown()
