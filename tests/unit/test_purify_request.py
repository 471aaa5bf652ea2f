"""The purify request type: its rules (with the codes and fields the API answers with),
its JSON form, loading from files, and the registries behind job kinds and defenses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defense_core.data import save_npz
from defense_core.defenses import DEFENSES, available_defenses
from defense_core.errors import InputError, UnknownArchitectureError
from defense_core.jobs import available_job_kinds, get_job_kind
from defense_core.jobs.params import PurifyConfig
from defense_core.jobs.request import (
    InputNames,
    LoadedPurify,
    PurifyRequest,
    RequestError,
    check_trigger,
)
from defense_core.loading import save_safetensors
from defense_core.registry import MODELS, Registry, create_model
from defense_core.spec import ModelSpec
from tests.unit.tsbd_fixtures import quadrant_set, single_thread  # noqa: F401

SPEC = {"arch": "small_cnn", "num_classes": 4, "in_channels": 1, "input_size": [8, 8],
        "mean": [0.5], "std": [0.25]}
API_NAMES = InputNames(test="test_dataset_id", poisoned="poisoned_dataset_id", trigger="trigger",
                       poisoned_data="poisoned_dataset_id or trigger")
BADNETS = {"type": "badnets", "target": 1}


def _refused(request: PurifyRequest, *, names: InputNames = API_NAMES) -> RequestError:
    with pytest.raises(RequestError) as caught:
        request.validate(names=names)
    assert isinstance(caught.value, InputError)
    return caught.value


@pytest.mark.parametrize("request_kwargs, code, field, message", [
    ({"defense": "nad"}, "invalid-defense", "defense", "defense must be one of ['ft', 'tsbd']"),
    ({"test": "t", "poisoned": "p", "trigger": BADNETS}, "conflicting-inputs", "trigger",
     "give either poisoned_dataset_id or trigger, not both"),
    ({"trigger": BADNETS}, "missing-test-dataset", "test",
     "a trigger is applied to the test set: test_dataset_id is required with trigger"),
    ({"test": "t", "trigger": {"type": "laser", "target": 0}}, "invalid-input", "trigger",
     "trigger: unknown trigger type 'laser'"),
    ({"test": "t", "trigger": {"type": "badnets", "target": 7}}, "label-out-of-range",
     "trigger.target", "trigger.target 7 is outside [0, 3]"),
    ({"params": {"neuron_ratio": 1.5}}, "invalid-input", "params",
     "params: parameter 'neuron_ratio' must be in (0.0, 1.0], got 1.5"),
    ({"defense": "ft", "params": {"alpha": 0.5}}, "invalid-input", "params",
     "params: parameters ['alpha'] do not apply to the 'ft' defense"),
    ({"test": "t", "params": {"neuron_ratio": "sweep"}}, "sweep-needs-poisoned-data",
     "params.neuron_ratio", ("params.neuron_ratio: a sweep chooses n by DER, so it needs "
                             "test_dataset_id and poisoned_dataset_id or trigger")),
])
def test_each_rule_has_its_code_field_and_message(request_kwargs, code, field, message) -> None:
    error = _refused(PurifyRequest(model="m", clean="c", spec=SPEC, **request_kwargs))
    assert (error.code, error.field) == (code, field)
    assert str(error).startswith(message)


def test_a_valid_request_gives_its_config() -> None:
    request = PurifyRequest(model="m", clean="c", test="t", trigger=BADNETS, spec=SPEC,
                            params={"neuron_ratio": [0.1, 0.05], "seed": 3})
    config = request.validate()
    assert config == PurifyConfig.from_params({"neuron_ratio": [0.1, 0.05], "seed": 3})
    assert config.sweep == (0.05, 0.1)


def test_the_engine_names_the_inputs_in_its_own_words() -> None:
    request = PurifyRequest(model="m", clean="c", test="t", params={"neuron_ratio": "sweep"})
    error = _refused(request, names=InputNames())
    assert "needs a test set and poisoned data" in str(error)


def test_a_trigger_is_checked_against_the_model_input() -> None:
    rgb = {"type": "blended", "target": 0, "pattern": [[[1, 2, 3]]]}
    assert check_trigger(rgb, spec={**SPEC, "in_channels": 3}).type == "blended"
    with pytest.raises(RequestError, match="3 channels, the images have 2"):
        check_trigger(rgb, spec={"num_classes": 4, "in_channels": 2, "input_size": [8, 8]})
    # without a spec (or a usable input shape) only the trigger itself is checked
    assert check_trigger({"type": "badnets", "target": 50}).target == 50
    assert check_trigger(BADNETS, spec={"num_classes": 4}).target == 1


def test_a_request_survives_its_json_form() -> None:
    request = PurifyRequest(model="in/model", clean="in/clean", test="in/test", trigger=BADNETS,
                            defense="ft", params={"seed": 1}, spec=SPEC)
    assert PurifyRequest.from_dict(request.to_dict()) == request
    assert set(request.to_dict()) == {"model", "clean", "test", "poisoned", "trigger", "defense",
                                      "params", "spec"}


def test_load_reads_and_checks_the_inputs_and_builds_the_poisoned_set(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_safetensors(create_model(ModelSpec.from_dict(SPEC)).state_dict(), tmp_path / "model")
    save_npz(tmp_path / "clean.npz", quadrant_set(16, seed=1))
    save_npz(tmp_path / "test.npz", quadrant_set(16, seed=2))
    request = PurifyRequest(model="model", clean="clean.npz", test="test.npz", trigger=BADNETS,
                            spec=SPEC, params={"seed": 4})
    loaded = request.load(resolve=lambda name: tmp_path / name)
    assert isinstance(loaded, LoadedPurify) and loaded.config.seed == 4
    assert loaded.poisoned is not None and bool((loaded.poisoned.target == 1).all())
    assert loaded.test is not None and len(loaded.poisoned) == int((loaded.test.y != 1).sum())
    with pytest.raises(RequestError, match="no model spec"):
        PurifyRequest(model="model", clean="clean.npz").load(resolve=lambda name: tmp_path / name)


def test_job_kinds_are_registry_entries() -> None:
    assert available_job_kinds() == ["intake", "purify", "screen"]
    kind = get_job_kind("purify")
    assert kind.request is PurifyRequest and callable(kind.run)
    with pytest.raises(InputError, match="unknown job kind 'audit'; known: intake, purify, screen"):
        get_job_kind("audit")
    from defense_core.sandbox.tasks import available_tasks

    assert "purify" in available_tasks()  # every job kind runs as a contained task


def test_one_registry_helper_for_every_kind_of_entry() -> None:
    assert available_defenses() == ["ft", "tsbd"] and "tsbd" in DEFENSES and [] not in DEFENSES
    with pytest.raises(UnknownArchitectureError, match="unknown architecture 'nope'"):
        MODELS.get("nope")
    registry: Registry[int] = Registry("widget")
    registry.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("a", 2)
    with pytest.raises(InputError, match="unknown widget 'b'; known: a"):
        registry.get("b")
