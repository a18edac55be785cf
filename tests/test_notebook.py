"""Runs in Jupyter: ``_repr_html_`` shows the findings, the summary and gradient flow by depth,
as a fragment without scripts, and matplotlib loads only when a run is displayed."""

from __future__ import annotations

import base64
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch

import gradscope
from gradscope.testing import TinyMLP, batches, train


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    for name, seed in (("a<b>", 0), ("second", 1)):  # a name that must be escaped
        torch.manual_seed(seed)
        train(TinyMLP(), batches("mlp", steps=4), run=root / name, every=1, lr=0.05)
    return root / "a<b>", root / "second"


def _parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def test_a_run_shows_summary_findings_and_gradient_flow(two_runs):
    run = gradscope.load_run(two_runs[0])
    page = _parse(run._repr_html_())
    assert "script" not in page.tags and "html" not in page.tags  # a fragment a static viewer renders
    text = " ".join(page.text)
    assert "Findings" in text and "Summary" in text and "a<b>" in text  # escaped, shown as text
    assert "RMS of dL/dy" in text  # the gradient-flow-by-depth figure's title
    (image,) = page.images
    assert image.startswith("data:image/png;base64,")
    assert base64.b64decode(image.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_display_side_by_side(two_runs):
    runs = gradscope.load_runs(*two_runs)
    assert [r.name for r in runs] == ["a<b>", "second"]
    page = _parse(runs._repr_html_())
    rows = page.tags.count("tr")
    assert rows == 3  # header and one row per run
    assert len(page.images) == 1  # one figure comparing both


def test_reading_a_run_loads_no_plotting_library_and_no_framework(two_runs):
    """One fresh interpreter for both checks: ``import gradscope`` (and its integrations package)
    imports no trainer framework, and reading a run no plotting library."""
    frameworks = ("lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard")
    code = ("import sys, gradscope, gradscope.integrations; gradscope.load_run(sys.argv[1]); "
            "print('matplotlib' in sys.modules, 'seaborn' in sys.modules, "
            f"sorted(m for m in sys.modules if m.split('.')[0] in {frameworks!r}) == [])")
    out = subprocess.run([sys.executable, "-c", code, str(two_runs[1])], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "True"]
