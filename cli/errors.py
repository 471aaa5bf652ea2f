"""How the commands that run the engine report failure: one line on stderr and an exit code
(2 bad input or unreadable files, 130 cancelled, ``failed_code`` when the contained run
itself failed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import typer


@contextlib.contextmanager
def exit_codes(err: Any, *, failed_code: int,
               bad_input: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """``bad_input``: more exception types that mean the user's input was wrong (exit 2)."""
    from defense_core.errors import Cancelled, InputError
    from defense_core.sandbox import ChildFailed

    def say(text: str) -> None:
        err.print(text.splitlines()[0], markup=False, highlight=False, soft_wrap=True)

    try:
        yield
    except (InputError, *bad_input) as exc:
        say(f"error: {exc}")
        raise typer.Exit(code=2) from None
    except OSError as exc:  # unreadable or missing input/output paths
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        say(f"error: cannot access{where}: {exc.strerror or exc}")
        raise typer.Exit(code=2) from None
    except (Cancelled, KeyboardInterrupt):
        say("cancelled")
        raise typer.Exit(code=130) from None
    except ChildFailed as exc:
        say(f"error: {exc}")
        raise typer.Exit(code=failed_code) from None
