"""The ``cleanroom`` command. Sub-commands import their dependencies lazily so
that ``cleanroom purify`` needs nothing beyond the engine."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="cleanroom",
    help="Screen and purify third-party image classifiers (TSBD backdoor defense).",
    no_args_is_help=True,
    add_completion=False,
)


def _register() -> None:
    from cli import admin, purify, screen, serve, submit  # each module adds its commands to `app`

    for module in (purify, admin, serve, submit, screen):
        module.register(app)


_register()

if __name__ == "__main__":
    app()
