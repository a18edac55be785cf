"""Reference models: registry behaviour, and one test parametrized over every registered model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope import models
from gradscope.recording.blocks import declared_blocks
from gradscope.testing import forward, loss_of, small_overrides, train


# small_overrides: 8x8 images and 8 tokens keep 110-layer nets fast on 2 CPU cores (every model
# pools or attends globally), and transformers have two layers.
@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_builds_runs_and_learns(name):
    torch.manual_seed(0)
    overrides = small_overrides(name)
    model = models.create(name, **overrides)
    x, y = models.example_input(name, batch=8, **overrides)
    out = forward(model, x)
    assert out.shape == (*y.shape, out.shape[-1])
    assert torch.isfinite(out).all()

    first = loss_of(out, y)
    train(model, [(x, y)] * 8, optimizer_cls=torch.optim.Adam, lr=1e-3)  # one batch, eight times
    with torch.no_grad():
        last = loss_of(forward(model, x), y)
    assert torch.isfinite(last) and last < first, f"{name}: loss {float(first):.4f} -> {float(last):.4f}"


@pytest.mark.parametrize("name", models.names())
def test_every_registered_model_declares_its_blocks(name):
    model = models.create(name, **small_overrides(name))
    blocks = declared_blocks(model)
    assert blocks, f"{name} declares no blocks"
    modules = dict(model.named_modules())
    for b in blocks:
        assert b.name in modules and b.branch in modules, b
    family = models.entry(name).family
    assert all(b.residual for b in blocks) == (family != "plain" and not name.endswith("_none") and name != "mlp_plain")


@pytest.mark.parametrize("depth, params_m", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_resnet_parameter_counts_match_he_et_al_table_6(depth, params_m):
    for prefix in ("resnet", "plain"):
        n = sum(p.numel() for p in models.create(f"{prefix}{depth}").parameters())
        assert abs(n / 1e6 - params_m) <= 0.02 * params_m, (prefix, depth, n)


@pytest.mark.parametrize("depth", [20, 56])
def test_resnet_has_6n_plus_2_weighted_layers_and_plain_twin_matches(depth):
    res, plain = models.create(f"resnet{depth}"), models.create(f"plain{depth}")
    weighted = [m for m in res.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == depth == res.depth
    assert [n for n, _ in res.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert [b.name for b in res.gradscope_blocks()] == [b.name for b in plain.gradscope_blocks()]
    assert all(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in weighted[:-1])
    widths = sorted({m.out_channels for m in weighted[:-1]})
    assert widths == [16, 32, 64] and weighted[-1].out_features == 10


def test_option_a_shortcut_is_subsampled_zero_padded_identity():
    model = models.create("resnet20")
    block = model.layer2[0]  # 16 -> 32 channels, stride 2
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().sum() == 0 and s[:, 24:].abs().sum() == 0
    assert isinstance(model.layer1[0].shortcut, nn.Identity)


def test_residual_block_output_is_relu_of_branch_plus_input():
    model = models.create("resnet20").eval()
    block = model.layer1[1]
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(block(x), torch.relu(block.branch(x) + x))
    plain = models.create("plain20").eval()
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(plain.layer1[1](x), torch.relu(block.branch(x)))


def test_option_b_projection_and_overrides():
    model = models.create("resnet20", shortcut="B", num_classes=100, in_channels=1)
    proj = model.layer3[0].shortcut
    assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    option_a = models.create("resnet20", num_classes=100, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in option_a.parameters())
    with pytest.raises(ValueError, match="shortcut"):
        models.create("resnet20", shortcut="C")


def test_preactivation_unit_adds_with_nothing_after():
    model = models.create("preresnet20").eval()
    block = model.layer1[0]
    kinds = [type(m) for m in block.branch]
    assert kinds == [nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(block(x), block.branch(x) + x)
    assert isinstance(model.final[0], nn.BatchNorm2d)


@pytest.mark.parametrize("activation, unit",
                         [("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh), ("relu", nn.ReLU), ("gelu", nn.GELU)])
def test_mlp_depth_width_activation(activation, unit):
    model = models.create("mlp_plain", depth=20, width=32, activation=activation)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 20 and linears[1].in_features == 32
    assert sum(isinstance(m, unit) for m in model.modules()) == 19
    res = models.create("mlp_residual", depth=5, width=16, activation=activation).eval()
    h = torch.randn(3, 16)
    assert torch.allclose(res.blocks[0](h), h + res.blocks[0].branch(h))
    with pytest.raises(ValueError, match="activation"):
        models.create("mlp_plain", activation="swish")


@pytest.mark.parametrize("norm", ["post", "pre", "none"])
def test_transformer_norm_placement(norm):
    model = models.create(f"transformer_lm_{norm}", depth=2, seq_len=8).eval()
    sub = model.layers[0].attn
    x = torch.randn(2, 8, 64)
    fx = sub.fn
    want = {"post": lambda: sub.norm(x + fx(x)), "pre": lambda: x + fx(sub.norm(x)),
            "none": lambda: sub.norm(fx(x))}[norm]()
    assert torch.allclose(sub(x), want, atol=1e-6)
    assert isinstance(model.final_norm, nn.LayerNorm) == (norm == "pre")


def test_causal_lm_does_not_look_ahead():
    model = models.create("transformer_lm_pre", depth=2, seq_len=8).eval()
    ids = torch.randint(0, 32, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (ids[0, 5:] + 1) % 32
    assert torch.allclose(model(ids)[0, :5], model(changed)[0, :5], atol=1e-6)
    assert not torch.allclose(model(ids)[0, 5:], model(changed)[0, 5:])


def test_encoder_decoder_defaults_to_6_plus_6_layers():
    model = models.create("transformer_seq2seq_post")
    assert len(model.encoder) == 6 and len(model.decoder) == 6
    names_ = [b.name for b in model.gradscope_blocks()]
    assert "decoder.5.cross_attn" in names_ and len(names_) == 6 * 2 + 6 * 3


def test_registry_lookup_and_errors():
    assert models.names("resnet*") == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    assert models.names("nothing*") == []
    with pytest.raises(models.UnknownModelError, match="did you mean resnet56"):
        models.create("resnet65")
    with pytest.raises(TypeError, match="does not take"):
        models.create("resnet20", width=3)
    model = models.create("plain56", num_classes=7)
    assert model.gradscope_name == "plain56" and model.gradscope_config["num_classes"] == 7


def test_register_model_decorator_and_duplicates():
    @models.register_model("test_tiny_linear", family="mlp", input_kind="image")
    def tiny(num_classes: int = 3, in_channels: int = 1, input_size: int = 2) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size**2, num_classes))

    try:
        assert "test_tiny_linear" in models.names("test_*")
        assert models.create("test_tiny_linear", num_classes=5)(torch.randn(1, 1, 2, 2)).shape == (1, 5)
        with pytest.raises(ValueError, match="already registered"):
            models.register_model("test_tiny_linear", family="mlp", input_kind="image")(tiny)
    finally:
        from gradscope.lab.models.registry import _REGISTRY
        _REGISTRY.pop("test_tiny_linear", None)


def test_run_meta_names_the_reference_model(tmp_path):
    model = models.create("resnet20", input_size=8)
    x, y = models.example_input("resnet20", batch=4, input_size=8)
    with gradscope.watch(model, tmp_path / "r") as rec:
        F.cross_entropy(model(x), y).backward()
        rec.step()
    meta = gradscope.load_run(tmp_path / "r").meta
    assert meta["model"]["registry_name"] == "resnet20" and meta["model"]["config"]["shortcut"] == "A"
