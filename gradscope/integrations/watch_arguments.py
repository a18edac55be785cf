"""What an adapter passes on to ``watch()``: the user's keyword arguments, less those the trainer
supplies (model, optimizer, loss scaler), plus the framework's facts under meta.json's ``integration``."""

from __future__ import annotations

from typing import Any

TRAINER_SUPPLIED = ("model", "optimizer", "scaler")


def checked(owner: str, watch_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``watch_kwargs`` refused if they name what the trainer supplies."""
    for reserved in TRAINER_SUPPLIED:
        if reserved in watch_kwargs:
            raise TypeError(f"{owner}: {reserved}= is taken from the Trainer, not given")
    return dict(watch_kwargs)


def with_facts(watch_kwargs: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """``watch_kwargs`` with ``facts`` added to the user's ``meta=`` as ``integration``."""
    return {**watch_kwargs, "meta": {**watch_kwargs.get("meta", {}), "integration": facts}}
