"""What every ``gradscope`` command shares: one-line errors with exit code 2, and option types."""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


class InputError(click.ClickException):
    """A problem with what the user asked for: exit code 2, like click's usage errors."""

    exit_code = 2


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's input errors into one-line messages with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from gradscope.lab.models import UnknownModelError
        from gradscope.lab.tasks import CifarFormatError, UnknownTaskError
        from gradscope.store import RunError

        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # the reader left (| head): not an error of the input
            _silence_stdout()
            raise  # click's main exits with code 1 and keeps the final flush quiet
        except (UnknownModelError, UnknownTaskError, CifarFormatError, RunError) as exc:
            raise InputError(str(exc)) from None
        except FileExistsError as exc:
            raise InputError(f"{exc} (or pass --overwrite)") from None
        except (ValueError, TypeError) as exc:
            raise InputError(str(exc)) from None
        except OSError as exc:  # unwritable output and the like
            raise InputError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
        except Exception as exc:  # a bug of ours: one line, unless GRADSCOPE_DEBUG asks for the traceback
            if os.environ.get("GRADSCOPE_DEBUG"):
                raise
            if _lost_the_others(exc):
                raise click.ClickException(f"this process lost the others of its job, most likely because one "
                                           f"of them failed (see its messages): {str(exc).splitlines()[0]}") from None
            raise click.ClickException(f"internal error: {type(exc).__name__}: {exc} "
                                       "(set GRADSCOPE_DEBUG=1 for the traceback, and please report it)") from None

    return wrapper


def _lost_the_others(exc: Exception) -> bool:
    """Whether ``exc`` is a collective failing under torchrun: mostly another process's death,
    which gloo and NCCL report as a RuntimeError naming themselves (not a bug of ours)."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1") or not isinstance(exc, RuntimeError):
        return False
    distributed = sys.modules.get("torch.distributed")
    text = str(exc).lower()
    return (distributed is not None and isinstance(exc, getattr(distributed, "DistError", ()))) or \
        any(word in text for word in ("gloo", "nccl", "c10d", "connection reset", "broken pipe"))


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still buffered does
    not fail on the closed pipe again (Python's docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. click's test runner)
        pass


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf, which compare false against any bound."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def parse_settings(values: tuple[str, ...]) -> dict[str, Any]:
    """``--set depth=12 --set activation=sigmoid`` -> {"depth": 12, "activation": "sigmoid"}."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(raw.lower(), raw)
    return out


def writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write to {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise InputError(f"cannot write to {path}: not a directory")
    return path
