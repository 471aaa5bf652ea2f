"""`cleanroom purify` end to end on tiny files: JSON on stdout, the purified
file, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from defense_core.data import save_npz
from defense_core.loading import load_model, save_safetensors
from defense_core.registry import create_model
from defense_core.spec import ModelSpec
from tests.unit.tsbd_fixtures import quadrant_set, single_thread  # noqa: F401

SPEC = {"arch": "small_cnn", "num_classes": 4, "in_channels": 1, "input_size": [8, 8], "mean": [0.5], "std": [0.25]}
FAST = ["--unlearn-max-steps", "3", "--ft-epochs", "1", "--ft-min-steps", "2", "--batch-size", "32"]


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CLI's default CPU mode cache goes under $XDG_CACHE_HOME: keep it in the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    spec = ModelSpec.from_dict(SPEC)
    paths = {"model": tmp_path / "m.safetensors", "spec": tmp_path / "spec.json", "clean": tmp_path / "clean.npz",
             "test": tmp_path / "test.npz", "trigger": tmp_path / "trigger.json", "out": tmp_path / "p.safetensors"}
    save_safetensors(create_model(spec).state_dict(), paths["model"])
    paths["spec"].write_text(json.dumps(SPEC))
    save_npz(paths["clean"], quadrant_set(64, seed=1))
    save_npz(paths["test"], quadrant_set(32, seed=2))
    paths["trigger"].write_text(json.dumps({"type": "badnets", "target": 0}))
    return paths


def _args(files: dict[str, Path], *names: str) -> list[str]:
    return [arg for n in names for arg in (f"--{n}", str(files[n]))]


@pytest.mark.slow
def test_purify_json_document_on_stdout(files: dict[str, Path]) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["purify", *_args(files, "model", "spec", "clean", "test", "trigger", "out"),
                                 *FAST, "--json", "--seed", "3"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # nothing but the document on stdout
    assert set(doc) == {"metrics", "der", "fidelity", "timings_s", "unlearning", "reinit", "top_neurons",
                        "params", "model_sha256", "screening"}
    assert doc["screening"]["verdict"] in ("clean", "suspicious", "backdoored")
    assert isinstance(doc["metrics"]["after"]["asr"], float) and 1 <= doc["unlearning"]["steps"] <= 3
    assert doc["params"]["seed"] == 3
    import hashlib

    assert doc["model_sha256"] == hashlib.sha256(files["out"].read_bytes()).hexdigest()
    purified = load_model(files["out"], ModelSpec.from_dict(SPEC))
    assert set(purified.state_dict()) == set(create_model(ModelSpec.from_dict(SPEC)).state_dict())


def test_purify_remembers_the_cpu_mode_in_the_user_cache(files: dict[str, Path], user_cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from defense_core import cpu_mode, cpu_mode_cache

    monkeypatch.setattr(cpu_mode_cache, "_PROCESS_CACHES", {})  # as if in a new process
    monkeypatch.setattr(cpu_mode, "choose_cpu_mode", lambda *a, **k: ("channels_last", {"fp32": 0.1}))
    # in this process, so the timing can be replaced (a contained run times for real: below)
    args = ["purify", *_args(files, "model", "spec", "clean", "out"), *FAST, "--device", "cpu", "--no-contain"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.stderr
    stored = json.loads((user_cache / "cleanroom" / "cpu-modes.json").read_text())
    assert list(stored.values()) == ["channels_last"]
    # the next run (another process) takes the stored choice instead of timing again
    monkeypatch.setattr(cpu_mode_cache, "_PROCESS_CACHES", {})
    monkeypatch.setattr(cpu_mode, "choose_cpu_mode", lambda *a, **k: pytest.fail("timed again"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr


def test_a_contained_purify_keeps_what_its_child_learned_in_the_user_cache(files: dict[str, Path],
                                                                           user_cache: Path) -> None:
    args = ["purify", *_args(files, "model", "spec", "clean", "out"), *FAST, "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    stored = json.loads((user_cache / "cleanroom" / "cpu-modes.json").read_text())
    assert len(stored) == 1 and next(iter(stored.values())) in ("fp32", "channels_last", "bf16", "bf16_channels_last")


def test_purify_ft_table_output(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(app, ["purify", *_args(files, "model", "spec", "clean", "test", "out"),
                                      "--defense", "ft", "--ft-epochs", "1", "--ft-min-steps", "1"])
    assert result.exit_code == 0, result.stderr
    assert "after_stage1" in result.stdout and "purified model" in result.stdout
    assert files["out"].exists()


@pytest.mark.parametrize("change, message", [
    ({"spec": {"arch": "no_such_net", "num_classes": 4}}, "unknown architecture"),
    ({"extra": ["--poisoned", "{test}", "--trigger", "{trigger}"]}, "not both"),
    ({"extra": ["--neuron-ratio", "lots"]}, "--neuron-ratio"),
    ({"extra": ["--neuron-ratio", "0.1,0.1", "--test", "{test}", "--trigger", "{trigger}"]}, "repeat"),
    ({"extra": ["--neuron-ratio", "sweep"]}, "needs a test set and poisoned data"),
    ({"extra": ["--alpha", "2"]}, "alpha"),
    ({"extra": ["--defense", "ft", "--neuron-ratio", "0.1"]}, "do not apply"),
    ({"extra": ["--poisoned", "{test}"]}, "target"),
    ({"clean": "missing.npz"}, "missing.npz"),
])
def test_bad_input_exits_nonzero_with_one_line(files: dict[str, Path], change: dict, message: str) -> None:
    if "spec" in change:
        files["spec"].write_text(json.dumps(change["spec"]))
    if "clean" in change:
        files["clean"] = files["clean"].parent / change["clean"]
    extra = [a.format(**{k: str(v) for k, v in files.items()}) for a in change.get("extra", [])]
    result = CliRunner().invoke(
        app, ["purify", *_args(files, "model", "spec", "clean", "out"), *FAST, *extra, "--json"]
    )
    assert result.exit_code != 0
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_neuron_ratio_flag_takes_a_number_auto_sweep_or_a_list() -> None:
    from cli.purify import _user_params

    assert _user_params({"neuron_ratio": "0.1"}, {}) == {"neuron_ratio": 0.1}
    assert _user_params({"neuron_ratio": "0.05,0.1,0.2"}, {}) == {"neuron_ratio": [0.05, 0.1, 0.2]}
    assert _user_params({"neuron_ratio": "sweep"}, {}) == {"neuron_ratio": "sweep"}
    assert _user_params({"neuron_ratio": "auto"}, {}) == {"neuron_ratio": "auto"}


def test_purify_sweep_prints_each_n_and_the_one_kept(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        app,
        [
            "purify",
            *_args(files, "model", "spec", "clean", "test", "trigger", "out"),
            *FAST,
            "--neuron-ratio",
            "0.1,0.5",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "neuron ratio sweep" in result.stdout and result.stdout.count("kept") == 2  # title + one row
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith(("│ 0.1 ", "│ 0.5 "))]
    assert len(lines) == 2
