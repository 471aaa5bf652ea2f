"""`cleanroom purify`: run a defense locally on files, no service needed.

    cleanroom purify --model m.safetensors --spec spec.json --clean clean.npz \
        [--test test.npz] [--poisoned poisoned.npz | --trigger trigger.json] \
        --out purified.safetensors [--defense tsbd|ft] [--json]

Progress goes to stderr; ``--json`` prints the Result document (exactly the
API's ``GET /v1/jobs/{id}/result``) on stdout and nothing else. Its
``model_sha256`` is the sha256 of the written purified file. Bad input exits
with status 2 and one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.errors import exit_codes

MAX_JSON_BYTES = 1 << 20


def register(app: typer.Typer) -> None:
    """Add ``cleanroom purify`` to the root command."""
    app.command("purify", help="Purify a (possibly backdoored) classifier with TSBD or fine-tuning.")(purify_command)


def _default_mode_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cleanroom" / "cpu-modes.json"


def _read_json(path: Path, what: str) -> Any:
    from defense_core.errors import InputError

    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InputError(f"{what} {path} is larger than {MAX_JSON_BYTES} bytes")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}") from None


def _user_params(flags: Mapping[str, Any], augment: dict[str, Any]) -> dict[str, Any]:
    params = {k: v for k, v in flags.items() if v is not None}
    if "neuron_ratio" in params and params["neuron_ratio"] not in ("auto", "sweep"):
        from defense_core.errors import InputError

        try:
            values = [float(v) for v in params["neuron_ratio"].split(",")]
        except ValueError:
            raise InputError("--neuron-ratio must be a number in (0, 1], 'auto', 'sweep' or a comma-separated "
                             f"list of numbers to sweep, got {params['neuron_ratio']!r}") from None
        params["neuron_ratio"] = values if len(values) > 1 else values[0]
    if augment:
        params["augment"] = augment
    return params


class _ProgressReporter:
    """A rich progress bar per stage, on stderr."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.started = False

    def stop(self) -> None:
        if self.started:
            self.progress.stop()

    def update(self, *, stage: str, step: int, total: int | None, metrics: Mapping[str, float] | None = None) -> None:
        if not self.started:  # shown from the first update on, so an early error stays one line
            self.progress.start()
            self.started = True
        shown = " ".join(f"{k}={v:.3g}" for k, v in (metrics or {}).items())
        description = f"{stage:<15} {shown}"
        if stage not in self.tasks:
            for task in self.tasks.values():  # a new stage: close the previous bars
                self.progress.update(task, total=self.progress.tasks[task].completed or 1,
                                     completed=self.progress.tasks[task].completed or 1)
            self.tasks[stage] = self.progress.add_task(description, total=total)
        self.progress.update(self.tasks[stage], completed=step, total=total, description=description)


def _purify_contained(args: dict[str, Any], request: Any, device: Any,
                      reporter: _ProgressReporter) -> dict[str, Any]:
    """Copy the inputs into a scratch directory and purify them in a contained child."""
    import dataclasses
    import hashlib
    import shutil
    import tempfile

    from defense_core.jobs.request import INPUTS
    from defense_core.sandbox import Limits, run_contained

    scratch = Path(tempfile.mkdtemp(prefix="cleanroom-purify-"))
    try:
        (scratch / "in").mkdir()
        (scratch / "out").mkdir()
        names: dict[str, str | None] = {}
        for role in INPUTS:
            names[role] = None
            if args[role] is not None:
                shutil.copyfile(args[role], scratch / "in" / role)
                names[role] = f"in/{role}"
        cache = Path(device.mode_cache) if device.mode_cache else None
        if cache is not None and cache.is_file() and cache.stat().st_size <= MAX_JSON_BYTES:
            shutil.copyfile(cache, scratch / "cpu-modes.json")
        threads = device.threads or len(os.sched_getaffinity(0))
        memory = args["memory_limit_gib"]
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        limits = Limits(
            wall_seconds=args["time_limit_s"] or 24 * 3600.0,
            memory_bytes=int(memory * 2**30) if memory else int(0.8 * physical),
            threads=threads,
        )
        child_device = {"device": device.device, "cpu_bf16": device.cpu_bf16,
                        "channels_last": device.channels_last, "threads": threads,
                        "mode_cache": "cpu-modes.json"}
        task_args = {**dataclasses.replace(request, **names).to_dict(), "device": child_device,
                     "out": "out/purified.safetensors", "metadata": {"defense": request.defense}}
        doc = run_contained("purify", task_args, scratch=scratch, limits=limits,
                            reporter=reporter).result
        written = scratch / "out" / "purified.safetensors"
        digest = hashlib.sha256()
        with written.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != doc.get("model_sha256"):
            raise RuntimeError("the purified model does not match the digest the contained run "
                               "reported")
        shutil.move(str(written), args["out"])
        learned = scratch / "cpu-modes.json"
        if cache is not None and learned.is_file() and learned.stat().st_size <= MAX_JSON_BYTES:
            try:
                if isinstance(json.loads(learned.read_text(encoding="utf-8")), dict):
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(learned, cache)
            except (OSError, ValueError):
                pass
        return doc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _table(doc: dict[str, Any]) -> Any:
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    table = Table(title="Cleanroom purification")
    table.add_column("stage")
    for column in ("CA", "ASR", "RA"):
        table.add_column(column, justify="right")
    for stage, m in doc["metrics"].items():
        table.add_row(stage, pct(m["ca"]), pct(m["asr"]), pct(m["ra"]))
    sweep = doc["reinit"].get("sweep")
    if not sweep:
        return table
    from rich.console import Group

    swept = Table(title="neuron ratio sweep (after both stages; the best DER is kept)")
    for column in ("n", "CA", "ASR", "RA", "DER", ""):
        swept.add_column(column, justify="right")
    for p in sweep:
        a = p["after"]
        swept.add_row(f"{p['neuron_ratio']:g}", pct(a["ca"]), pct(a["asr"]), pct(a["ra"]),
                      "-" if p["der"] is None else f"{p['der']:.4f}", "kept" if p["chosen"] else "")
    return Group(table, swept)


def _summary(doc: dict[str, Any]) -> str:
    der = "-" if doc["der"] is None else f"{doc['der']:.4f}"
    return (f"DER {der}, {doc['reinit']['neurons_zeroed']} neurons / {doc['reinit']['weights_zeroed']} weights "
            f"zeroed, {doc['unlearning']['steps']} unlearning steps, total {doc['timings_s']['total']:.1f} s")


def purify_command(
    model: Annotated[Path, typer.Option(help="Model file: safetensors, state dict, or TorchScript.")],
    spec: Annotated[Path, typer.Option(help="Model spec JSON: arch, num_classes, in_channels, input_size, mean, std.")],
    clean: Annotated[Path, typer.Option(help="Clean defense data: NPZ or ImageFolder zip/tar.gz.")],
    out: Annotated[Path, typer.Option(help="Where to write the purified model (safetensors).")],
    test: Annotated[Path | None, typer.Option(help="Clean test set, for clean accuracy.")] = None,
    poisoned: Annotated[Path | None, typer.Option(help="Poisoned test NPZ (x, y, target), for ASR/RA.")] = None,
    trigger: Annotated[Path | None, typer.Option(help=(
        "Trigger spec JSON, applied to --test, instead of --poisoned."))] = None,
    defense: Annotated[str, typer.Option(help="tsbd | ft")] = "tsbd",
    neuron_ratio: Annotated[str | None, typer.Option(help=(
        "n, share of neurons reinitialized; 'auto' (chosen from clean data); 'sweep' or a comma-separated list such "
        "as 0.05,0.1,0.2 (each n run, the best DER on --test and --poisoned/--trigger kept)."))] = None,
    weight_ratio: Annotated[float | None, typer.Option(help="m, share of their weights zeroed.")] = None,
    alpha: Annotated[float | None, typer.Option(help="AFT mix of the perturbed gradient.")] = None,
    rho: Annotated[float | None, typer.Option(help="AFT perturbation radius r.")] = None,
    perturb_norm: Annotated[str | None, typer.Option(help="tensor | global")] = None,
    ft_epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs.")] = None,
    ft_min_steps: Annotated[int | None, typer.Option(help="Minimum fine-tuning steps.")] = None,
    ft_lr: Annotated[float | None, typer.Option(help="Fine-tuning learning rate.")] = None,
    ft_noise_blend: Annotated[float | None, typer.Option(help=(
        "Share of fine-tuning images blended with fresh random noise (weight 0.1-0.3, labels kept), against blended "
        "triggers; default 0.5 with TSBD, 0 with --defense ft; 0 gives the paper's fine-tuning exactly."))] = None,
    unlearn_lr: Annotated[float | None, typer.Option(help="Clean-unlearning learning rate.")] = None,
    unlearn_max_epochs: Annotated[int | None, typer.Option(help="Clean-unlearning epoch cap.")] = None,
    unlearn_max_steps: Annotated[int | None, typer.Option(help="Clean-unlearning step cap.")] = None,
    stop_acc: Annotated[float | None, typer.Option(help="Unlearning stop accuracy (default 1/K).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size.")] = None,
    crop_padding: Annotated[int | None, typer.Option(help="Random-crop padding (0: off).")] = None,
    hflip: Annotated[bool | None, typer.Option("--hflip/--no-hflip", help="Random horizontal flips.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda[:N] (default: CUDA if available).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help=(
        "CPU bf16 autocast (default: chosen by timing a training step of the model; see --channels-last)."))] = None,
    channels_last: Annotated[bool | None, typer.Option("--channels-last/--no-channels-last", help=(
        "Channels-last memory format (default on CPU: chosen by timing a training step of the model in each mode; "
        "bf16 must be >= 1.5x and channels-last alone >= 1.1x faster than fp32)."))] = None,
    cpu_mode_cache: Annotated[Path | None, typer.Option(help=(
        "JSON file that remembers the timed CPU mode per model architecture and input shape, so repeated runs on "
        "this machine compute the same way (default: $XDG_CACHE_HOME/cleanroom/cpu-modes.json, else "
        "~/.cache/...)."))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the Result document on stdout.")] = False,
    contain: Annotated[bool, typer.Option("--contain/--no-contain", help=(
        "Run the model in a contained child process (no access to your files beyond copies of the inputs, no network, "
        "memory and time bounds), as the service does. --no-contain runs it in this process: only for model files you "
        "trust."))] = True,
    memory_limit_gib: Annotated[float | None, typer.Option("--memory-limit-gib", help=(
        "Memory bound of the contained run (default: 80% of this machine's memory)."))] = None,
    time_limit_s: Annotated[float | None, typer.Option("--time-limit-s", help=(
        "Wall-clock bound of the contained run, in seconds (default: 24 h)."))] = None,
) -> None:
    from rich.console import Console

    err = Console(stderr=True)
    with exit_codes(err, failed_code=1):
        _run(locals(), err=err)


def _request_params(args: Mapping[str, Any]) -> dict[str, Any]:
    """The user parameters given as flags: one flag per parameter of the request type
    (the augment object's fields are flags of their own)."""
    from defense_core.jobs.params import AUGMENT_FIELDS, PARAMS

    flags = {p.name: args[p.name] for p in PARAMS if p.kind != "augment"}
    augment = {f.name: args[f.name] for f in AUGMENT_FIELDS if args[f.name] is not None}
    return _user_params(flags, augment)


def _run(args: dict[str, Any], *, err: Any) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from defense_core.device import DeviceOptions
    from defense_core.errors import InputError
    from defense_core.jobs import get_job_kind
    from defense_core.jobs.request import PurifyRequest
    from defense_core.spec import ModelSpec

    for name in ("model", "spec", "clean", "test", "poisoned", "trigger"):
        if args[name] is not None and not args[name].is_file():
            raise InputError(f"--{name} {args[name]}: no such file")
    if not args["out"].parent.is_dir():
        raise InputError(f"output folder {args['out'].parent} does not exist")
    if args["threads"] is not None and args["threads"] < 1:
        raise InputError("--threads must be >= 1")
    device = DeviceOptions(device=args["device"], cpu_bf16=args["bf16"],
                           channels_last=args["channels_last"], threads=args["threads"],
                           mode_cache=str(args["cpu_mode_cache"] or _default_mode_cache()))

    model_spec = ModelSpec.from_dict(_read_json(args["spec"], "spec"))
    trigger = _read_json(args["trigger"], "trigger") if args["trigger"] is not None else None
    request = PurifyRequest(model=args["model"], clean=args["clean"], test=args["test"],
                            poisoned=args["poisoned"], trigger=trigger, defense=args["defense"],
                            params=_request_params(args), spec=model_spec.to_dict())
    request.validate()  # refused here, before anything starts
    reporter = _ProgressReporter(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), console=err, redirect_stdout=False,
                                          redirect_stderr=False))
    try:
        if args["contain"]:
            doc = _purify_contained(args, request, device, reporter)
        else:
            kind = get_job_kind("purify")
            doc = kind.run(request.load(device=device), out=args["out"], reporter=reporter)
        sha256 = doc["model_sha256"]
    finally:
        reporter.stop()
    if args["as_json"]:
        sys.stdout.write(json.dumps(doc) + "\n")
        err.print(_table(doc))
        err.print(_summary(doc), markup=False, highlight=False)
    else:
        Console().print(_table(doc))
        Console().print(_summary(doc), markup=False, highlight=False)
        Console().print(f"purified model: {args['out']} (sha256 {sha256})", markup=False, highlight=False)
