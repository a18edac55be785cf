"""How runs display in Jupyter: the report's findings, summary table and gradient flow by depth.

``Run._repr_html_`` and ``Runs._repr_html_`` (``gradscope.store.reader``) import this only when a
notebook displays one, so recording and reading runs never load matplotlib. The HTML is a
fragment with the figure as a base64 PNG and no scripts: static notebook viewers show it as is.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradscope.reports import _num, gradient_flow_figure
from gradscope.reports.data import RunLike, collect
from gradscope.reports.render import environment

from gradscope import diagnose


def runs_html(runs: Sequence[RunLike]) -> str:
    """The notebook view of ``runs`` (one or several, compared side by side as in the report)."""
    data = collect(runs)
    env = environment()
    env.filters["num"] = _num
    return env.get_template("notebook.html.j2").render(
        summaries=data.summaries, findings=diagnose(data.runs), figure=gradient_flow_figure(data.layers))
