"""The job kinds purify, screen and intake: registry entries, the screen request's rules,
and each kind run end to end on tiny sklearn-digits models (clean and BadNets-backdoored)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import defense_core.defenses.tsbd as tsbd_module
import defense_core.screening.collapse as collapse_module
from defense_core.data import save_npz
from defense_core.imageset import ImageSet
from defense_core.jobs import available_job_kinds, get_job_kind
from defense_core.jobs.intake import IntakeRequest
from defense_core.jobs.request import InputNames, LoadedPurify, PurifyRequest, RequestError
from defense_core.jobs.screen import LoadedScreen, ScreenRequest
from defense_core.loading import save_safetensors
from defense_core.screening import CollapseConfig, MarginConfig, ScreeningConfig
from tests.unit.digits_fixtures import DIGITS_SPEC, TARGET

SPEC = DIGITS_SPEC
API_NAMES = InputNames(test="test_dataset_id", poisoned="poisoned_dataset_id", trigger="trigger",
                       poisoned_data="poisoned_dataset_id or trigger")
COMMON = {"model": "m", "clean": "c", "test": None, "poisoned": None, "trigger": None, "defense": "tsbd",
          "params": {}, "spec": None}
# the default unlearning (as calibrated): the tiny digits models reach tau in 100-250 steps
FAST_SCREEN = ScreeningConfig(margin=MarginConfig(images_per_class=4, steps=40), collapse=CollapseConfig())
# purify and intake: the default margin search (about half a second here), the short collapse
# (only ft runs it; a TSBD run reads its own stage-1 unlearning)
JOB_SCREEN = dataclasses.replace(ScreeningConfig(), collapse=FAST_SCREEN.collapse)
FAST_PURIFY = {"unlearn_lr": 1e-3, "ft_epochs": 2, "ft_min_steps": 4}  # batch 256: the collapse is calibrated so
FAST_SCREEN_PARAMS = {"margin_steps": 40, "margin_images": 4}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)




def _loaded_purify(model: nn.Module, clean: ImageSet, *, defense: str = "tsbd") -> LoadedPurify:
    params = FAST_PURIFY if defense == "tsbd" else {k: v for k, v in FAST_PURIFY.items() if k != "unlearn_lr"}
    config = PurifyRequest(model="m", clean="c", defense=defense, params=params).validate()
    return LoadedPurify(model=model, spec=SPEC, clean=clean, test=None, poisoned=None,
                        config=dataclasses.replace(config, screening=JOB_SCREEN))


class Stages:
    def __init__(self) -> None:
        self.stages: list[str] = []

    def update(self, *, stage: str, step: int, total: int | None, metrics=None) -> None:
        if not self.stages or self.stages[-1] != stage:
            self.stages.append(stage)


# ---------------------------------------------------------------- registry and requests

def test_the_three_kinds_are_registered_and_run_as_contained_tasks() -> None:
    from defense_core.sandbox.tasks import available_tasks

    assert available_job_kinds() == ["intake", "purify", "screen"]
    assert get_job_kind("screen").request is ScreenRequest
    assert issubclass(get_job_kind("intake").request, PurifyRequest)
    assert {"intake", "purify", "screen"} <= set(available_tasks())


@pytest.mark.parametrize("given, field, name", [
    ({"test": "t"}, "test", "test_dataset_id"),
    ({"poisoned": "p"}, "poisoned", "poisoned_dataset_id"),
    ({"trigger": {"type": "badnets", "target": 1}}, "trigger", "trigger"),
])
def test_a_screening_refuses_test_poisoned_and_trigger_inputs(given: dict, field: str, name: str) -> None:
    request = ScreenRequest.from_dict({**COMMON, **given})
    with pytest.raises(RequestError) as caught:
        request.check_inputs(names=API_NAMES)
    assert (caught.value.code, caught.value.field) == ("unexpected-input", field)
    assert name in str(caught.value)


def test_a_screen_request_from_the_common_dict_ignores_the_defense_and_survives_its_json_form() -> None:
    request = ScreenRequest.from_dict({**COMMON, "defense": "ft", "params": {"margin_steps": 20},
                                       "spec": SPEC.to_dict()})
    request.check_inputs(names=API_NAMES)
    config = dataclasses.replace(request, spec=SPEC.to_dict()).validate(names=API_NAMES)
    assert config.margin.steps == 20 and config.margin.images_per_class == ScreeningConfig().margin.images_per_class
    assert ScreenRequest.from_dict(request.to_dict()) == request
    assert ScreenRequest.from_dict({"model": "m", "clean": None}).validate() == ScreeningConfig()


@pytest.mark.parametrize("params, message", [
    ({"neuron_ratio": 0.1}, "params: unknown parameters: ['neuron_ratio']; known: ['margin_images'"),
    ({"margin_steps": 0}, "params: parameter 'margin_steps' must be in [1, 10000]"),
    ({"seed": "x"}, "params: parameter 'seed' must be an integer"),
])
def test_screening_params_are_validated(params: dict, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        ScreenRequest(model="m", clean="c", params=params).validate()
    assert caught.value.field == "params" and str(caught.value).startswith(message)


def test_screen_and_intake_refuse_a_model_with_fewer_than_three_classes() -> None:
    two = {**SPEC.to_dict(), "num_classes": 2}
    for request in (ScreenRequest(model="m", clean="c", spec=two), IntakeRequest(model="m", clean="c", spec=two)):
        with pytest.raises(RequestError) as caught:
            request.validate()
        assert (caught.value.code, caught.value.field) == ("too-few-classes", "spec")
    assert type(IntakeRequest.from_dict(COMMON)) is IntakeRequest
    PurifyRequest(model="m", clean="c", spec=two).validate()  # purify does not need the screening


# ---------------------------------------------------------------- the kinds end to end, in process

def test_screen_kind_returns_the_report_and_writes_nothing(tiny_models: dict, digits: tuple,
                                                           tmp_path: Path) -> None:
    loaded = LoadedScreen(model=tiny_models["backdoored"], spec=SPEC, clean=digits[1], config=FAST_SCREEN)
    stages = Stages()
    doc = get_job_kind("screen").run(loaded, out=tmp_path / "out", metadata=None, reporter=stages)
    assert list(doc) == ["verdict", "score", "target", "signals", "per_class", "thresholds", "timings_s"]
    assert doc["verdict"] != "clean" and doc["target"] == TARGET
    assert stages.stages == ["screening"] and not (tmp_path / "out").exists()
    json.dumps(doc, allow_nan=False)


def _counting_unlearn(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for module, name in ((tsbd_module, "tsbd"), (collapse_module, "screening")):
        original = module.unlearn_

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "unlearn_", counted)
    return calls


def test_purify_screens_on_its_own_stage1_unlearning(tiny_models: dict, digits: tuple, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_unlearn(monkeypatch)
    stages = Stages()
    doc = get_job_kind("purify").run(_loaded_purify(tiny_models["backdoored"], digits[1]),
                                     out=tmp_path / "p.safetensors", reporter=stages)
    assert calls == ["tsbd"]  # one unlearning, shared by the screening and the defense
    screening = doc["screening"]
    assert screening["signals"]["unlearning_collapse"]["source"] == "given"
    assert set(screening) == {"verdict", "score", "target", "signals", "per_class", "thresholds", "timings_s"}
    assert stages.stages[:4] == ["loading", "unlearning", "screening", "ranking"]
    assert (tmp_path / "p.safetensors").is_file() and len(doc["model_sha256"]) == 64


def test_ft_purify_runs_the_whole_screening_first(tiny_models: dict, digits: tuple, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_unlearn(monkeypatch)
    stages = Stages()
    doc = get_job_kind("purify").run(_loaded_purify(tiny_models["clean"], digits[1], defense="ft"),
                                     out=tmp_path / "p.safetensors", reporter=stages)
    assert calls == ["screening"]
    assert doc["screening"]["signals"]["unlearning_collapse"]["source"] == "computed"
    assert stages.stages == ["loading", "screening", "finetuning", "evaluating"]


def test_intake_leaves_a_clean_model_alone_for_the_cost_of_a_screening(
        tiny_models: dict, digits: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_unlearn(monkeypatch)
    out = tmp_path / "purified.safetensors"
    doc = get_job_kind("intake").run(_loaded_purify(tiny_models["clean"], digits[1]), out=out)
    assert calls == ["screening"]  # the screening's short unlearning; TSBD's stage 1 never starts
    assert list(doc) == ["task", "decision", "screening"]
    assert doc["task"] == "intake" and doc["decision"]["purified"] is False
    assert doc["decision"]["reason"].startswith("verdict clean: score ")
    assert doc["screening"]["verdict"] == "clean" and not out.exists()


def test_intake_purifies_a_backdoored_model_screened_once(tiny_models: dict, digits: tuple, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_unlearn(monkeypatch)
    stages = Stages()
    out = tmp_path / "purified.safetensors"
    doc = get_job_kind("intake").run(_loaded_purify(tiny_models["backdoored"], digits[1]), out=out,
                                     metadata={"job": "j1"}, reporter=stages)
    assert calls == ["screening", "tsbd"]  # the screening's verdict, then the purification (not screened again)
    assert stages.stages.count("screening") == 1 and "finetuning" in stages.stages
    assert doc["task"] == "intake" and doc["decision"]["purified"] is True
    assert f"suspected target {TARGET}" in doc["decision"]["reason"]
    assert doc["screening"]["target"] == TARGET and doc["screening"]["verdict"] != "clean"
    assert {"metrics", "timings_s", "unlearning", "reinit", "top_neurons", "params", "model_sha256"} <= set(doc)
    import hashlib

    assert hashlib.sha256(out.read_bytes()).hexdigest() == doc["model_sha256"]
    json.dumps(doc, allow_nan=False)


# ---------------------------------------------------------------- through the contained child

@pytest.mark.slow  # about 5 s: a fresh interpreter imports torch
def test_screen_runs_in_the_contained_child(tiny_models: dict, digits: tuple, tmp_path: Path) -> None:
    from defense_core.sandbox import Limits, run_contained

    save_safetensors(tiny_models["backdoored"].state_dict(), tmp_path / "model")
    save_npz(tmp_path / "clean.npz", digits[1])
    request = ScreenRequest.from_dict({**COMMON, "model": "model", "clean": "clean.npz",
                                       "params": FAST_SCREEN_PARAMS, "spec": SPEC.to_dict()})
    args = {**request.to_dict(), "device": {"threads": 1}, "out": "out/none", "metadata": {}}
    stages = Stages()
    doc = run_contained("screen", args, scratch=tmp_path, limits=Limits(wall_seconds=120, threads=1),
                        reporter=stages).result
    assert doc["verdict"] != "clean" and doc["target"] == TARGET
    assert stages.stages == ["screening"] and not (tmp_path / "out").exists()


def test_a_two_class_model_is_purified_without_a_screening(tmp_path: Path) -> None:
    from defense_core.registry import create_model
    from tests.unit.tsbd_fixtures import quadrant_set

    spec = dataclasses.replace(SPEC, num_classes=2)
    torch.manual_seed(0)
    config = PurifyRequest(model="m", clean="c", params={**FAST_PURIFY, "unlearn_max_steps": 5}).validate()
    loaded = LoadedPurify(model=create_model(spec), spec=spec, clean=quadrant_set(32, num_classes=2), test=None,
                          poisoned=None, config=config)
    doc = get_job_kind("purify").run(loaded, out=tmp_path / "p.safetensors")
    assert doc["screening"] is None and (tmp_path / "p.safetensors").is_file()
