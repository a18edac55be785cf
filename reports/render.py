"""Figures to embedded images, and the report page from its jinja2 template."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib.figure import Figure

DPI = 80


@dataclass
class Embedded:
    """A figure ready for the page: base64 PNG plus the words a reader (or screen reader) needs."""

    title: str
    caption: str  # one sentence: what to look for
    alt: str
    png_base64: str


def embed(fig: Figure, title: str, caption: str, alt: str) -> Embedded:
    """Render ``fig`` to a base64 PNG (no files, no network) and release it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    fig.clear()
    return Embedded(title, caption, alt, base64.b64encode(buffer.getvalue()).decode("ascii"))


def environment() -> Environment:
    """Templates with autoescape on everywhere: run and layer names are untrusted text."""
    return Environment(loader=PackageLoader("gradscope.reports", "templates"), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
