"""Entry point of the ``gradscope`` console script."""

from __future__ import annotations

import click

from gradscope import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradscope")
def main() -> None:
    """gradscope: gradient-flow analysis for PyTorch models."""


if __name__ == "__main__":
    main()
