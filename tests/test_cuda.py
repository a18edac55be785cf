"""CUDA-only checks: no host synchronisation between flushes, observer and accuracy on the GPU.

Skipped without CUDA; run them on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import gradscope
from gradscope.testing import TinyCNN, TinyMLP, TwiceCalled, assert_same_parameters, reference_batches
from gradscope.testing import batches as tiny_batches

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def data(kind, steps, device, batch=32):
    """The tiny models' seeded batches, 16x16 images, on ``device``."""
    return tiny_batches(kind, steps, seed=0, batch=batch, size=16, device=device)


def loop(model, opt, batches, rec=None, amp=False):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        if rec is not None:
            rec.step(loss=loss)
        opt.step()


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_no_host_sync_between_flushes(kind, amp, tmp_path):
    torch.manual_seed(0)
    model = (TinyCNN() if kind == "cnn" else TinyMLP()).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = data(kind, 8, "cuda")
    loop(model, opt, batches[:2], amp=amp)  # warm up kernels and the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop(model, opt, batches[:2], amp=amp)  # the loop alone is sync-free
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with gradscope.watch(model, tmp_path / "r", optimizer=opt, flush_every=32) as rec:
        loop(model, opt, batches[:1], rec, amp=amp)  # first step builds index tensors
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loop(model, opt, batches[1:], rec, amp=amp)
            with torch.no_grad():
                model.eval()
                model(batches[0][0])
                model.train()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    run = gradscope.load_run(tmp_path / "r")
    train = run.layers[run.layers.phase == "train"]
    assert sorted(train.step.unique()) == list(range(8))
    assert train.grad_out_norm.notna().all()
    # the eval forward after the last optimizer step belongs to step 8
    assert run.layers[run.layers.phase == "eval"].step.unique().tolist() == [8]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "twice"])
def test_parameters_bit_identical_on_cuda(kind, tmp_path):
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    base = {"mlp": TinyMLP, "cnn": TinyCNN, "twice": TwiceCalled}[kind]().cuda()
    batches = data("cnn" if kind == "cnn" else "mlp", 20, "cuda")
    results = []
    for watched in (False, False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if watched:
            with gradscope.watch(model, tmp_path / "r", optimizer=opt, flush_every=3) as rec:
                loop(model, opt, batches, rec)
        else:
            loop(model, opt, batches)
        results.append(model.state_dict())
    if any(not torch.equal(a, b) for a, b in zip(results[0].values(), results[1].values(), strict=True)):
        pytest.skip("training itself is not deterministic on this GPU")
    assert_same_parameters(results[0], results[2], f"{kind} with gradscope attached")


def test_values_match_float64_on_cuda(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), = data("cnn", 1, "cuda")
    outs, grads = {}, {}
    handles = []
    for name in ("features.0", "features.1", "head"):
        def hook(m, i, o, name=name):
            outs[name] = o.detach().double().clone()
            o.register_hook(lambda g: grads.__setitem__(name, g.double().clone()))
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    with gradscope.watch(model, tmp_path / "r", optimizer=opt):
        F.cross_entropy(model(x), y).backward()
        head = model.head
        pnorm = float(head.weight.detach().double().norm() ** 2 + head.bias.detach().double().norm() ** 2) ** 0.5
        opt.step()
    for h in handles:
        h.remove()
    rows = gradscope.load_run(tmp_path / "r").layers.set_index("layer")
    for name, o in outs.items():
        assert math.isclose(rows.loc[name, "act_std"], float(o.std(unbiased=False)), rel_tol=1e-4)
        assert math.isclose(rows.loc[name, "act_absmax"], float(o.abs().max()), rel_tol=1e-4)
        assert math.isclose(rows.loc[name, "grad_out_norm"], float(grads[name].norm()), rel_tol=1e-4)
    assert math.isclose(rows.loc["head", "param_norm"], pnorm, rel_tol=1e-4)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_batched_statistics_match_float64_on_cuda(amp, tmp_path):
    """From the second recorded step on, outputs and gradients are reduced by the batched kernels."""
    from gradscope.recording import kernels

    if not kernels.triton_available(torch.device("cuda")):
        pytest.skip("needs Triton")
    torch.manual_seed(0)
    model = TinyCNN().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = data("cnn", 3, "cuda")
    outs, grads = {}, {}
    step = [0]
    for name in ("features.0", "features.1", "features.3", "head"):
        def hook(m, i, o, name=name):
            outs[step[0], name] = o.detach().double().clone()
            o.register_hook(lambda g: grads.__setitem__((step[0], name), g.double().clone()))
        model.get_submodule(name).register_forward_hook(hook)
    with gradscope.watch(model, tmp_path / "r", optimizer=opt, device="cuda") as rec:  # no index named
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            step[0] += 1
        held = {layer.name for layer in rec.layers if layer.row in rec._batcher.holdable}
    assert held == {"features.0", "features.3", "head"}  # the BatchNorms are clobbered by ReLU(inplace)
    rows = gradscope.load_run(tmp_path / "r").layers.query("phase == 'train'").set_index(["step", "layer"])
    for (s, name), o in outs.items():
        row = rows.loc[(s, name)]
        assert math.isclose(row.act_mean, float(o.mean()), rel_tol=1e-4, abs_tol=1e-5 * float(o.abs().max()))
        assert math.isclose(row.act_std, float(o.std(unbiased=False)), rel_tol=1e-4)
        assert math.isclose(row.act_absmax, float(o.abs().max()), rel_tol=1e-4)
        assert math.isclose(row.grad_out_norm, float(grads[s, name].norm()), rel_tol=1e-4)


@pytest.mark.parametrize("name, overrides", [("resnet20", {}), ("transformer_lm_pre", {"depth": 4})])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_reference_models_with_blocks_no_sync_and_bit_identical(name, overrides, amp, tmp_path):
    from gradscope import models

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    batches = [tuple(t.cuda() for t in batch) for batch in reference_batches(name, 6, batch=16, **overrides)]

    def run(watched: bool, sync_check: bool):
        torch.manual_seed(0)
        model = models.create(name, **overrides).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(x, y, rec):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            F.cross_entropy(out.float().flatten(0, -2), y.flatten()).backward()
            opt.step()

        run = tmp_path / f"r{watched}{sync_check}"
        rec = gradscope.watch(model, run, optimizer=opt, flush_every=16) if watched else None
        step(*batches[0], rec)
        torch.cuda.synchronize()
        if sync_check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for x, y in batches[1:]:
                step(x, y, rec)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if rec is not None:
            rec.close()
        return model.state_dict()

    base = run(False, True)
    again = run(False, False)
    watched = run(True, True)
    run_ = gradscope.load_run(tmp_path / "rTrueTrue")
    assert len(run_.blocks) > 0 and run_.blocks.id_rel_residual.notna().any()
    if all(torch.equal(a, b) for a, b in zip(base.values(), again.values())):
        for key, a in base.items():
            assert torch.equal(a, watched[key]), key


def test_attribution_checkpoints_on_cuda_leave_training_bit_identical(tmp_path):
    pytest.importorskip("captum")
    from gradscope import Attribution, models
    from gradscope.testing import assert_no_hooks

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    batches = [tuple(t.cuda() for t in batch) for batch in reference_batches("resnet20", 5, batch=16)]
    probe = tuple(t.cuda() for t in models.example_input("resnet20", batch=8, seed=99))

    def run(attribution):
        torch.manual_seed(0)
        model = models.create("resnet20").cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        with gradscope.watch(model, tmp_path / f"r{attribution is not None}", optimizer=opt,
                             attribution=attribution, overwrite=True) as rec:
            loop(model, opt, batches, rec)
        assert_no_hooks(model, opt)
        return model.state_dict()

    plain, again = run(None), run(None)
    if any(not torch.equal(a, again[k]) for k, a in plain.items()):
        pytest.skip("training itself is not deterministic on this GPU")
    attributed = run(Attribution(probe, every=2))
    assert_same_parameters(plain, attributed, "with attribution checkpoints")
    table = gradscope.load_run(tmp_path / "rTrue").attribution
    assert sorted(table.step.unique()) == [0, 2, 4]
    assert table[["attr_abs", "branch_share"]].notna().all().all()


def test_token_cos_under_bfloat16_autocast_on_cuda(tmp_path):
    """The token sum's matmul runs in float32 under autocast (bf16 would round it to 3 digits)."""
    from test_blocks import Tokens, _mean_pairwise_token_cosine

    torch.manual_seed(0)
    model = torch.nn.Sequential(Tokens(64), Tokens(64)).cuda()
    with torch.no_grad():  # tokens far from orthogonal, where bf16 rounding would show
        model[1].lin.bias.fill_(0.5)
    x = torch.randn(8, 32, 64, device="cuda")
    outs = []
    model[1].register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    with gradscope.watch(model, tmp_path / "run") as rec:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        y.float().sum().backward()
        rec.step()
    got = gradscope.load_run(tmp_path / "run").blocks.set_index("block").loc["1", "token_cos"]
    assert got == pytest.approx(_mean_pairwise_token_cosine(outs[0]), rel=1e-5)


def test_cuda_graphs_record_every_scheduled_step_as_eager(tmp_path):
    """mode="reduce-overhead": the step replays as CUDA graphs, none skipped or split for
    gradscope's sake (its staging is a static input the graph adds into); every scheduled step is
    recorded from the staging, with eager's figures, and nothing recompiles after warm-up."""
    from test_traced_probes import assert_inductor_figures_match, record_compiled_against_eager

    eager, compiled, counters = record_compiled_against_eager(tmp_path, "cuda", "reduce-overhead")
    assert compiled.meta["status"] == "finished", compiled.meta.get("errors")
    assert sorted(compiled.layers.step.unique()) == [0, 2, 4]
    inductor = counters.get("inductor", {})
    assert inductor.get("cudagraph_skips", 0) == 0, inductor  # the graph was not left out of CUDA graphs
    assert inductor.get("cudagraph_partitions", 0) == 0, inductor  # nor split around ops that cannot be captured
    assert_inductor_figures_match(eager, compiled)
    assert compiled.blocks.id_rel_residual.notna().any() and compiled.blocks.grad_out_norm.notna().any()
