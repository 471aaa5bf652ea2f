"""Defense speed: per-step costs, precision/layout modes, a full TSBD run.

    .venv/bin/python -m bench.speed [--threads 2] [--quick] [--skip-quality]

Prints tables and writes ``bench/results/speed.md``. Run it on a quiet machine.

1. Step costs on PreAct-ResNet18 (3x32x32, 10 classes, random init, batch
   256 of synthetic images): a plain SGD step (written out here, independent of
   the engine), the engine's unlearning (ascent) step, FT step and AFT step.
   Medians over repeats after warm-up, interleaved round-robin so that drift in
   the machine's load hits every kind alike. Targets: AFT <= 2.2x, unlearning
   <= 1.1x the plain step.
2. Modes: images/s of the AFT step and of evaluation in fp32, channels-last,
   and channels-last + bf16 autocast (only where the CPU has native bf16).
3. A full TSBD run on 2,500 synthetic images: wall time per stage. Unlearning
   is capped at 2 epochs and AFT at 2 epochs (20 + 20 steps) for the timing;
   the table also extrapolates AFT to the default 20 epochs.
4. Effect of the modes on results: a BadNets-backdoored ``small_cnn`` on the
   bundled MNIST digits (trained once, cached in ``bench/.cache``), purified
   with default parameters in each mode: CA / ASR after, and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import CACHE_DIR, cache_key, machine_info, mnist_split
from defense_core.cpu_mode import BF16_MIN_SPEEDUP, CALIBRATION_BATCH, choose_cpu_mode, cpu_supports_bf16
from defense_core.device import DeviceOptions, DeviceRuntime, make_runtime, set_threads
from defense_core.imageset import ImageSet
from defense_core.jobs.params import PurifyConfig
from defense_core.metrics import predict
from defense_core.pipeline import purify
from defense_core.registry import create_model
from defense_core.spec import ModelSpec
from defense_core.transforms import Normalizer
from defense_core.tsbd.aft import AFTStepper, make_optimizer
from defense_core.tsbd.config import AFTConfig, UnlearnConfig
from defense_core.tsbd.unlearning import ascent_step, make_ascent_optimizer

log = logging.getLogger("bench.speed")

RESULTS = Path(__file__).resolve().parent / "results" / "speed.md"
CIFAR_SPEC = ModelSpec(arch="preact_resnet18", num_classes=10, in_channels=3, input_size=(32, 32),
                       mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))


def synthetic(n: int, spec: ModelSpec, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, spec.in_channels, *spec.input_size), generator=g, dtype=torch.uint8)
    return ImageSet(x=x, y=torch.randint(0, spec.num_classes, (n,), generator=g))


def modes() -> dict[str, DeviceOptions]:
    out = {"fp32": DeviceOptions(device="cpu", cpu_bf16=False, channels_last=False),
           "channels_last": DeviceOptions(device="cpu", cpu_bf16=False, channels_last=True)}
    if cpu_supports_bf16():
        out["bf16"] = DeviceOptions(device="cpu", cpu_bf16=True, channels_last=False)
        out["channels_last+bf16"] = DeviceOptions(device="cpu", cpu_bf16=True, channels_last=True)
    return out


def _batch(runtime: DeviceRuntime, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = synthetic(batch, CIFAR_SPEC, seed=1)
    x = runtime.prepare_input(Normalizer(CIFAR_SPEC, runtime.device)(data.x))
    return x, data.y.to(runtime.device)


def _model(runtime: DeviceRuntime) -> nn.Module:
    torch.manual_seed(0)
    return runtime.prepare_model(create_model(CIFAR_SPEC)).train()


def _plain_sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                    runtime: DeviceRuntime) -> None:
    optimizer.zero_grad(set_to_none=True)
    with runtime.autocast():
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    optimizer.step()


STEP_KINDS = ("plain SGD", "unlearning", "FT", "AFT")


def step_costs(runtime: DeviceRuntime, *, batch: int, warmup: int, repeats: int,
               kinds: tuple[str, ...] = STEP_KINDS) -> dict[str, float]:
    """Median seconds per step of each kind, timed round-robin."""
    x, y = _batch(runtime, batch)
    fns: dict[str, Callable[[], object]] = {}
    if "plain SGD" in kinds:
        m_plain = _model(runtime)
        opt_plain = torch.optim.SGD(m_plain.parameters(), lr=0.01, momentum=0.9)
        fns["plain SGD"] = lambda: _plain_sgd_step(m_plain, opt_plain, x, y, runtime)
    if "unlearning" in kinds:
        m_unl = _model(runtime)
        opt_unl = make_ascent_optimizer(m_unl, UnlearnConfig())
        fns["unlearning"] = lambda: ascent_step(m_unl, opt_unl, x, y, runtime=runtime)[0].item()
    for name, alpha in (("FT", 0.0), ("AFT", 0.7)):
        if name in kinds:
            m = _model(runtime)
            cfg = AFTConfig(alpha=alpha)
            stepper = AFTStepper(m, make_optimizer(m, cfg), cfg, runtime=runtime)
            fns[name] = (lambda s: lambda: float(s.step(x, y).loss))(stepper)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def eval_throughput(runtime: DeviceRuntime, *, n: int, repeats: int) -> float:
    model = _model(runtime)
    data = synthetic(n, CIFAR_SPEC, seed=2)
    normalizer = Normalizer(CIFAR_SPEC, runtime.device)
    predict(model, data.x[:64], normalizer=normalizer, runtime=runtime)  # warm-up
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(model, data.x, normalizer=normalizer, batch_size=512, runtime=runtime)
        best.append(time.perf_counter() - start)
    return n / statistics.median(best)


def full_run(options: DeviceOptions, *, n: int, epochs: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(CIFAR_SPEC)
    clean = synthetic(n, CIFAR_SPEC, seed=3)
    config = PurifyConfig.from_params({"unlearn_max_epochs": epochs, "stop_acc": 0.0, "ft_epochs": epochs,
                                       "ft_min_steps": 0})
    config = dataclasses.replace(config, device=options)
    result = purify(model, CIFAR_SPEC, clean, config=config)
    out = dict(result.timings_s)
    out["unlearning_steps"] = float(result.unlearning.steps if result.unlearning else 0)
    out["finetuning_steps"] = float(result.finetune.steps)
    return out


def backdoored_mnist(*, quick: bool) -> tuple[nn.Module, ModelSpec, ImageSet, ImageSet, ImageSet]:
    from defense_core.attacks import TriggerSpec, make_poisoned_test_set
    from defense_core.loading import read_state_dict, save_safetensors
    from defense_core.training import TrainConfig, train_backdoored_model

    spec = ModelSpec(arch="small_cnn", num_classes=10, in_channels=1, input_size=(28, 28),
                     mean=(0.1307,), std=(0.3081,))
    trigger = TriggerSpec.from_dict({"type": "badnets", "target": 0})
    train_cfg = TrainConfig(epochs=2 if quick else 8, lr=0.05)
    split = mnist_split()
    key = cache_key({"bench": "speed", "spec": spec.to_dict(), "trigger": trigger.to_dict(),
                     "train": dataclasses.asdict(train_cfg), "n": len(split.train)})
    path = CACHE_DIR / f"speed-small_cnn-badnets-{key}.safetensors"
    model = create_model(spec)
    if path.exists():
        model.load_state_dict(read_state_dict(path))
    else:
        model = train_backdoored_model(spec, split.train, trigger, ratio=0.1, config=train_cfg, seed=0)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        save_safetensors(model.state_dict(), path)
    return model.cpu().eval(), spec, split.clean, split.test, make_poisoned_test_set(split.test, trigger)


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--skip-full", action="store_true", help="skip section 3 (the full TSBD run)")
    parser.add_argument("--skip-quality", action="store_true", help="skip section 4 (modes vs CA/ASR)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_threads(args.threads)
    batch, warmup, repeats = (32, 1, 2) if args.quick else (256, 2, 5)
    n_full, epochs = (256, 1) if args.quick else (2500, 2)
    lines: list[str] = []

    args.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)
        args.out.write_text("\n".join(lines) + "\n")  # partial results survive an interrupted run

    info = machine_info()
    emit("# Defense speed (bench/speed.py)")
    emit()
    emit(f"Machine: {info['cpu']}, {info['cores']} cores, torch threads {torch.get_num_threads()}, "
         f"native bf16: {cpu_supports_bf16()}; torch {info['torch']}, Python {info['python']}; {info['date']}.")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    emit(f"Load average at start: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min).")
    emit(f"Model: PreAct-ResNet18, 3x32x32, 10 classes, random init; synthetic uint8 images; batch {batch}.")
    emit()

    emit("## 1. Cost of one step relative to a plain SGD step (fp32, same batch)")
    emit()
    emit(f"Median of {repeats} timed steps after {warmup} warm-up steps, kinds interleaved.")
    emit()
    emit("| step | s/step | images/s | x plain SGD | target |")
    emit("|---|---:|---:|---:|---|")
    costs = step_costs(make_runtime(modes()["fp32"]), batch=batch, warmup=warmup, repeats=repeats)
    targets = {"unlearning": "<= 1.1x", "AFT": "<= 2.2x"}
    for name, sec in costs.items():
        emit(f"| {name} | {sec:.3f} | {batch / sec:.0f} | {sec / costs['plain SGD']:.2f} | {targets.get(name, '')} |")
    emit()

    emit("## 2. Precision / layout modes")
    emit()
    emit("| mode | AFT step s | AFT images/s | eval images/s |")
    emit("|---|---:|---:|---:|")
    for name, options in modes().items():
        runtime = make_runtime(options)
        aft = step_costs(runtime, batch=batch, warmup=1, repeats=max(2, repeats // 2), kinds=("AFT",))["AFT"]
        ev = eval_throughput(runtime, n=4 * batch, repeats=3)
        emit(f"| {name} | {aft:.3f} | {batch / aft:.0f} | {ev:.0f} |")
    emit()
    mode, times = choose_cpu_mode(_model(make_runtime(modes()["fp32"])), (3, 32, 32))
    emit(f"Default on this machine (a timed step of {CALIBRATION_BATCH} images, as each job does): "
         f"**{mode}** (" + ", ".join(f"{k} {v:.3f} s" for k, v in times.items())
         + f"; a bf16 mode needs >= {BF16_MIN_SPEEDUP}x over fp32).")
    emit()

    if not args.skip_full:
        emit(f"## 3. Full TSBD run, {n_full} images (default device options)")
        emit()
        emit(f"Unlearning capped at {epochs} epochs (stop_acc 0), AFT at {epochs} epochs (ft_min_steps 0).")
        emit()
        t = full_run(DeviceOptions(), n=n_full, epochs=epochs)
        emit("| stage | wall s | steps | images/s |")
        emit("|---|---:|---:|---:|")
        for stage in ("unlearning", "ranking", "reinitializing", "finetuning", "evaluating", "total"):
            steps = t.get(f"{stage}_steps")
            rate = f"{steps * batch / t[stage]:.0f}" if steps else ""
            emit(f"| {stage} | {t[stage]:.2f} | {int(steps) if steps else ''} | {rate} |")
        default_epochs = AFTConfig().epochs
        emit()
        emit(f"AFT with the default {default_epochs} epochs on {n_full} images: about "
             f"{t['finetuning'] * default_epochs / epochs:.0f} s on this machine (extrapolated).")
        emit()

    if not args.skip_quality:
        emit("## 4. Do the modes change the results? (BadNets small_cnn, MNIST, default parameters)")
        emit()
        model, spec, clean, test, poisoned = backdoored_mnist(quick=args.quick)
        emit(f"Clean set {len(clean)} digits, test {len(test)}, poisoned test {len(poisoned)}; seed 0.")
        emit()
        emit("| mode | CA before | ASR before | CA after | ASR after | unlearning steps | total s |")
        emit("|---|---:|---:|---:|---:|---:|---:|")
        params = {"ft_epochs": 1, "ft_min_steps": 5, "unlearn_max_steps": 5} if args.quick else {}
        for name, options in modes().items():
            config = dataclasses.replace(PurifyConfig.from_params(params), device=options)
            r = purify(model, spec, clean, test=test, poisoned=poisoned, config=config)
            emit(f"| {name} | {pct(r.before.ca)} | {pct(r.before.asr)} | {pct(r.after.ca)} | {pct(r.after.asr)} "
                 f"| {r.unlearning.steps if r.unlearning else 0} | {r.timings_s['total']:.1f} |")
        emit()

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    emit(f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
