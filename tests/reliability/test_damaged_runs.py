"""Damaged runs: the error names the file that is damaged and says what is wrong, in one line.

Issue 18, item 6. tests/test_store.py covers truncated parts, an unknown schema version, a cut
meta.json and a part of an older release lacking a statistic; these cover the parts whose
columns do not fit their table, and a meta.json too deep for the JSON parser.
"""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from gradscope.cli.main import main

import gradscope
from gradscope.store import RunError
from gradscope.testing import train_reference


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A small run with layer, block and scalar parts (mlp_residual: 4 layers deep, 3 steps)."""
    path = tmp_path_factory.mktemp("damaged") / "template"
    train_reference("mlp_residual", {"depth": 4, "width": 16, "input_size": 8}, run=path, steps=3)
    return path


@pytest.fixture
def run(template, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(template, path, ignore=shutil.ignore_patterns(".gradscope.lock"))
    return path


def first_part(run, table):
    return sorted((run / table).glob("part-*.parquet"))[0]


def rewrite(part, change):
    pq.write_table(change(pq.read_table(part)), part)


def assert_blames(run, part, *fragments):
    with pytest.raises(RunError) as info:
        gradscope.load_run(run)
    message = str(info.value)
    assert str(part) in message and "meta.json" not in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("table, column", [
    ("layers", "step"), ("layers", "phase"), ("layers", "layer"), ("blocks", "step"), ("blocks", "block"),
    ("scalars", "step"),
])
def test_a_part_missing_a_key_column_is_named_with_the_column(run, table, column):
    part = first_part(run, table)
    rewrite(part, lambda t: t.drop_columns([column]))
    assert_blames(run, part, f"missing key column '{column}'")


@pytest.mark.parametrize("source, folder", [("scalars", "layers"), ("layers", "blocks"), ("blocks", "scalars")])
def test_a_part_in_another_tables_folder_is_named_with_its_table(run, source, folder):
    stray = first_part(run, folder)  # one that meta.json counts as written
    shutil.copy(first_part(run, source), stray)
    assert_blames(run, stray, f"belong to table '{source}', not '{folder}'")


def test_parts_meta_json_does_not_count_are_not_read(run):
    """A kill between a flush's layers part and its scalars part leaves a step in one table only;
    readers take the parts meta.json counts as written, which are whole flushes."""
    before = gradscope.load_run(run)
    shutil.copy(first_part(run, "layers"), run / "layers" / "part-000099.parquet")
    after = gradscope.load_run(run)
    assert len(after.layers) == len(before.layers)
    meta = json.loads((run / "meta.json").read_text())
    del meta["parts"]  # a run written before meta.json counted its parts: every part is read
    (run / "meta.json").write_text(json.dumps(meta))
    assert len(gradscope.load_run(run).layers) > len(before.layers)


@pytest.mark.parametrize("table, column, arrow_type, expected", [
    ("layers", "step", pa.string(), "has type string, expected int64"),
    ("scalars", "step", pa.float64(), "has type double, expected int64"),
    ("layers", "layer", pa.int64(), "has type int64, expected string"),
    ("blocks", "id_cos", pa.string(), "has type string, expected float32"),
    ("scalars", "loss", pa.string(), "has type string, expected float64"),
])
def test_a_column_of_the_wrong_type_is_named_with_both_types(run, table, column, arrow_type, expected):
    part = first_part(run, table)

    def retype(t):
        values = pa.array(range(len(t))) if column == "layer" else t[column]  # layer names stored as numbers
        return t.set_column(t.schema.get_field_index(column), column, values.cast(arrow_type))

    rewrite(part, retype)
    assert_blames(run, part, f"column '{column}' {expected}")


def test_parts_disagreeing_on_a_column_type_name_the_later_part(run):
    first = first_part(run, "layers")
    second = run / "layers" / "part-000099.parquet"
    table = pq.read_table(first)
    pq.write_table(table.set_column(table.schema.get_field_index("act_mean"), "act_mean",
                                    table["act_mean"].cast(pa.float64())), second)
    meta = json.loads((run / "meta.json").read_text())
    meta["parts"]["layers"] = 100  # counted as written
    (run / "meta.json").write_text(json.dumps(meta))
    assert_blames(run, second, "column 'act_mean' has type double", first.name)


def test_steps_of_another_integer_type_read_as_int64(run):
    part = first_part(run, "scalars")
    rewrite(part, lambda t: t.set_column(0, "step", t["step"].cast(pa.int32())))
    loaded = gradscope.load_run(run)
    assert loaded.scalars.step.dtype == "int64" and loaded.scalars.step.tolist() == [0, 1, 2]


@pytest.mark.parametrize("text, fragment", [
    ("[" * 200_000, "nested too deeply"),  # the parser's RecursionError
    ('{"schema_version": 1, "n": ' + "1" * 5000 + "}", "digits"),  # int() refuses over 4300 digits
])
def test_a_meta_json_the_parser_chokes_on_is_named(run, text, fragment):
    meta = run / "meta.json"
    meta.write_text(text)
    with pytest.raises(RunError, match=fragment) as info:
        gradscope.load_run(run)
    assert str(meta) in str(info.value)


def test_the_cli_says_which_part_is_damaged_in_one_line(run):
    part = first_part(run, "layers")
    rewrite(part, lambda t: t.drop_columns(["layer"]))
    result = CliRunner().invoke(main, ["inspect", str(run)], catch_exceptions=False)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(part) in lines[0] and "missing key column 'layer'" in lines[0]



@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_part_that_is_a_fifo_is_refused_without_waiting(run):
    part = first_part(run, "layers")
    part.unlink()
    os.mkfifo(part)  # opening it would wait for a writer forever
    assert_blames(run, part, "not a regular file")


def test_a_part_with_a_column_twice_is_named(run):
    part = first_part(run, "scalars")
    table = pq.read_table(part)
    pq.write_table(pa.Table.from_arrays([*table.columns, table["step"]], names=[*table.column_names, "step"]), part)
    assert_blames(run, part, "'step' appear")
