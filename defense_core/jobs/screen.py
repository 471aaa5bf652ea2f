"""The ``screen`` job kind: a verdict on a model from clean data alone, no purification.

:class:`ScreenRequest` takes the model, an optional clean set (without it only the
data-free signal runs) and a few screening options in ``params``; a test set, poisoned
set or trigger has no use here and is refused. :func:`run_screen` returns the
ScreeningReport document and writes no file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from defense_core.device import DeviceOptions
from defense_core.errors import InputError
from defense_core.imageset import ImageSet
from defense_core.jobs import register_job_kind
from defense_core.jobs.params import MAX_SEED, Param, _integer
from defense_core.jobs.request import ENGINE_NAMES, InputNames, RequestError
from defense_core.progress import CancelHook, Reporter
from defense_core.screening import ScreeningConfig, screen
from defense_core.spec import ModelSpec

MIN_CLASSES = 3  # the maximum-margin test compares a class with at least two others

# The screening options a job may set (the same knobs as `cleanroom screen`); every
# other value is the calibrated default of ScreeningConfig.
SCREEN_PARAMS: tuple[Param, ...] = (
    Param("margin_steps", "integer", ScreeningConfig().margin.steps,
          "maximum-margin optimization steps", lo=1, hi=10_000),
    Param("margin_images", "integer", ScreeningConfig().margin.images_per_class,
          "random images optimized per class", lo=1, hi=1_000),
    Param("unlearn_max_steps", "integer", ScreeningConfig().collapse.unlearn.max_steps,
          "step cap of the clean unlearning", lo=1, hi=1_000_000),
    Param("seed", "integer", 0, "seeds the random images and the unlearning", lo=0, hi=MAX_SEED),
)
SCREEN_PARAMS_BY_NAME = {p.name: p for p in SCREEN_PARAMS}


def screening_config(params: Mapping[str, Any] | None) -> ScreeningConfig:
    """The screening config of user parameters (:data:`SCREEN_PARAMS`); InputError on
    unknown names, wrong types or out-of-range values."""
    if params is not None and not isinstance(params, Mapping):
        raise InputError("params must be a JSON object")
    params = dict(params or {})
    unknown = set(params) - set(SCREEN_PARAMS_BY_NAME)
    if unknown:
        raise InputError(f"unknown parameters: {sorted(unknown)}; known: {sorted(SCREEN_PARAMS_BY_NAME)}")
    value = {name: _integer(params, name, p, p.default) for name, p in SCREEN_PARAMS_BY_NAME.items()}
    config = ScreeningConfig()
    margin = dataclasses.replace(config.margin, steps=value["margin_steps"],
                                 images_per_class=value["margin_images"], seed=value["seed"])
    collapse = dataclasses.replace(config.collapse, seed=value["seed"], unlearn=dataclasses.replace(
        config.collapse.unlearn, max_steps=value["unlearn_max_steps"]))
    return dataclasses.replace(config, margin=margin, collapse=collapse)


def check_screenable(spec: Mapping[str, Any] | None) -> None:
    """A model can be screened when it has at least three classes (unknown without a spec)."""
    if spec is None:
        return
    try:
        num_classes = int(spec["num_classes"])
    except (KeyError, TypeError, ValueError):
        return  # the spec's own validation says what is wrong with it
    if num_classes < MIN_CLASSES:
        raise RequestError(f"screening needs a model with at least {MIN_CLASSES} classes, the spec has "
                           f"{num_classes}", code="too-few-classes", field="spec")


@dataclass(frozen=True)
class LoadedScreen:
    model: nn.Module
    spec: ModelSpec
    clean: ImageSet | None
    config: ScreeningConfig


@dataclass(frozen=True)
class ScreenRequest:
    """Screen ``model`` with the clean set ``clean`` (None: data-free signals only).
    ``test``, ``poisoned`` and ``trigger`` exist so that a request giving them is
    refused by name; ``spec`` is the model spec (JSON form) when the entry point has it."""

    model: Any
    clean: Any | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    spec: Mapping[str, Any] | None = None
    test: Any | None = None
    poisoned: Any | None = None
    trigger: Mapping[str, Any] | None = None

    def check_inputs(self, *, names: InputNames = ENGINE_NAMES) -> None:
        """No test set, poisoned set or trigger: a screening measures nothing with them."""
        for role, given, name in (("test", self.test, names.test), ("poisoned", self.poisoned, names.poisoned),
                                  ("trigger", self.trigger, names.trigger)):
            if given is not None:
                raise RequestError(f"a screening takes the model and clean data only: remove {name}",
                                   code="unexpected-input", field=role)

    def config(self) -> ScreeningConfig:
        try:
            return screening_config(self.params)
        except InputError as exc:
            raise RequestError(f"params: {exc}", code=exc.code, field="params") from None

    def validate(self, *, names: InputNames = ENGINE_NAMES) -> ScreeningConfig:
        """Every check that needs no data (the class count against :attr:`spec` when
        given); :class:`RequestError` on the first rule broken. Returns the config."""
        self.check_inputs(names=names)
        check_screenable(self.spec)
        return self.config()

    def load(self, *, resolve: Callable[[Any], Path] = Path,
             device: DeviceOptions | None = None) -> LoadedScreen:
        """Validate and read the model and the clean set. The screening runs on the CPU
        (``screen`` takes no device), so ``device`` is not used."""
        from defense_core import data, loading

        if self.spec is None:
            raise RequestError("the request has no model spec", field="spec")
        spec = ModelSpec.from_dict(self.spec)
        config = dataclasses.replace(self, spec=spec.to_dict()).validate()
        model = loading.load_model(resolve(self.model), spec)
        clean = None
        if self.clean is not None:
            clean = data.load_dataset(resolve(self.clean))
            clean.check_fits(spec, what="clean dataset")
        return LoadedScreen(model=model, spec=spec, clean=clean, config=config)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "clean": self.clean, "test": self.test, "poisoned": self.poisoned,
                "trigger": None if self.trigger is None else dict(self.trigger), "params": dict(self.params),
                "spec": None if self.spec is None else dict(self.spec)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScreenRequest:
        """From the common job dict; its ``defense`` has no meaning here and is ignored."""
        return cls(model=data["model"], clean=data.get("clean"), params=data.get("params") or {},
                   spec=data.get("spec"), test=data.get("test"), poisoned=data.get("poisoned"),
                   trigger=data.get("trigger"))


@register_job_kind("screen", request=ScreenRequest)
def run_screen(loaded: LoadedScreen, *, out: Path | None = None, metadata: Mapping[str, Any] | None = None,
               reporter: Reporter | None = None, cancel: CancelHook | None = None) -> dict[str, Any]:
    """Screen the loaded model; the document is the ScreeningReport. Writes nothing at ``out``."""
    report = screen(loaded.model, loaded.clean, loaded.spec, loaded.config, progress=reporter,
                    should_stop=cancel)
    return report.to_dict()
