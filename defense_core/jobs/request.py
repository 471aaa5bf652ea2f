"""A purification request: the one description of a ``purify`` job that every entry
point builds (the API at job creation, the worker for its contained child, the child
itself, ``cleanroom purify``), with the rules of what makes it valid.

:meth:`PurifyRequest.validate` makes the checks that need no data: which inputs are
given and their roles, the trigger against the model spec, the parameters.
:meth:`PurifyRequest.load` validates, reads the inputs and checks that they fit the
model, and returns what :func:`defense_core.pipeline.purify` runs on.

Inputs are references whose meaning belongs to the entry point: artifact ids in the
API, file paths in the CLI, file names inside the scratch directory in the child;
``load`` is given the function that turns one into a path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defense_core.attacks import TriggerSpec, apply_trigger, make_poisoned_test_set
from defense_core.defenses import DEFENSES
from defense_core.device import DeviceOptions
from defense_core.errors import InputError
from defense_core.imageset import ImageSet
from defense_core.jobs.params import PurifyConfig
from defense_core.spec import ModelSpec

INPUTS = ("model", "clean", "test", "poisoned")  # the input roles, in reading order


class RequestError(InputError):
    """A request that breaks one of its rules. ``code`` is the stable slug the API
    answers with; ``field`` names the part of the request at fault (``"trigger"``,
    ``"trigger.target"``, ``"params"``, ``"params.neuron_ratio"``, ``"test"``, ...)."""

    def __init__(self, message: str, *, code: str = InputError.code,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field

    def __reduce__(self):  # type: ignore[override]
        return (_rebuild_request_error, (str(self), self.code, self.field))


def _rebuild_request_error(message: str, code: str, field: str | None) -> RequestError:
    return RequestError(message, code=code, field=field)


@dataclass(frozen=True)
class InputNames:
    """What an entry point calls the inputs in its messages (the API: its field names)."""

    test: str = "a test set"
    poisoned: str = "a poisoned set"
    trigger: str = "a trigger"
    poisoned_data: str = "poisoned data (a poisoned set or a trigger)"


ENGINE_NAMES = InputNames()


def check_sweep_inputs(config: PurifyConfig, *, has_test: bool, has_poisoned: bool,
                       names: InputNames = ENGINE_NAMES) -> None:
    """A neuron_ratio sweep keeps the n with the best DER, so it needs both."""
    if config.sweep and not (has_test and has_poisoned):
        raise RequestError(f"params.neuron_ratio: a sweep chooses n by DER, so it needs "
                           f"{names.test} and {names.poisoned_data}",
                           code="sweep-needs-poisoned-data", field="params.neuron_ratio")


def _model_input(spec: ModelSpec | Mapping[str, Any]) -> tuple[int, tuple[int, int, int] | None]:
    """Number of classes and (C, H, W) of a spec; the shape is None when the spec has
    no usable one (the images are then checked when they are loaded)."""
    if isinstance(spec, ModelSpec):
        return spec.num_classes, (spec.in_channels, *spec.input_size)
    num_classes = int(spec["num_classes"])
    try:
        height, width = (int(v) for v in spec["input_size"])
        return num_classes, (int(spec["in_channels"]), height, width)
    except (KeyError, TypeError, ValueError):
        return num_classes, None


def check_trigger(trigger: Mapping[str, Any],
                  *, spec: ModelSpec | Mapping[str, Any] | None = None) -> TriggerSpec:
    """Parse a trigger spec and, given the model spec, check its target label and apply
    it to one blank image of the model's input (a pattern of the wrong depth fails here)."""
    try:
        parsed = TriggerSpec.from_dict(trigger)
    except InputError as exc:
        raise RequestError(f"trigger: {exc}", code=exc.code, field="trigger") from None
    if spec is None:
        return parsed
    num_classes, shape = _model_input(spec)
    if not 0 <= parsed.target < num_classes:
        raise RequestError(f"trigger.target {parsed.target} is outside [0, {num_classes - 1}]",
                           code="label-out-of-range", field="trigger.target")
    if shape is not None:
        try:
            apply_trigger(torch.zeros(1, *shape, dtype=torch.uint8), parsed)
        except InputError as exc:
            raise RequestError(f"trigger: {exc}", code=exc.code, field="trigger") from None
    return parsed


@dataclass(frozen=True)
class LoadedPurify:
    """A loaded request: the inputs read and checked, the config to run them with."""

    model: nn.Module
    spec: ModelSpec
    clean: ImageSet
    test: ImageSet | None
    poisoned: ImageSet | None
    config: PurifyConfig


@dataclass(frozen=True)
class PurifyRequest:
    """Purify ``model`` with ``defense`` on the clean set, measured on ``test`` and on
    ``poisoned`` data: a poisoned set, or ``trigger`` applied to the test set.
    ``spec`` is the model spec (JSON form) when the entry point has it."""

    model: Any
    clean: Any
    test: Any | None = None
    poisoned: Any | None = None
    trigger: Mapping[str, Any] | None = None
    defense: str = "tsbd"
    params: Mapping[str, Any] = field(default_factory=dict)
    spec: Mapping[str, Any] | None = None

    # -- validation

    def check_inputs(self, *, names: InputNames = ENGINE_NAMES) -> None:
        """The defense exists, and the inputs given fit together (no data or spec needed)."""
        if self.defense not in DEFENSES:
            raise RequestError(f"defense must be one of {DEFENSES.names()}, "
                               f"got {self.defense!r}", code="invalid-defense", field="defense")
        if self.poisoned is not None and self.trigger is not None:
            raise RequestError(f"give either {names.poisoned} or {names.trigger}, not both",
                               code="conflicting-inputs", field="trigger")
        if self.trigger is not None and self.test is None:
            raise RequestError(f"a trigger is applied to the test set: {names.test} is required "
                               f"with {names.trigger}", code="missing-test-dataset", field="test")

    def config(self) -> PurifyConfig:
        """The validated parameters of this request."""
        try:
            return PurifyConfig.from_params(self.params, defense=self.defense)
        except InputError as exc:
            raise RequestError(f"params: {exc}", code=exc.code, field="params") from None
        except (TypeError, ValueError) as exc:  # a value of an unexpected JSON type
            raise RequestError(f"params: {exc}", field="params") from None

    def validate(self, *, names: InputNames = ENGINE_NAMES) -> PurifyConfig:
        """Every check that needs no data (the trigger against :attr:`spec` when given);
        :class:`RequestError` on the first rule broken. Returns the config."""
        self.check_inputs(names=names)
        if self.trigger is not None:
            check_trigger(self.trigger, spec=self.spec)
        config = self.config()
        check_sweep_inputs(config, has_test=self.test is not None,
                           has_poisoned=self.poisoned is not None or self.trigger is not None,
                           names=names)
        return config

    # -- loading

    def load(self, *, resolve: Callable[[Any], Path] = Path,
             device: DeviceOptions | None = None) -> LoadedPurify:
        """Validate, read every input (``resolve`` turns a reference into a path) and check
        that it fits the model; the poisoned test set is built from the trigger if given.
        ``device`` (the caller's, never the user's) goes into the config."""
        from defense_core import data, loading

        if self.spec is None:
            raise RequestError("the request has no model spec", field="spec")
        spec = ModelSpec.from_dict(self.spec)
        config = dataclasses.replace(self, spec=spec.to_dict()).validate()
        if device is not None:
            config = dataclasses.replace(config, device=device)
        model = loading.load_model(resolve(self.model), spec)
        clean = data.load_dataset(resolve(self.clean))
        clean.check_fits(spec, what="clean dataset")
        test = None
        if self.test is not None:
            test = data.load_dataset(resolve(self.test))
            test.check_fits(spec, what="test dataset")
        poisoned = None
        if self.poisoned is not None:
            poisoned = data.load_dataset(resolve(self.poisoned))
            poisoned.check_fits(spec, what="poisoned dataset")
        elif self.trigger is not None and test is not None:
            poisoned = make_poisoned_test_set(test, TriggerSpec.from_dict(self.trigger))
        return LoadedPurify(model=model, spec=spec, clean=clean, test=test, poisoned=poisoned,
                            config=config)

    # -- JSON form (the contained child's arguments)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "clean": self.clean, "test": self.test,
                "poisoned": self.poisoned, "trigger": None if self.trigger is None else
                dict(self.trigger), "defense": self.defense, "params": dict(self.params),
                "spec": None if self.spec is None else dict(self.spec)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PurifyRequest:
        return cls(model=data["model"], clean=data["clean"], test=data.get("test"),
                   poisoned=data.get("poisoned"), trigger=data.get("trigger"),
                   defense=data.get("defense", "tsbd"), params=data.get("params") or {},
                   spec=data.get("spec"))
