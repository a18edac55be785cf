"""One rank of a multi-process job the tests start (``launch.run_job``): runs the named
scenarios in turn in one gloo process group and writes what each rank saw as JSON.

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python worker.py OUT SCENARIO...
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import scenarios  # noqa: E402

import gradscope  # noqa: E402
from gradscope.recording.layers import with_activations  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter_tensor", "barrier", "send", "recv", "scatter")
calls = {"n": 0}


def count_collectives() -> None:
    """Wrap the torch.distributed collectives called from Python (DDP's reducer runs in C++)."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, __original=original, **kwargs):
            calls["n"] += 1
            return __original(*args, **kwargs)

        setattr(dist, name, counted)


class Nothing:
    """Stands in for a recorder in the uninstrumented run."""

    def step(self, **kwargs) -> None:
        pass


def ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


def fsdp2(model, mesh=None):
    from torch.distributed.fsdp import fully_shard

    for block in model[2]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp1(model, use_orig_params, wrap=torch.nn.Linear):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"),
                                    auto_wrap_policy=ModuleWrapPolicy({wrap}))


def hsdp(model):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return fsdp2(model, mesh)


WRAP = {"ddp": ddp, "every3": ddp, "bn": ddp, "fsdp2": fsdp2, "fsdp1_orig": lambda m: fsdp1(m, True),
        "fsdp1_flat": lambda m: fsdp1(m, False), "fsdp1_blocks": lambda m: fsdp1(m, False, scenarios.Residual),
        "hsdp": hsdp, "fail": ddp, "watch_first": None}


def scenario(name: str, out: Path, rank: int, world: int) -> dict:
    model = scenarios.make_model("bn" if name == "bn" else "mlp")
    if name == "observer":  # the same DDP training without and with gradscope: bit-identical parameters
        finals = []
        for watched in (False, True):
            wrapped = ddp(scenarios.make_model())
            opt = scenarios.optimizer(wrapped)
            rec = gradscope.watch(wrapped, run=out / name, optimizer=opt, overwrite=True, flush_every=2,
                                  modules=with_activations) if watched else None
            scenarios.train(wrapped, opt, rec or Nothing(), scenarios.batches(), rank, world)
            if rec is not None:
                rec.close()
            finals.append([p.detach().clone() for p in wrapped.parameters()])
        return {"identical": all(torch.equal(a, b) for a, b in zip(*finals))}
    if name == "fail_late":  # rank 1 fails after training and stays alive: rank 0 must not wait for it
        wrapped = ddp(model)
        opt = scenarios.optimizer(wrapped)
        rec = gradscope.watch(wrapped, run=out / name, optimizer=opt, flush_every=4)
        try:
            with rec:
                scenarios.train(wrapped, opt, rec, scenarios.batches(), rank, world)
                if rank == 1:
                    raise ValueError("late boom on rank 1")
                start = time.monotonic()
        except ValueError:
            time.sleep(8)  # alive, its sockets open, long after rank 0 gave up on it
            raise
        except RuntimeError as exc:
            result = {"close_seconds": time.monotonic() - start, "error": str(exc)}
            (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))
            os._exit(0)  # a collective is left pending: no orderly teardown
        return {}
    if name == "noise":  # the gradient noise scale from each rank's micro-batches, lr 0 so G stays put
        wrapped = ddp(scenarios.noise_model())
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)
        x, y = scenarios.noise_problem()
        with gradscope.watch(wrapped, run=out / name, optimizer=opt, noise_scale=True, every=1, flush_every=250):
            scenarios.noise_steps(wrapped, opt, x, y, steps=1000, micro=2, size=8, seed=10 + rank)
        return {}
    if name == "disagree":  # rank 1 asks for another schedule: every rank must refuse
        try:
            gradscope.watch(model, run=out / name, every=1 + rank)
        except RuntimeError as exc:
            return {"error": str(exc)}
        return {"error": None}
    options = dict(run=out / name, flush_every=3, modules=with_activations)
    if name.startswith("compiled"):  # compiled after watch(): split into graphs at DDP's buckets, FSDP2's hooks
        wrapped = fsdp2(model) if name == "compiled_fsdp2" else ddp(model)
        opt = scenarios.optimizer(wrapped)
        with gradscope.watch(wrapped, optimizer=opt, **{**options, "every": 3, "flush_every": 2}) as rec:
            scenarios.train(torch.compile(wrapped, backend="aot_eager"), opt, rec, scenarios.batches(), rank, world,
                            eval_at=1)
        return {}
    if name == "regional_fsdp2":  # torchtitan's order: each block compiled on its own, then sharded, then watched
        for i, block in enumerate(model[2]):
            model[2][i] = torch.compile(block, backend="aot_eager")
        wrapped = fsdp2(model)
        opt = scenarios.optimizer(wrapped)
        with gradscope.watch(wrapped, optimizer=opt, **{**options, "every": 3, "flush_every": 2}) as rec:
            scenarios.train(wrapped, opt, rec, scenarios.batches(), rank, world, eval_at=1)
        return {}
    if name == "every3":
        options.update(every=3, flush_every=2, per_rank=True)
    if name == "ddp":
        options.update(per_rank=True)
    if name == "watch_first":  # watch() before fully_shard, as a user might write it
        rec = gradscope.watch(model, **options)  # no optimizer=: rec.step() ends each step
        wrapped = fsdp2(model)
        opt = scenarios.optimizer(wrapped)
    else:
        wrapped = WRAP[name](model)
        opt = scenarios.optimizer(wrapped)
        rec = gradscope.watch(wrapped, optimizer=opt, **options)
    per_step = []
    before = calls["n"]

    def after_step(step):
        nonlocal before
        per_step.append(calls["n"] - before)
        before = calls["n"]

    with rec:
        losses = scenarios.train(wrapped, opt, rec, scenarios.batches(), rank, world,
                                 fail_at=2 if name == "fail" and rank == 1 else None,
                                 eval_at=1 if name in ("ddp", "every3") else None, after_step=after_step)
    return {"losses": losses, "collectives_per_step": per_step, "collectives_at_close": calls["n"] - before,
            "run": str(rec.path)}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    count_collectives()
    try:
        for name in names:
            result = scenario(name, out, rank, world)
            (out / f"{name}.rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        # no interpreter teardown after a failure: gloo's threads, still tied to a peer that is
        # failing too, can abort it ("terminate called without an active exception", SIGABRT)
        os._exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
