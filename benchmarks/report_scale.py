"""Report scale check: 4 runs of resnet110 with 1,000 recorded steps each.

Records one real step of resnet110 to get a genuine run layout, then writes synthetic steps
(the recorded rows with multiplicative noise) as Parquet parts of 50 steps, the way a flush
does, and times ``gradscope.reports.build`` over the four runs. Prints seconds and megabytes
against the targets (30 s, 10 MB).

    python benchmarks/report_scale.py [--steps 1000] [--runs 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

import gradscope
from gradscope import models


def template_run(path: Path) -> None:
    torch.manual_seed(0)
    model = models.create("resnet110", input_size=8)
    x, y = models.example_input("resnet110", batch=4, input_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, path, optimizer=opt) as rec:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        rec.step(loss=loss, accuracy=0.1)
        opt.step()


def synthesise(template: Path, out: Path, steps: int, seed: int, part_steps: int = 50) -> None:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    (out / "meta.json").write_text((template / "meta.json").read_text())
    for table in ("layers", "blocks", "scalars"):
        base = pq.read_table(next((template / table).glob("part-*.parquet")))
        (out / table).mkdir()
        for part, start in enumerate(range(0, steps, part_steps)):
            chunks = []
            for step in range(start, min(start + part_steps, steps)):
                cols = {}
                for name in base.column_names:
                    col = base[name]
                    if name == "step":
                        cols[name] = pa.array(np.full(len(base), step, dtype=np.int64))
                    elif pa.types.is_floating(col.type):
                        values = col.to_numpy(zero_copy_only=False)
                        decay = np.exp(-step / steps)  # something that changes over training
                        cols[name] = pa.array((values * decay * rng.lognormal(0, 0.1, len(values))).astype(
                            col.type.to_pandas_dtype()))
                    else:
                        cols[name] = col
                chunks.append(pa.table(cols))
            pq.write_table(pa.concat_tables(chunks), out / table / f"part-{part:06d}.parquet")


def main() -> None:
    from gradscope import reports  # needs the installed package (gradscope.reports)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template_run(root / "template")
        paths = []
        for i in range(args.runs):
            paths.append(root / f"resnet110-{i}")
            synthesise(root / "template", paths[-1], args.steps, seed=i)
        rows = len(gradscope.load_run(paths[0]).layers)
        start = time.perf_counter()
        out = reports.build(paths, root / "report.html")
        seconds = time.perf_counter() - start
        size = out.stat().st_size / 1e6
    print(f"{args.runs} runs x {args.steps} recorded steps of resnet110 ({rows:,} layer rows per run)")
    print(f"report built in {seconds:.1f} s (target 30 s, ratio {seconds / 30:.2f}); "
          f"{size:.2f} MB (target 10 MB, ratio {size / 10:.2f})")


if __name__ == "__main__":
    main()
