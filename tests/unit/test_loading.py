"""Safe model loading: formats, refusals (nothing unpickled), mismatches by name."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from defense_core.errors import ModelLoadError, TooLargeError, UnsafeModelError
from defense_core.loading import (
    inspect_model_file,
    load_model,
    read_state_dict,
    save_safetensors,
    sniff_model_format,
)
from defense_core.registry import create_model
from defense_core.spec import ModelSpec

SPEC = ModelSpec(arch="small_cnn", num_classes=3, in_channels=1, input_size=(16, 16))


class _CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(path, "w")``: a file appears if anything unpickles it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[override]
        return (open, (self.path, "w"))


class _RunsShellWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[override]
        return (os.system, (f"touch {self.path}",))


@pytest.fixture()
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model(SPEC)
    # Non-trivial BN statistics, so a lost buffer would change the outputs.
    m.train()
    with torch.no_grad():
        m(torch.rand(8, 1, 16, 16))
    return m.eval()


def _scripted(model: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(path))
    return path


# ------------------------------------------------------------------ refusals (known answers)


def test_pickle_with_side_effect_in_torch_save_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": _CreatesFileWhenUnpickled(marker)}, evil)
    assert sniff_model_format(evil) == "state_dict"  # looks like a normal torch.save file
    with pytest.raises(UnsafeModelError, match="would need arbitrary unpickling"):
        read_state_dict(evil)
    with pytest.raises(UnsafeModelError):
        load_model(evil, SPEC)
    assert not marker.exists()


def test_raw_pickle_running_a_shell_command_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "touched"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_RunsShellWhenUnpickled(marker)))
    with pytest.raises(UnsafeModelError, match=r"save a state_dict with torch.save"):
        load_model(evil, SPEC)
    assert not marker.exists()


def test_legacy_torch_save_with_side_effect_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "legacy.pt"
    torch.save({"a": _CreatesFileWhenUnpickled(marker)}, evil, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeModelError):
        read_state_dict(evil)
    assert not marker.exists()


def test_whole_pickled_module_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeModelError, match="state_dict"):
        load_model(path, SPEC)


def test_unknown_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(UnsafeModelError, match="not a recognized model format"):
        sniff_model_format(path)


def test_size_limit(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    save_safetensors(model.state_dict(), path)
    with pytest.raises(TooLargeError):
        read_state_dict(path, max_bytes=path.stat().st_size - 1)


def test_safetensors_with_offsets_outside_the_file_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    assert sniff_model_format(path) == "safetensors"
    with pytest.raises(ModelLoadError, match="'w' has invalid data offsets"):
        read_state_dict(path)


def test_non_tensor_values_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save({"conv1.weight": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(ModelLoadError, match="'epoch' holds a int"):
        read_state_dict(path)


# ------------------------------------------------------------------ mismatches by name


def test_wrong_shape_reports_the_key(tmp_path: Path, model: torch.nn.Module) -> None:
    state = dict(model.state_dict())
    state["fc.weight"] = torch.zeros(5, state["fc.weight"].shape[1])
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError) as info:
        load_model(path, SPEC)
    msg = str(info.value)
    assert "shape mismatch (1): fc.weight: file [5, 64] vs model [3, 64]" in msg


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, model: torch.nn.Module) -> None:
    state = dict(model.state_dict())
    del state["conv2.weight"]
    state["head.weight"] = torch.zeros(1)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError) as info:
        load_model(path, SPEC)
    assert "missing (1): conv2.weight" in str(info.value)
    assert "unexpected (1): head.weight" in str(info.value)


def test_many_missing_keys_are_summarized(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"something": torch.zeros(1)}, str(path))
    # 3 convs + 3 BN x 4 (the step counters may be absent) + fc weight and bias = 17.
    with pytest.raises(ModelLoadError, match=r"missing \(17\): conv1.weight, .*\(17 in all\)"):
        load_model(path, SPEC)


def test_nan_weights_are_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelLoadError, match=r"NaN or infinite values \(1\): conv1.weight"):
        load_model(path, SPEC)


# ------------------------------------------------------------------ accepted formats


def _outputs(m: torch.nn.Module) -> torch.Tensor:
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(x)


def test_safetensors_round_trip_is_exact(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    digest = save_safetensors(model.state_dict(), path, metadata={"arch": "small_cnn"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sniff_model_format(path) == "safetensors"
    loaded = load_model(path, SPEC)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)
    assert not loaded.training
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_state_dict_under_a_wrapper_key_with_dataparallel_prefix(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "ckpt.pth"
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 7, "best_acc": 0.9}, path)
    assert sniff_model_format(path) == "state_dict"
    loaded = load_model(path, SPEC)
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)


def test_state_dict_under_model_key(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "num_classes": 3}, path)
    state = read_state_dict(path)
    assert set(state) == set(model.state_dict())


def test_legacy_torch_save_state_dict_loads(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert sniff_model_format(path) == "state_dict"
    torch.testing.assert_close(_outputs(load_model(path, SPEC)), _outputs(model), rtol=0, atol=0)


def test_missing_batchnorm_step_counters_are_tolerated(tmp_path: Path, model: torch.nn.Module) -> None:
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.safetensors"
    save_file(state, str(path))
    torch.testing.assert_close(_outputs(load_model(path, SPEC)), _outputs(model), rtol=0, atol=0)


def test_inspect_reports_counts(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    save_safetensors(model.state_dict(), path)
    info = inspect_model_file(path, SPEC)
    assert info.to_dict() == {
        "format": "safetensors",
        "arch": "small_cnn",
        "num_tensors": len(model.state_dict()),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


# ------------------------------------------------------------------ TorchScript


def test_torchscript_loads_only_when_declared(tmp_path: Path, model: torch.nn.Module) -> None:
    path = _scripted(model, tmp_path / "m.ts")
    assert sniff_model_format(path) == "torchscript"
    with pytest.raises(ModelLoadError, match=r'declare spec.arch "torchscript"'):
        load_model(path, SPEC)
    with pytest.raises(ModelLoadError):
        read_state_dict(path)
    ts_spec = ModelSpec(arch="torchscript", num_classes=3, in_channels=1, input_size=(16, 16))
    loaded = load_model(path, ts_spec)
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)
    info = inspect_model_file(path, ts_spec)
    assert info.format == "torchscript" and info.num_parameters == sum(p.numel() for p in model.parameters())


def test_torchscript_with_wrong_output_width_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    path = _scripted(model, tmp_path / "m.ts")
    ts_spec = ModelSpec(arch="torchscript", num_classes=10, in_channels=1, input_size=(16, 16))
    with pytest.raises(ModelLoadError, match=r"to \[1, 3\]; expected \[1, 10\]"):
        inspect_model_file(path, ts_spec)


def test_torchscript_that_cannot_take_the_input_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    path = _scripted(model, tmp_path / "m.ts")
    ts_spec = ModelSpec(arch="torchscript", num_classes=3, in_channels=3, input_size=(16, 16))
    with pytest.raises(ModelLoadError, match=r"fails on a \[1, 3, 16, 16\] input"):
        inspect_model_file(path, ts_spec)


def test_state_dict_declared_as_torchscript_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    save_safetensors(model.state_dict(), path)
    ts_spec = ModelSpec(arch="torchscript", num_classes=3, in_channels=1, input_size=(16, 16))
    with pytest.raises(ModelLoadError, match="give the registry architecture name"):
        load_model(path, ts_spec)


# ------------------------------------------------------------------ torch.export

EXPORT_SPEC = ModelSpec(arch="torch_export", num_classes=3, in_channels=1, input_size=(16, 16))


def _exported(model: torch.nn.Module, path: Path, *, dynamic_batch: bool = True, decompose: bool = False) -> Path:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    ep = torch.export.export(model, (torch.rand(2, 1, 16, 16),), dynamic_shapes=shapes)
    torch.export.save(ep.run_decompositions() if decompose else ep, path)
    return path


def test_exported_model_loads_only_when_declared(tmp_path: Path, model: torch.nn.Module) -> None:
    path = _exported(model, tmp_path / "m.bin")  # the name says nothing
    assert sniff_model_format(path) == "torch_export"
    with pytest.raises(ModelLoadError, match=r'declare spec.arch "torch_export"'):
        load_model(path, SPEC)
    with pytest.raises(ModelLoadError):
        read_state_dict(path)
    with pytest.raises(ModelLoadError, match=r'declare spec.arch "torch_export"'):
        load_model(path, ModelSpec(arch="torchscript", num_classes=3, in_channels=1, input_size=(16, 16)))
    loaded = load_model(path, EXPORT_SPEC)
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)
    assert set(loaded.state_dict()) == set(model.state_dict())  # the original layer names
    info = inspect_model_file(path, EXPORT_SPEC)
    assert info.format == "torch_export" and info.num_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("export_mode", ["eval", "train"])
def test_exported_model_trains_and_evaluates_like_the_eager_one(tmp_path: Path, model: torch.nn.Module,
                                                                 export_mode: str) -> None:
    from defense_core.defenses.run import copy_model
    from defense_core.tsbd.aft import _tracked_batchnorms
    from defense_core.tsbd.nwc import ranked_conv_layers

    model.train(export_mode == "train")
    path = _exported(model, tmp_path / "m.pt2")
    model.eval()
    loaded = load_model(path, EXPORT_SPEC)
    assert not loaded.training
    assert ranked_conv_layers(loaded) == ranked_conv_layers(model) == ["conv1", "conv2", "conv3"]
    assert len(_tracked_batchnorms(loaded)) == 3
    eager, exported = copy.deepcopy(model), copy_model(loaded)
    assert all(p.is_leaf for p in exported.parameters())
    x = torch.rand(6, 1, 16, 16)
    for _ in range(2):  # train mode: batch statistics, running statistics and counters updated
        eager.train(), exported.train()
        torch.testing.assert_close(exported(x), eager(x))
    torch.testing.assert_close(exported.state_dict(), eager.state_dict())
    eager.eval(), exported.eval()
    torch.testing.assert_close(exported(x), eager(x))
    # the copy is independent of the loaded model
    assert not torch.equal(loaded.state_dict()["bn1.running_mean"], exported.state_dict()["bn1.running_mean"])


def test_exported_dropout_follows_the_mode(tmp_path: Path) -> None:
    class WithDropout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.drop = torch.nn.Dropout(0.5, inplace=True)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.drop(self.conv(x).mean(dim=(2, 3))))

    torch.manual_seed(0)
    eager = WithDropout().eval()
    loaded = load_model(_exported(eager, tmp_path / "d.pt2"), EXPORT_SPEC)
    x = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(loaded(x), eager(x))
    loaded.train(), eager.train()
    torch.manual_seed(1)
    dropped = loaded(x)
    torch.manual_seed(1)
    torch.testing.assert_close(dropped, eager(x))
    assert not torch.allclose(dropped, loaded.eval()(x))


def test_decomposed_export_with_batchnorm_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    path = _exported(model, tmp_path / "m.pt2", decompose=True)
    with pytest.raises(ModelLoadError, match="mode cannot be switched"):
        load_model(path, EXPORT_SPEC)


def test_export_without_a_dynamic_batch_is_refused_by_inspection(tmp_path: Path, model: torch.nn.Module) -> None:
    path = _exported(model, tmp_path / "m.pt2", dynamic_batch=False)
    with pytest.raises(ModelLoadError, match=r"fails on a \[1, 1, 16, 16\] input \(export the model with a dynamic"):
        inspect_model_file(path, EXPORT_SPEC)


def test_inspection_runs_a_normalized_random_batch(tmp_path: Path) -> None:
    from defense_core.loading import INSPECT_BATCH, probe_inputs

    class IgnoresTheBatch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(1, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean().reshape(1, 1))  # [1, 3] whatever the batch

    spec = ModelSpec(arch="torchscript", num_classes=3, in_channels=1, input_size=(16, 16), mean=(0.5,), std=(0.25,))
    with pytest.raises(ModelLoadError, match=rf"maps a \[{INSPECT_BATCH}, 1, 16, 16\] input to \[1, 3\]"):
        inspect_model_file(_scripted(IgnoresTheBatch(), tmp_path / "m.ts"), spec)
    zeros, images = probe_inputs(spec)
    assert zeros.shape == (1, 1, 16, 16) and not zeros.any()
    assert images.shape[0] == INSPECT_BATCH > 1
    assert images.min() >= -2.0 and images.max() <= 2.0 and images.std() > 0.5  # (u - 0.5) / 0.25
    torch.testing.assert_close(probe_inputs(spec)[1], images, rtol=0, atol=0)  # seeded


def test_exported_model_is_purified_like_the_eager_one_and_saves_as_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from defense_core.jobs.params import PurifyConfig
    from defense_core.pipeline import purify
    from tests.unit.tsbd_fixtures import SPEC as TINY_SPEC
    from tests.unit.tsbd_fixtures import TinyNet, quadrant_set, trained_tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager = trained_tiny().eval()
        ep = torch.export.export(eager, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(ep, tmp_path / "tiny.pt2")
        spec = ModelSpec(arch="torch_export", num_classes=4, in_channels=1, input_size=(8, 8), mean=(0.5,), std=(0.25,))
        exported = load_model(tmp_path / "tiny.pt2", spec)
        original = {k: v.clone() for k, v in exported.state_dict().items()}
        params = {"unlearn_lr": 0.01, "ft_epochs": 2, "ft_min_steps": 4, "batch_size": 64,
                  "neuron_ratio": 0.2, "seed": 5}
        clean = quadrant_set(128, seed=1)
        expected = purify(copy.deepcopy(eager), TINY_SPEC, clean, config=PurifyConfig.from_params(params))
        result = purify(exported, spec, clean, config=PurifyConfig.from_params(params))
    finally:
        torch.set_num_threads(threads)
    assert result.reinit == expected.reinit
    assert [(n.layer, n.channel) for n in result.top_neurons] == [(n.layer, n.channel) for n in expected.top_neurons]
    assert set(result.state_dict) == set(expected.state_dict)
    for k, v in result.state_dict.items():
        torch.testing.assert_close(v, expected.state_dict[k], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, original[k]) for k, v in exported.state_dict().items())  # input untouched
    save_safetensors(result.state_dict, tmp_path / "purified.safetensors")
    TinyNet().load_state_dict(load_file(str(tmp_path / "purified.safetensors")), strict=True)
