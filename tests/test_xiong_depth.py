"""Xiong et al. 2020 Theorem 1 on the reference Transformers (experiments/xiong_depth.py)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "xiong_depth.py"
pytestmark = pytest.mark.slow  # the sweep behind every test here trains for about 20 s


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("xiong_depth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sweep((3, 12), seeds=2)


def test_pre_ln_per_token_gradient_shrinks_with_depth_as_the_stream_grows(results):
    shallow, deep = results["transformer_lm_pre", 3], results["transformer_lm_pre", 12]
    assert deep["stream_rms"] > 1.3 * shallow["stream_rms"]
    assert deep["token_grad"] < 0.75 * shallow["token_grad"]


def test_post_ln_per_token_gradient_stays_about_flat(results):
    shallow, deep = results["transformer_lm_post", 3], results["transformer_lm_post", 12]
    assert deep["token_grad"] == pytest.approx(shallow["token_grad"], rel=0.25)
    assert deep["stream_rms"] == pytest.approx(1.0, rel=1e-3)  # LayerNorm output: nothing grows


def test_batch_gradient_mixes_in_token_collapse(results):
    # why a recorded run's (batch) gradient does not show the theorem: tokens grow alike with depth
    for name in ("transformer_lm_post", "transformer_lm_pre"):
        assert results[name, 12]["token_cos"] > results[name, 3]["token_cos"] + 0.2
