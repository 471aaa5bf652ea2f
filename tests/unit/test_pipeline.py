"""The purification pipeline: result document, stage order, determinism,
cancellation, the FT baseline and parameter validation."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from typing import ClassVar

import pytest
import torch

import defense_core.pipeline as pipeline_module
from defense_core.defenses import available_defenses
from defense_core.device import DeviceRuntime
from defense_core.errors import Cancelled, DatasetError, InputError
from defense_core.imageset import ImageSet
from defense_core.jobs.params import PurifyConfig
from defense_core.metrics import evaluate
from defense_core.pipeline import purify
from defense_core.progress import STAGES
from tests.unit.tsbd_fixtures import SPEC, TinyNet, quadrant_set, single_thread, trained_tiny  # noqa: F401

FAST = {"unlearn_lr": 0.01, "ft_epochs": 2, "ft_min_steps": 4, "batch_size": 64, "neuron_ratio": 0.2}


@functools.lru_cache(maxsize=1)
def _model() -> TinyNet:
    return trained_tiny()


def _poisoned() -> ImageSet:
    # "Triggered" images: class-1..3 images with a bright top-left patch, target 0.
    data = quadrant_set(60, seed=11)
    keep = data.y != 0
    x = data.x[keep].clone()
    x[:, :, :4, :4] = 255
    return ImageSet(x=x, y=data.y[keep], target=torch.zeros(int(keep.sum()), dtype=torch.int64))


class Recorder:
    def __init__(self) -> None:
        self.stages: list[str] = []

    def update(self, *, stage, step, total, metrics=None) -> None:
        assert total is None or 0 <= step <= total
        assert all(isinstance(v, float) for v in (metrics or {}).values())
        self.stages.append(stage)


def _run(params=None, *, defense="tsbd", **kwargs):
    config = PurifyConfig.from_params({**FAST, **(params or {})} if defense == "tsbd"
                                      else {k: v for k, v in {**FAST, **(params or {})}.items()
                                            if k not in ("unlearn_lr", "neuron_ratio")}, defense=defense)
    return purify(_model(), SPEC, quadrant_set(128, seed=1), config=config, **kwargs)


def test_result_document_shape_and_types() -> None:
    recorder = Recorder()
    model_before = {k: v.clone() for k, v in _model().state_dict().items()}
    result = _run(test=quadrant_set(80, seed=2), poisoned=_poisoned(), reporter=recorder)
    doc = result.to_document("ab" * 32)
    json.dumps(doc, allow_nan=False)
    assert set(doc) == {"metrics", "der", "fidelity", "timings_s", "unlearning", "reinit", "top_neurons",
                        "params", "model_sha256", "screening"}
    assert doc["screening"]["signals"]["unlearning_collapse"]["source"] == "given"  # stage 1's predictions
    assert set(doc["metrics"]) == {"before", "after_stage1", "after"}
    for entry in doc["metrics"].values():
        assert set(entry) == {"ca", "asr", "ra"} and all(isinstance(v, float) for v in entry.values())
        assert all(0.0 <= v <= 1.0 for v in entry.values())
    assert doc["metrics"]["before"]["ca"] == 1.0
    assert isinstance(doc["der"], float) and (doc["fidelity"] is None or isinstance(doc["fidelity"], float))
    assert set(doc["timings_s"]) == {"unlearning", "ranking", "reinitializing", "finetuning", "evaluating", "total"}
    assert all(isinstance(v, float) and v >= 0 for v in doc["timings_s"].values())
    assert set(doc["unlearning"]) == {"epochs", "steps", "final_clean_acc"}
    assert isinstance(doc["unlearning"]["steps"], int) and doc["unlearning"]["final_clean_acc"] <= 0.25
    assert doc["reinit"]["neuron_ratio"] == 0.2 and doc["reinit"]["weight_ratio"] == 0.7
    # TinyNet ranks conv1 (4) + block.conv (8) = 12 neurons; ceil(0.2 * 12) = 3.
    assert doc["reinit"]["neurons_zeroed"] == 3 and doc["reinit"]["weights_zeroed"] > 0
    assert len(doc["top_neurons"]) == 12
    assert [set(n) for n in doc["top_neurons"]] == [{"layer", "channel", "nwc"}] * 12
    nwc = [n["nwc"] for n in doc["top_neurons"]]
    assert nwc == sorted(nwc, reverse=True)
    assert doc["params"]["stop_acc"] == 0.25 and doc["params"]["ft_epochs"] == 2
    assert doc["model_sha256"] == "ab" * 32
    # Stages reported in the contract's order.
    order = [STAGES.index(s) for s in recorder.stages]
    assert order == sorted(order) and set(recorder.stages) == set(STAGES)
    # The caller's model is untouched; the result holds different, CPU, contiguous weights.
    for k, v in _model().state_dict().items():
        assert torch.equal(v, model_before[k])
    assert set(result.state_dict) == set(model_before)
    assert not torch.equal(result.state_dict["conv1.weight"], model_before["conv1.weight"])


def test_without_test_set_ca_is_null() -> None:
    doc = _run(params={"ft_epochs": 1, "ft_min_steps": 1}).to_document("0" * 64)
    assert doc["metrics"]["after"] == {"ca": None, "asr": None, "ra": None}
    assert doc["der"] is None and doc["fidelity"] is None


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a = _run({"seed": 7}).state_dict
    b = _run({"seed": 7}).state_dict
    c = _run({"seed": 8}).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_cancellation_between_steps() -> None:
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 5

    with pytest.raises(Cancelled):
        _run(cancel=cancel)
    assert len(calls) == 6


def test_ft_baseline_skips_stage1() -> None:
    test = quadrant_set(40, seed=2)
    result = _run(defense="ft", test=test)
    doc = result.to_document("f" * 64)
    assert doc["metrics"]["after_stage1"] == doc["metrics"]["before"]
    assert doc["unlearning"] == {"epochs": 0, "steps": 0, "final_clean_acc": 0.0}
    assert doc["reinit"] == {"neuron_ratio": 0.0, "weight_ratio": 0.0, "neurons_zeroed": 0, "weights_zeroed": 0}
    assert doc["top_neurons"] == [] and doc["params"]["alpha"] == 0.0
    assert result.finetune.steps == 4


class _AutocastProbe(TinyNet):
    """Notes, per forward pass, whether the model was training and CPU autocast was on."""

    seen: ClassVar[list[tuple[bool, bool]]] = []  # on the class, so purify's copy of the model writes here too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _AutocastProbe.seen.append((self.training, torch.is_autocast_enabled("cpu")))
        return super().forward(x)


def test_metrics_are_measured_in_full_precision_when_training_runs_under_autocast(monkeypatch) -> None:
    # bf16 autocast forced for this job whatever the CPU; the reported metrics must
    # still be those of the full-precision model (what a user deploys).
    monkeypatch.setattr(pipeline_module, "make_runtime",
                        lambda *args, **kwargs: DeviceRuntime(torch.device("cpu"), autocast_dtype=torch.bfloat16))
    probe = _AutocastProbe()
    probe.load_state_dict(_model().state_dict())
    _AutocastProbe.seen.clear()
    test, poisoned = quadrant_set(80, seed=2), _poisoned()
    config = PurifyConfig.from_params({"ft_epochs": 2, "ft_min_steps": 4, "batch_size": 64}, defense="ft")
    config = dataclasses.replace(config, screening=None)  # its own unlearning would count as training here
    result = purify(probe, SPEC, quadrant_set(128, seed=1), test=test, poisoned=poisoned, config=config)
    training = [autocast for was_training, autocast in _AutocastProbe.seen if was_training]
    measuring = [autocast for was_training, autocast in _AutocastProbe.seen if not was_training]
    assert len(training) == 4 and all(training)  # the fine-tuning steps ran under autocast
    assert measuring and not any(measuring)      # no measurement did
    purified = TinyNet()
    purified.load_state_dict(result.state_dict)
    assert result.after == evaluate(purified, SPEC, test=test, poisoned=poisoned)


def test_defense_registry() -> None:
    assert available_defenses() == ["ft", "tsbd"]
    with pytest.raises(InputError, match="known: ft, tsbd"):
        PurifyConfig.from_params({}, defense="nad")


@pytest.mark.parametrize("params", [
    {"neuron_ratio": 0}, {"neuron_ratio": 1.5}, {"neuron_ratio": "most"}, {"weight_ratio": True},
    {"alpha": -0.1}, {"rho": 0}, {"perturb_norm": "layer"}, {"ft_epochs": 0}, {"ft_epochs": 2.5},
    {"batch_size": 100_000}, {"seed": -1}, {"stop_acc": 1.0}, {"augment": {"crop": 2}},
    {"augment": {"hflip": "yes"}}, {"augment": 3}, {"learning_rate": 0.1}, {"rho": 0.1, "r": 0.1},
    {"unlearn_lr": float("nan")},
])
def test_invalid_params_raise_input_error(params) -> None:
    with pytest.raises(InputError):
        PurifyConfig.from_params(params)


def test_noise_blends_are_on_for_tsbd_and_off_for_the_ft_baseline_unless_given() -> None:
    from defense_core.jobs.params import DEFAULT_NOISE_BLEND
    from defense_core.tsbd.config import AFTConfig

    assert AFTConfig().noise_blend == 0.0  # the paper's stage 2 as a library default
    tsbd = PurifyConfig.from_params({})
    assert tsbd.aft.noise_blend == DEFAULT_NOISE_BLEND == 0.5 and tsbd.aft.reestimates_bn
    assert tsbd.to_params()["ft_noise_blend"] == 0.5
    assert PurifyConfig.from_params({}, defense="ft").aft.noise_blend == 0.0
    exact = PurifyConfig.from_params({"ft_noise_blend": 0})
    assert exact.aft.noise_blend == 0.0 and not exact.aft.reestimates_bn
    assert PurifyConfig.from_params({"ft_noise_blend": 0.25}, defense="ft").aft.noise_blend == 0.25


def test_params_parse_and_round_trip() -> None:
    cfg = PurifyConfig.from_params({"r": 0.1, "neuron_ratio": "auto", "augment": {"hflip": True}, "ft_epochs": 3.0})
    assert cfg.aft.rho == 0.1 and cfg.reinit.neuron_ratio == "auto" and cfg.augment.hflip
    assert cfg.aft.epochs == 3 and isinstance(cfg.aft.epochs, int)
    assert PurifyConfig.from_params(cfg.to_params()) == cfg
    with pytest.raises(InputError, match="do not apply"):
        PurifyConfig.from_params({"alpha": 0.5}, defense="ft")
    with pytest.raises(InputError):
        PurifyConfig.from_params([1, 2])  # type: ignore[arg-type]


def test_inputs_that_do_not_fit_the_spec_are_rejected() -> None:
    wrong = ImageSet(x=torch.zeros(4, 3, 8, 8, dtype=torch.uint8), y=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(DatasetError, match="clean set"):
        purify(_model(), SPEC, wrong)
    no_target = quadrant_set(8)
    with pytest.raises(DatasetError, match="target"):
        purify(_model(), SPEC, quadrant_set(8), poisoned=no_target)


def test_torchscript_model_is_purified_like_the_eager_one() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(copy.deepcopy(_model()))
    original = {k: v.clone() for k, v in scripted.state_dict().items()}
    eager = _run({"seed": 5})
    config = PurifyConfig.from_params({**FAST, "seed": 5})
    result = purify(scripted, SPEC, quadrant_set(128, seed=1), config=config)
    assert result.reinit == eager.reinit
    assert [n.layer for n in result.top_neurons] == [n.layer for n in eager.top_neurons]
    for k, v in result.state_dict.items():
        torch.testing.assert_close(v, eager.state_dict[k], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, original[k]) for k, v in scripted.state_dict().items())


def test_auto_neuron_ratio_uses_the_clean_data_rule() -> None:
    from defense_core.tsbd.choose_n import DEFAULT_GRID

    doc = _run({"neuron_ratio": "auto"}).to_document("0" * 64)
    assert doc["reinit"]["neuron_ratio"] in DEFAULT_GRID
    assert doc["params"]["neuron_ratio"] == "auto"


def test_sweep_keeps_the_n_with_the_best_der_and_equals_that_single_run() -> None:
    test, poisoned = quadrant_set(80, seed=2), _poisoned()
    recorder = Recorder()
    swept = _run({"neuron_ratio": [0.1, 0.5, 0.9]}, test=test, poisoned=poisoned, reporter=recorder)
    doc = swept.to_document("0" * 64)
    json.dumps(doc, allow_nan=False)
    points = doc["reinit"]["sweep"]
    assert [p["neuron_ratio"] for p in points] == [0.1, 0.5, 0.9]
    assert [p["chosen"] for p in points].count(True) == 1
    chosen = next(p for p in points if p["chosen"])
    # the highest DER, the smallest n on a tie
    ders = [p["der"] for p in points]
    assert chosen is points[ders.index(max(ders))]
    assert doc["reinit"]["neuron_ratio"] == chosen["neuron_ratio"] and doc["der"] == chosen["der"]
    assert doc["metrics"]["after"] == chosen["after"]
    assert doc["params"]["neuron_ratio"] == [0.1, 0.5, 0.9]
    # every point starts from the original weights with the same batches: the kept model
    # is exactly the one a single run with that n produces
    single = _run({"neuron_ratio": chosen["neuron_ratio"]}, test=test, poisoned=poisoned)
    assert single.after == swept.after and single.reinit == swept.reinit
    assert all(torch.equal(v, single.state_dict[k]) for k, v in swept.state_dict.items())
    # and the other points differ (the sweep did run them)
    assert len({(p["after"]["ca"], p["after"]["asr"], p["after_stage1"]["ca"]) for p in points}) > 1
    assert recorder.stages.count("evaluating") >= 3


def test_sweep_needs_test_and_poisoned_data_and_valid_values() -> None:
    with pytest.raises(InputError, match="needs a test set and poisoned data"):
        _run({"neuron_ratio": "sweep"}, test=quadrant_set(20, seed=2))
    from defense_core.jobs.params import SWEEP_RATIOS

    assert PurifyConfig.from_params({"neuron_ratio": "sweep"}).sweep == SWEEP_RATIOS
    cfg = PurifyConfig.from_params({"neuron_ratio": [0.2, 0.1]})
    assert cfg.sweep == (0.1, 0.2) and PurifyConfig.from_params(cfg.to_params()) == cfg  # run smallest first
    for bad, message in (([0.1], "2 to 16"), ([0.1] * 2, "repeat"), ([0.1, 0], "neuron_ratio"),
                         ([0.1, "x"], "number"), ([i / 20 for i in range(1, 19)], "2 to 16")):
        with pytest.raises(InputError, match=message):
            PurifyConfig.from_params({"neuron_ratio": bad})
    with pytest.raises(InputError, match="do not apply"):
        PurifyConfig.from_params({"neuron_ratio": "sweep"}, defense="ft")


def test_a_model_that_makes_training_diverge_is_the_inputs_fault() -> None:
    from defense_core.errors import TrainingDivergedError

    huge = copy.deepcopy(_model())
    with torch.no_grad():
        for p in huge.parameters():
            p.fill_(3e38)
    config = PurifyConfig.from_params(FAST)
    with pytest.raises(TrainingDivergedError, match="try a smaller unlearn_lr") as caught:
        purify(huge, SPEC, quadrant_set(128, seed=1), config=config)
    assert isinstance(caught.value, InputError) and caught.value.code == "training-diverged"
