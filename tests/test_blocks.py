"""Identity closeness: block discovery and per-block metrics against known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope import models
from gradscope.recording.blocks import discover_blocks


class Scale(nn.Module):
    """y = k * x through a child module (so it is a non-leaf block)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.body = nn.Identity()
        self.k = k

    def forward(self, x):
        return self.body(x) * self.k


class Residual(nn.Module):
    """y = x + F(x), F = Linear-Tanh-Linear; ``zero`` zero-initialises F's last layer."""

    def __init__(self, d: int, zero: bool = False) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        if zero:
            nn.init.zeros_(self.branch[2].weight)
            nn.init.zeros_(self.branch[2].bias)

    def forward(self, x):
        return x + self.branch(x)

    def gradscope_blocks(self):  # declared, so branch_ratio is measured
        return [gradscope.BlockSpec("", branch="branch")]


def net(*blocks: nn.Module, d: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, d), *blocks, nn.Linear(d, 3))


def one_step(model, run, x, **kw):
    """Forward/backward one batch under watch(); returns (run, captured x/y/grads of blocks)."""
    with gradscope.watch(model, run, **kw) as rec:
        out = model(x)
        F.cross_entropy(out, torch.arange(len(x)) % 3).backward()
        rec.step()
    return gradscope.load_run(run)


@pytest.mark.parametrize("k, rel, grad_ratio", [(1.0, 0.0, 1.0), (2.0, 1.0, 2.0), (0.5, 0.5, 0.5)])
def test_scaling_block_has_known_identity_metrics(k, rel, grad_ratio, run_dir):
    torch.manual_seed(0)
    model = net(Scale(k), Scale(1.0))
    blocks = one_step(model, run_dir, torch.randn(6, 8)).blocks.set_index("block")
    b = blocks.loc["1"]
    assert b["id_rel_residual"] == pytest.approx(rel, abs=1e-6)
    assert b["id_cos"] == pytest.approx(1.0, abs=1e-6)
    assert b["id_grad_ratio"] == pytest.approx(grad_ratio, rel=1e-5)
    assert math.isnan(b["branch_ratio"]) and math.isnan(b["token_cos"])
    assert blocks.loc["2", "id_rel_residual"] == 0.0  # an exact identity gives exactly 0


def test_zero_initialised_residual_branch_is_the_identity(run_dir):
    torch.manual_seed(0)
    block = Residual(8, zero=True)
    x = torch.randn(5, 8, requires_grad=True) * 1.0  # non-leaf: leaf tensors get no gradient hook
    with gradscope.watch(block, run_dir, modules=nn.Linear) as rec:
        block(x).square().sum().backward()
        rec.step()
    b = gradscope.load_run(run_dir).blocks.iloc[0]
    assert b["block"] == "" and b["id_rel_residual"] == 0.0
    assert b["id_cos"] == pytest.approx(1.0, abs=1e-6)
    assert b["id_grad_ratio"] == 1.0 and b["branch_ratio"] == 0.0


def test_block_metrics_match_a_direct_float64_computation(run_dir):
    torch.manual_seed(0)
    model = net(Residual(8), Residual(8))
    x = torch.randn(16, 8)
    seen = {}

    def capture(name):
        def hook(m, args, out):
            seen[name] = (args[0].detach().double(), out.detach().double(), m.branch(args[0]).detach().double())
            args[0].register_hook(lambda g: seen.__setitem__(name + ".gx", g.double()))
            out.register_hook(lambda g: seen.__setitem__(name + ".gy", g.double()))
        return hook

    for i in (1, 2):
        model[i].register_forward_hook(capture(str(i)))
    blocks = one_step(model, run_dir, x, blocks=Residual).blocks.set_index("block")
    for name in ("1", "2"):
        bx, by, fx = seen[name]
        got = blocks.loc[name]
        assert got["id_rel_residual"] == pytest.approx(float((by - bx).norm() / bx.norm()), rel=1e-4)
        assert got["id_cos"] == pytest.approx(float(F.cosine_similarity(bx, by, dim=1).mean()), rel=1e-4)
        ratio = float(seen[name + ".gx"].norm() / seen[name + ".gy"].norm())
        assert got["id_grad_ratio"] == pytest.approx(ratio, rel=1e-4)
        assert got["grad_out_norm"] == pytest.approx(float(seen[name + ".gy"].norm()), rel=1e-4)
        # blocks=Residual selects modules; branches come only from declarations, so unknown here
        assert math.isnan(got["branch_ratio"])


def test_branch_ratio_of_declared_branch(run_dir):
    torch.manual_seed(0)
    block = Residual(8)
    x = torch.randn(16, 8, requires_grad=True)
    with gradscope.watch(block, run_dir) as rec:
        block(x).sum().backward()
        rec.step()
    got = gradscope.load_run(run_dir).blocks.iloc[0]["branch_ratio"]
    assert got == pytest.approx(float(block.branch(x).detach().norm() / x.detach().norm()), rel=1e-5)


class Tokens(nn.Module):
    """[batch, tokens, dim] -> same, through a linear map (a non-leaf block)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x)


def test_token_cos_matches_mean_pairwise_cosine(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(Tokens(6), Tokens(6))
    x = torch.randn(3, 5, 6, requires_grad=True)
    outs = []
    model[1].register_forward_hook(lambda m, a, o: outs.append(o.detach().double()))
    with gradscope.watch(model, run_dir) as rec:
        model(x).sum().backward()
        rec.step()
    y = outs[0]
    u = F.normalize(y, dim=-1)
    cos = u @ u.transpose(1, 2)  # [batch, T, T]
    t = y.shape[1]
    want = float(((cos.sum((1, 2)) - t) / (t * (t - 1))).mean())
    got = gradscope.load_run(run_dir).blocks.set_index("block").loc["1", "token_cos"]
    assert got == pytest.approx(want, rel=1e-5)


def _mean_pairwise_token_cosine(y: torch.Tensor) -> float:
    u = F.normalize(y.double(), dim=-1)
    t = y.shape[1]
    return float((((u @ u.transpose(1, 2)).sum((1, 2)) - t) / (t * (t - 1))).mean())


class EveryOtherToken(nn.Module):
    def forward(self, x):
        return x[:, ::2]


def test_token_cos_of_blocks_with_different_sequence_lengths_and_widths_in_one_step(run_dir):
    """Token cosines are finished for all blocks of a step at once, with each block's own T and width."""
    torch.manual_seed(0)
    model = nn.Sequential(Tokens(6), EveryOtherToken(), Tokens(6), nn.Linear(6, 10), Tokens(10))
    x = torch.randn(3, 8, 6, requires_grad=True)
    outs = {}
    names = ("0", "2", "4")
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: outs.update({name: o.detach()}))
    with gradscope.watch(model, run_dir, blocks=list(names)) as rec:
        model(x).sum().backward()
        rec.step()
    assert [tuple(outs[name].shape[1:]) for name in names] == [(8, 6), (4, 6), (4, 10)]
    got = gradscope.load_run(run_dir).blocks.set_index("block").token_cos
    for name in names:
        assert got[name] == pytest.approx(_mean_pairwise_token_cosine(outs[name]), rel=1e-5), name


def test_token_cos_under_bfloat16_autocast_is_computed_in_float32(run_dir):
    """Autocast would run the token sum's matmul in bfloat16; it is kept in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(Tokens(16), Tokens(16))
    x = torch.randn(4, 12, 16)
    outs = []
    model[1].register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    with gradscope.watch(model, run_dir) as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        rec.step()
    got = gradscope.load_run(run_dir).blocks.set_index("block").loc["1", "token_cos"]
    assert got == pytest.approx(_mean_pairwise_token_cosine(outs[0]), rel=1e-5)


def test_collapsed_tokens_have_token_cos_one(run_dir):
    class Collapse(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):  # every token becomes the sequence mean
            return self.lin(x).mean(dim=1, keepdim=True).expand_as(x).contiguous()

    model = nn.Sequential(Collapse(), Collapse())
    with gradscope.watch(model, run_dir) as rec:
        model(torch.randn(2, 7, 4, requires_grad=True)).sum().backward()
        rec.step()
    assert gradscope.load_run(run_dir).blocks.token_cos.tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


class UserBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        return out + x if out.shape == x.shape else out


class UserCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(UserBlock(8, 8), UserBlock(8, 8), UserBlock(8, 16, stride=2), UserBlock(16, 16))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def test_discovery_in_user_cnn_lists_downsampling_block_with_reason(run_dir):
    model = UserCNN()
    assert discover_blocks(model) == ["stage.0", "stage.1", "stage.2", "stage.3"]
    with gradscope.watch(model, run_dir) as rec:
        model(torch.randn(4, 3, 8, 8)).sum().backward()
        rec.step()
    run = gradscope.load_run(run_dir)
    table = run.block_table.set_index("name")
    assert (table.source == "discovered").all()
    assert "changes shape" in table.loc["stage.2", "reason"] and table.reason.isna().sum() == 3
    rows = run.blocks.set_index("block")
    assert math.isnan(rows.loc["stage.2", "id_rel_residual"]) and rows.loc["stage.2", "grad_out_norm"] > 0
    assert rows.loc[["stage.0", "stage.1", "stage.3"], "id_rel_residual"].notna().all()
    assert table.depth.tolist() == [0, 1, 2, 3]


def test_discovery_in_pytorch_transformer_encoder(run_dir):
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    assert discover_blocks(model) == ["layers.0", "layers.1", "layers.2"]
    torch.manual_seed(0)
    with gradscope.watch(model, run_dir) as rec:
        out = model(torch.randn(2, 5, 16))
        (out * torch.randn_like(out)).sum().backward()  # not .sum(): LayerNorm outputs sum to a constant
        rec.step()
    rows = gradscope.load_run(run_dir).blocks
    assert rows.block.tolist() == ["layers.0", "layers.1", "layers.2"]
    assert rows[["id_rel_residual", "id_cos", "token_cos", "grad_out_norm"]].notna().all().all()
    # the raw input has no gradient, so only the later layers have a gradient ratio
    assert rows.id_grad_ratio.isna().tolist() == [True, False, False]


def test_blocks_argument_overrides_discovery(run_dir, tmp_path):
    model = UserCNN()

    def watched(**kw):
        path = tmp_path / str(len(list(tmp_path.iterdir())))
        with gradscope.watch(model, path, **kw) as rec:
            return [b.name for b in rec.blocks]

    assert watched(blocks="stage.1") == ["stage.1"]
    ends = lambda name, m: name.endswith(("0", "3")) and isinstance(m, UserBlock)  # noqa: E731
    assert watched(blocks=ends) == ["stage.0", "stage.3"]
    assert watched(blocks=UserBlock) == ["stage.0", "stage.1", "stage.2", "stage.3"]
    assert watched(blocks=[]) == []


def test_input_modified_in_place_is_not_compared(run_dir):
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            x = x * 1.0  # a non-leaf the block then modifies
            return self.lin(x.relu_())

    model = nn.Sequential(nn.Linear(4, 4), InPlace(), InPlace())
    with gradscope.watch(model, run_dir) as rec:
        model(torch.randn(3, 4)).sum().backward()
        rec.step()
    assert gradscope.load_run(run_dir).blocks.id_rel_residual.notna().all()  # x*1.0 is a new tensor

    class Mutates(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x.relu_())  # modifies the caller's tensor

    model = nn.Sequential(nn.Linear(4, 4), Mutates(), Mutates())
    with gradscope.watch(model, run_dir.with_name("b")) as rec:
        model(torch.randn(3, 4)).sum().backward()
        rec.step()
    run = gradscope.load_run(run_dir.with_name("b"))
    assert run.blocks.id_rel_residual.isna().all()
    assert (run.block_table.reason == "modifies its input in place").all()


def test_reference_models_use_declared_blocks_and_twins_align(tmp_path):
    runs = {}
    for name in ("plain20", "resnet20"):
        torch.manual_seed(0)
        model = models.create(name, input_size=8)
        x, y = models.example_input(name, batch=8, input_size=8)
        with gradscope.watch(model, tmp_path / name) as rec:
            F.cross_entropy(model(x), y).backward()
            rec.step()
        runs[name] = gradscope.load_run(tmp_path / name)
    plain, res = runs["plain20"], runs["resnet20"]
    names = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]
    assert plain.blocks.block.tolist() == res.blocks.block.tolist() == names
    assert (res.block_table.source == "declared").all()
    assert res.block_table.residual.all() and not plain.block_table.residual.any()
    assert res.blocks.branch_ratio.notna().sum() == 7  # every same-shape block
    assert plain.blocks.branch_ratio.notna().sum() == 7


def test_at_initialisation_plain56_is_far_from_identity_and_resnet56_is_not(init_runs_56):
    """He et al. CIFAR nets at init (BatchNorm, Kaiming, batch 64): the skip keeps blocks near
    the identity; the plain net's BatchNorm stack amplifies the gradient toward the input
    (Yang et al. 2019), the residual one much less."""
    stats = {}
    for name, path in init_runs_56.items():
        blocks = gradscope.load_run(path).blocks.set_index("block")
        first_last = blocks.grad_out_norm.iloc[0] / blocks.grad_out_norm.iloc[-1]
        stats[name] = (blocks.id_rel_residual.mean(), first_last)
    (plain_rel, plain_grad), (res_rel, res_grad) = stats["plain56"], stats["resnet56"]
    assert plain_rel > 2 * res_rel, stats
    assert abs(math.log10(plain_grad)) > abs(math.log10(res_grad)) + 2, stats  # >100x further from 1
    assert plain_grad > 1 and res_grad > 1  # amplified toward the input, not vanishing


def test_sequence_first_transformer_layers_use_the_batch_axis(tmp_path):
    torch.manual_seed(0)
    results = {}
    x = torch.randn(3, 7, 16)  # [batch, tokens, dim]
    for batch_first in (True, False):
        torch.manual_seed(1)  # the same weights for both layouts
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        with gradscope.watch(model, tmp_path / str(batch_first)) as rec:
            out = model(x if batch_first else x.transpose(0, 1))
            (out * torch.ones_like(out).cumsum(-1)).sum().backward()
            rec.step()
        results[batch_first] = gradscope.load_run(tmp_path / str(batch_first)).blocks.set_index("block")
    cols = ["id_rel_residual", "id_cos", "token_cos"]
    assert (results[True][cols] - results[False][cols]).abs().max().max() < 1e-5
