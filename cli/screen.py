"""`cleanroom screen`: is a model backdoored, toward which label, how sure.

    cleanroom screen --model m.safetensors --spec spec.json [--clean clean.npz] \
        [--json] [--fail-on suspicious|backdoored]

Progress goes to stderr; ``--json`` prints the ScreeningReport document on
stdout and nothing else. Without ``--clean`` only the data-free signal (maximum
margin per class) runs, and the report says so. Exit codes for CI: 0 clean,
1 flagged (suspicious or backdoored; ``--fail-on backdoored`` fails only on
that), 2 bad input.

The model is loaded with the engine's safe loaders (no unpickling; TorchScript
and exported programs behind the operator allowlist) and screened in this
process: the contained child of ``cleanroom purify`` does not know the
screening task yet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.errors import exit_codes
from cli.purify import _ProgressReporter, _read_json

FAIL_ON = ("suspicious", "backdoored")


def register(app: typer.Typer) -> None:
    """Add ``cleanroom screen`` to the root command."""
    app.command("screen", help="Screen a classifier for a backdoor: verdict, score, suspected target.")(screen_command)


def _summary(doc: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    colour = {"clean": "green", "suspicious": "yellow", "backdoored": "red"}[doc["verdict"]]
    target = "-" if doc["target"] is None else str(doc["target"])
    head = Text.assemble(("verdict ", "bold"), (doc["verdict"], f"bold {colour}"),
                         f"   score {doc['score']:.3f}   target {target}")
    table = Table(title="evidence per class")
    table.add_column("class", justify="right")
    columns = [("max_margin", "max margin", "{:.2f}"), ("margin_pvalue", "margin p", "{:.2g}"),
               ("collapse_share", "collapse share", "{:.2f}"), ("evidence", "evidence", "{:.2f}")]
    present = [c for c in columns if c[0] in doc["per_class"][0]]
    for _, title, _ in present:
        table.add_column(title, justify="right")
    for row in doc["per_class"]:
        mark = " *" if row["class"] == doc["target"] else ""
        table.add_row(f"{row['class']}{mark}", *(fmt.format(row[key]) for key, _, fmt in present))
    lines = [head, table]
    for name, signal in doc["signals"].items():
        if name == "intercept":
            continue
        if signal.get("skipped"):
            lines.append(Text(f"{name}: not run ({signal.get('reason', 'disabled')})"))
        else:
            raw = {k: v for k, v in signal.items() if k in ("class", "pvalue", "share", "value")}
            shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in raw.items())
            lines.append(Text(f"{name}: {shown} -> {signal['contribution']:+.2f}"))
    t = doc["thresholds"]
    lines.append(Text(f"thresholds: suspicious >= {t['suspicious']:.3f}, backdoored >= {t['backdoored']:.3f} "
                      f"({t.get('calibration', '')}); {doc['timings_s']['total']:.1f} s"))
    return Group(*lines)


def screen_command(
    model: Annotated[Path, typer.Option(help="Model file: safetensors, state dict, or TorchScript.")],
    spec: Annotated[Path, typer.Option(help="Model spec JSON: arch, num_classes, in_channels, input_size, mean, std.")],
    clean: Annotated[
        Path | None,
        typer.Option(help=("Clean data (NPZ or ImageFolder zip/tar.gz); "
                           "without it only data-free signals run.")),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ScreeningReport document on stdout.")] = False,
    fail_on: Annotated[str, typer.Option(help="Exit 1 from this verdict up: suspicious | backdoored.")] = "suspicious",
    margin_steps: Annotated[int | None, typer.Option(help="Maximum-margin optimization steps.")] = None,
    margin_images: Annotated[int | None, typer.Option(help="Random images optimized per class.")] = None,
    unlearn_max_steps: Annotated[int | None, typer.Option(help="Step cap of the clean unlearning.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    contain: Annotated[bool, typer.Option("--contain/--no-contain", help=(
        "Run the model in a contained child process (no access to your files beyond copies of the inputs, no "
        "network, memory and time bounds), as the service does. --no-contain runs it in this process: only for "
        "model files you trust."))] = True,
) -> None:
    from rich.console import Console

    err = Console(stderr=True)
    # a failed contained run is not a verdict: exit 2, never 1 (flagged)
    with exit_codes(err, failed_code=2, bad_input=(ValueError,)):
        flagged = _run(locals(), err=err)
    raise typer.Exit(code=1 if flagged else 0)


def _config(args: dict[str, Any]) -> Any:
    import dataclasses

    from defense_core.screening import ScreeningConfig

    config = ScreeningConfig()
    margin, collapse = config.margin, config.collapse
    if args["margin_steps"] is not None:
        margin = dataclasses.replace(margin, steps=args["margin_steps"])
    if args["margin_images"] is not None:
        margin = dataclasses.replace(margin, images_per_class=args["margin_images"])
    if args["seed"] is not None:
        margin = dataclasses.replace(margin, seed=args["seed"])
        collapse = dataclasses.replace(collapse, seed=args["seed"])
    if args["unlearn_max_steps"] is not None:
        collapse = dataclasses.replace(
            collapse, unlearn=dataclasses.replace(collapse.unlearn, max_steps=args["unlearn_max_steps"])
        )
    return dataclasses.replace(config, margin=margin, collapse=collapse)


def _run(args: dict[str, Any], *, err: Any) -> bool:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from defense_core.data import load_dataset
    from defense_core.errors import InputError
    from defense_core.loading import load_model
    from defense_core.screening import screen
    from defense_core.spec import ModelSpec

    if args["fail_on"] not in FAIL_ON:
        raise InputError(f"--fail-on must be one of {', '.join(FAIL_ON)}, got {args['fail_on']!r}")
    for name in ("model", "spec", "clean"):
        if args[name] is not None and not args[name].is_file():
            raise InputError(f"--{name} {args[name]}: no such file")
    if args["threads"] is not None:
        if args["threads"] < 1:
            raise InputError("--threads must be >= 1")
        torch.set_num_threads(args["threads"])
    config = _config(args)
    model_spec = ModelSpec.from_dict(_read_json(args["spec"], "spec"))
    if not args["contain"]:
        net = load_model(args["model"], model_spec)
        clean_set = load_dataset(args["clean"]) if args["clean"] is not None else None
    reporter = _ProgressReporter(
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            console=err,
            redirect_stdout=False,
            redirect_stderr=False,
        )
    )
    try:
        if args["contain"]:
            doc = _screen_contained(args, model_spec.to_dict(), reporter)
        else:
            doc = screen(net, clean_set, model_spec, config, progress=reporter).to_dict()
    finally:
        reporter.stop()
    if args["as_json"]:
        sys.stdout.write(json.dumps(doc) + "\n")
        err.print(_summary(doc))
    else:
        Console().print(_summary(doc))
    order = ("clean", "suspicious", "backdoored")
    return order.index(doc["verdict"]) >= order.index(args["fail_on"])


def _screen_contained(args: dict[str, Any], spec: dict[str, Any], reporter: Any) -> dict[str, Any]:
    """Copy the inputs into a scratch directory and screen them in a contained child (the
    ``screen`` job kind, as the service runs it)."""
    import os
    import shutil
    import tempfile

    from defense_core.jobs.screen import ScreenRequest
    from defense_core.sandbox import Limits, run_contained

    params = {name: args[name] for name in ("margin_steps", "margin_images", "unlearn_max_steps", "seed")
              if args[name] is not None}
    scratch = Path(tempfile.mkdtemp(prefix="cleanroom-screen-"))
    try:
        (scratch / "in").mkdir()
        shutil.copyfile(args["model"], scratch / "in" / "model")
        clean = None
        if args["clean"] is not None:
            shutil.copyfile(args["clean"], scratch / "in" / "clean")
            clean = "in/clean"
        threads = args["threads"] or len(os.sched_getaffinity(0))
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limits = Limits(wall_seconds=24 * 3600.0, memory_bytes=int(0.8 * physical), threads=threads)
        request = ScreenRequest(model="in/model", clean=clean, params=params, spec=spec)
        task_args = {**request.to_dict(), "device": {"device": "cpu", "threads": threads}, "out": None,
                     "metadata": None}
        return run_contained("screen", task_args, scratch=scratch, limits=limits, reporter=reporter).result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
