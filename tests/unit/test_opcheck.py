"""Operator checks for code-carrying models: real hostile TorchScript and
torch.export archives are refused with the operator named, and write nothing."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from defense_core import opcheck
from defense_core.errors import ForbiddenOperatorError, UnsafeModelError
from defense_core.loading import load_model
from defense_core.registry import create_model
from defense_core.spec import ModelSpec

TS_SPEC = ModelSpec(arch="torchscript", num_classes=2, in_channels=1, input_size=(8, 8))
EXPORT_SPEC = ModelSpec(arch="torch_export", num_classes=3, in_channels=1, input_size=(16, 16))


@torch.library.custom_op("cleanroom_opcheck_test::leak", mutates_args=())
def _leak(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_leak.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Unpickled:
    """Creates ``path`` when unpickled (``open(path, "w")``)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[override]
        return (open, (self.path, "w"))


# ------------------------------------------------------------------ TorchScript models


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class FromFileInForward(_Head):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.path, shared=True, size=8, dtype=torch.uint8)
        mapped.fill_(65)
        return self.logits(x) + mapped[0].float() * 0


class SaveInSetstate(nn.Module):
    """``torch.jit.load`` runs ``__setstate__``, which writes ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.weight = nn.Parameter(torch.zeros(64, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.path = state[1]
        self.training = state[2]
        torch.save(torch.zeros(1), self.path)


@torch.jit.script
def _read_host_file(path: str, flag: bool) -> torch.Tensor:
    if flag:
        return torch.from_file(path, shared=True, size=8, dtype=torch.uint8).float()
    return torch.zeros(8)


class FromFileInHelper(_Head):
    """The forbidden call is in a helper function, inside an ``if`` block."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x) + _read_host_file(self.path, bool(x.sum() > 1e9)).sum() * 0


class Printer(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("logits")
        return self.logits(x)


class Benign(_Head):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = x.abs().amax() + 1
        return self.logits(x / scale)


class _Linear(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.flatten(1), torch.ones(2, 64))


def _pre_hook(module: nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    return (inputs[0] * 1.0,)


def _scripted(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module.eval())


def _save_scripted(module: nn.Module, path: Path) -> Path:
    torch.jit.save(_scripted(module), str(path))
    return path


def _rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None],
             extra: dict[str, bytes] | None = None) -> Path:
    """Copy a zip archive member by member through ``edit(name inside the top folder, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(f"{root}/{name}", data)
    return dst


def _edit_code(old: str, new: str) -> Callable[[str, bytes], bytes]:
    """Replace the first ``old`` in the archive's code; the returned editor
    checks (when ``done()`` is called on it) that exactly one file changed."""
    edited: list[str] = []

    def edit(name: str, data: bytes) -> bytes:
        text = data.decode() if name.startswith("code/") and name.endswith(".py") else ""
        if old in text and not edited:
            edited.append(name)
            return text.replace(old, new, 1).encode()
        return data

    edit.done = lambda: edited == edited[:1] and bool(edited)  # type: ignore[attr-defined]
    return edit


# ------------------------------------------------------------------ the policy


def test_policy_allows_core_math_and_refuses_files_storages_python_and_other_namespaces() -> None:
    for allowed in ("aten::conv2d", "aten::batch_norm", "aten::add_", "prim::NumToTensor", "aten::warn"):
        assert opcheck.operator_refusal(allowed) is None, allowed
    refused = {
        "aten::from_file": "file",
        "aten::save": "file",
        "aten::set_": "storage",
        "aten::set": "storage",
        "prim::PythonOp": "Python",
        "prim::rpc_async": "remote",
        "prim::Print": "output",
        "c10d::allreduce_": "namespace",
        "quantized::linear": "namespace",
        "profiler::_record_function_enter": "namespace",
        "my_library::op": "namespace",
    }
    for name, word in refused.items():
        reason = opcheck.operator_refusal(name)
        assert reason is not None and word in reason, (name, reason)
    names = opcheck.forbidden_operator_names()
    # Derived from the schemas: the path-named and Storage-typed arguments.
    assert {"aten::from_file", "aten::save", "aten::set_", "aten::set"} <= names
    assert not any(n.split("::")[0] not in opcheck.ALLOWED_NAMESPACES for n in names)


def test_the_error_names_the_operator_and_survives_pickling() -> None:
    import pickle

    err = ForbiddenOperatorError("aten::from_file", "it maps a file", where="M.forward")
    assert err.code == "forbidden-operator" and isinstance(err, UnsafeModelError)
    assert "aten::from_file" in str(err) and "M.forward" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert again.operator == "aten::from_file" and str(again) == str(err)


# ------------------------------------------------------------------ TorchScript, refused before loading


def test_from_file_in_forward_is_refused_before_loading_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "host-file.bin"
    archive = _save_scripted(FromFileInForward(str(target)), tmp_path / "m.pt")
    with pytest.raises(ForbiddenOperatorError, match="aten::from_file") as caught:
        opcheck.scan_torchscript_archive(archive)
    assert caught.value.operator == "aten::from_file" and "forward" in str(caught.value)
    with pytest.raises(ForbiddenOperatorError, match="aten::from_file"):
        load_model(archive, TS_SPEC)
    assert not target.exists()


def test_setstate_that_saves_a_file_is_refused_and_loading_it_would_have_written(tmp_path: Path) -> None:
    target = tmp_path / "written-at-load.bin"
    archive = _save_scripted(SaveInSetstate(str(target)), tmp_path / "m.pt")
    with pytest.raises(ForbiddenOperatorError) as caught:
        load_model(archive, TS_SPEC)
    assert caught.value.operator == "aten::save"
    assert "__setstate__" in str(caught.value) and "loaded" in str(caught.value)
    assert not target.exists()
    # The model is real: a plain torch.jit.load writes the file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(archive))
    assert target.exists()


def test_a_custom_operator_written_into_the_code_is_refused(tmp_path: Path) -> None:
    benign = _save_scripted(_Linear(), tmp_path / "benign.pt")
    for new, op in (("ops.cleanroom_ext.linear(", "cleanroom_ext::linear"), ("torch.ops.c10d.linear(", "c10d::linear")):
        editor = _edit_code("torch.linear(", new)
        edited = _rewrite(benign, tmp_path / "edited.pt", editor)
        assert editor.done()
        with pytest.raises(ForbiddenOperatorError) as caught:
            load_model(edited, TS_SPEC)
        assert caught.value.operator == op


def test_custom_classes_in_code_or_pickles_are_refused(tmp_path: Path) -> None:
    benign = _save_scripted(Benign(), tmp_path / "benign.pt")
    editor = _edit_code("  training : bool\n", "  training : bool\n  store : __torch__.torch.classes.dist_c10d.Store\n")
    annotated = _rewrite(benign, tmp_path / "a.pt", editor)
    assert editor.done()
    with pytest.raises(ForbiddenOperatorError, match="custom class") as caught:
        opcheck.scan_torchscript_archive(annotated)
    assert caught.value.operator == "__torch__.torch.classes.dist_c10d.Store"
    pickled = _rewrite(
        benign,
        tmp_path / "p.pt",
        lambda name, data: (
            data.replace(b"c__torch__.", b"c__torch__.torch.classes.", 1) if name == "data.pkl" else data
        ),
    )
    with zipfile.ZipFile(pickled) as zf:
        assert b"__torch__.torch.classes." in zf.read(zf.namelist()[0].split("/")[0] + "/data.pkl")
    with pytest.raises(ForbiddenOperatorError, match="custom class"):
        opcheck.scan_torchscript_archive(pickled)


def test_archives_that_cannot_be_checked_are_refused(tmp_path: Path) -> None:
    benign = _save_scripted(Benign(), tmp_path / "benign.pt")
    editor = _edit_code("def forward(", "def forward((((")
    garbled = _rewrite(benign, tmp_path / "g.pt", editor)
    assert editor.done()
    with pytest.raises(UnsafeModelError, match="cannot be parsed"):
        load_model(garbled, TS_SPEC)
    library = _rewrite(benign, tmp_path / "l.pt", lambda _n, d: d, extra={"extra/ext.so": b"\x7fELF"})
    with pytest.raises(UnsafeModelError, match="native library"):
        load_model(library, TS_SPEC)
    stray = _rewrite(benign, tmp_path / "s.pt", lambda _n, d: d, extra={"bytecode.py": b"x = 1\n"})
    with pytest.raises(UnsafeModelError, match="unexpected member"):
        load_model(stray, TS_SPEC)


# ------------------------------------------------------------------ TorchScript, checked after loading


def test_graph_check_inlines_helpers_and_walks_blocks(tmp_path: Path) -> None:
    target = tmp_path / "never.bin"
    with pytest.raises(ForbiddenOperatorError) as caught:
        opcheck.check_scripted_module(_scripted(FromFileInHelper(str(target))))
    assert caught.value.operator == "aten::from_file"
    with pytest.raises(ForbiddenOperatorError) as caught:
        opcheck.check_scripted_module(_scripted(Printer()))
    assert caught.value.operator == "prim::Print"
    assert not target.exists()


def test_graph_check_covers_setstate_and_hooks(tmp_path: Path) -> None:
    with pytest.raises(ForbiddenOperatorError) as caught:
        opcheck.check_scripted_module(_scripted(SaveInSetstate(str(tmp_path / "x"))))
    assert caught.value.operator == "aten::save" and "__setstate__" in str(caught.value)
    benign = Benign()
    benign.register_forward_pre_hook(_pre_hook)
    opcheck.check_scripted_module(_scripted(benign))  # no_grad blocks and hooks are fine


def test_benign_torchscript_loads_behind_both_checks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Benign()
    archive = _save_scripted(model, tmp_path / "m.pt")
    loaded = load_model(archive, TS_SPEC)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model.eval()(x))


# ------------------------------------------------------------------ torch.export


def _export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


@pytest.fixture(scope="module")
def exported_small_cnn() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    model = create_model(ModelSpec(arch="small_cnn", num_classes=3, in_channels=1, input_size=(16, 16)))
    torch.export.save(_export(model, torch.rand(2, 1, 16, 16)), buffer)
    return buffer.getvalue()


def _archive(tmp_path: Path, data: bytes, name: str = "m.pt2") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _edit_program(edit: Callable[[dict], None]) -> Callable[[str, bytes], bytes]:
    def member(name: str, data: bytes) -> bytes:
        if name == "models/model.json":
            document = json.loads(data)
            edit(document)
            return json.dumps(document).encode()
        return data

    return member


def _batch_size_expr(document: dict) -> dict:
    return document["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]


def _write_file_code(path: Path) -> str:
    return f"__import__('pathlib').Path({str(path)!r}).write_text('x')"


def test_benign_exported_model_passes_both_checks(tmp_path: Path, exported_small_cnn: bytes) -> None:
    ep = torch.export.load(io.BytesIO(exported_small_cnn))
    opcheck.check_exported_program(ep)
    model = load_model(_archive(tmp_path, exported_small_cnn), EXPORT_SPEC)
    x = torch.rand(4, 1, 16, 16)
    torch.testing.assert_close(model(x), ep.module()(x))


def test_exported_custom_operator_is_refused_in_the_graph_and_in_the_archive(tmp_path: Path) -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(_leak(x))

    ep = _export(Leaky(), torch.rand(2, 4))
    with pytest.raises(ForbiddenOperatorError) as caught:
        opcheck.check_exported_program(ep)
    assert caught.value.operator == "cleanroom_opcheck_test::leak"
    path = tmp_path / "leaky.pt2"
    torch.export.save(ep, path)
    with pytest.raises(ForbiddenOperatorError) as caught:
        load_model(path, ModelSpec(arch="torch_export", num_classes=2, in_channels=1, input_size=(8, 8)))
    assert caught.value.operator == "cleanroom_opcheck_test::leak"


def test_custom_operator_inside_a_cond_branch_is_refused() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: _leak(t), lambda t: t - 1, (x,))

    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: t * 2, lambda t: t - 1, (x,))

    opcheck.check_exported_program(torch.export.export(Plain(), (torch.rand(3, 4),)))
    with pytest.raises(ForbiddenOperatorError) as caught:
        opcheck.check_exported_program(torch.export.export(Branchy(), (torch.rand(3, 4),)))
    assert caught.value.operator == "cleanroom_opcheck_test::leak" and "true_graph" in str(caught.value)


def test_a_node_target_naming_a_python_function_is_refused(tmp_path: Path, exported_small_cnn: bytes) -> None:
    def retarget(document: dict) -> None:
        node = next(n for n in document["graph_module"]["graph"]["nodes"] if n["target"].endswith("relu.default"))
        node["target"] = "torch.save"

    path = _rewrite(_archive(tmp_path, exported_small_cnn), tmp_path / "t.pt2", _edit_program(retarget))
    with pytest.raises(ForbiddenOperatorError) as caught:
        load_model(path, EXPORT_SPEC)
    assert caught.value.operator == "torch.save"


def test_symbolic_shape_code_is_refused_and_never_evaluated(tmp_path: Path, exported_small_cnn: bytes) -> None:
    target = tmp_path / "sympified.txt"

    def inject(document: dict) -> None:
        expr = _batch_size_expr(document)
        expr["expr_str"] = f"{_write_file_code(target)} and {expr['expr_str']}"

    path = _rewrite(_archive(tmp_path, exported_small_cnn), tmp_path / "s.pt2", _edit_program(inject))
    with pytest.raises(UnsafeModelError, match="symbolic shape"):
        load_model(path, EXPORT_SPEC)
    assert not target.exists()
    with contextlib.suppress(Exception):
        torch.export.load(path)  # torch hands the string to sympy.sympify, which evaluates it
    assert target.exists()


def test_guard_code_in_the_archive_is_never_run(tmp_path: Path, exported_small_cnn: bytes) -> None:
    target = tmp_path / "guarded.txt"

    def inject(document: dict) -> None:
        document["guards_code"] = [f"({_write_file_code(target)} or True)"]

    path = _rewrite(_archive(tmp_path, exported_small_cnn), tmp_path / "g.pt2", _edit_program(inject))
    model = load_model(path, EXPORT_SPEC)
    model(torch.rand(2, 1, 16, 16))
    assert not target.exists()
    torch.export.load(path).module()(torch.rand(2, 1, 16, 16))
    assert target.exists()


def test_sample_inputs_are_never_unpickled(tmp_path: Path, exported_small_cnn: bytes) -> None:
    target = tmp_path / "unpickled.txt"
    payload = io.BytesIO()
    torch.save(((_Unpickled(target),), {}), payload)
    path = _rewrite(
        _archive(tmp_path, exported_small_cnn),
        tmp_path / "i.pt2",
        lambda name, data: payload.getvalue() if name == "data/sample_inputs/model.pt" else data,
    )
    load_model(path, EXPORT_SPEC)  # the program itself is fine
    assert not target.exists()
    with contextlib.suppress(Exception):
        torch.export.load(path)  # weights_only fails, torch falls back to full unpickling
    assert target.exists()


def test_pickled_weights_are_refused_unread(tmp_path: Path, exported_small_cnn: bytes) -> None:
    target = tmp_path / "weights.txt"
    payload = io.BytesIO()
    torch.save(_Unpickled(target), payload)

    def member(name: str, data: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["conv1.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return payload.getvalue()
        return data

    path = _rewrite(_archive(tmp_path, exported_small_cnn), tmp_path / "w.pt2", member)
    with pytest.raises(UnsafeModelError, match="pickle"):
        load_model(path, EXPORT_SPEC)
    assert not target.exists()


def test_archive_members_outside_the_export_layout_are_refused(tmp_path: Path, exported_small_cnn: bytes) -> None:
    base = _archive(tmp_path, exported_small_cnn)
    for extra, message in (
        ({"data/aotinductor/model/model.so": b"\x7fELF"}, "native library"),
        ({"data/aotinductor/model/model.cpp": b""}, "AOTInductor"),
        ({"data/constants/custom_obj_0": b""}, "unexpected member"),
        ({"serialized_exported_program.json": b"{}"}, "unexpected member"),
    ):
        path = _rewrite(base, tmp_path / "x.pt2", lambda _n, d: d, extra=extra)
        with pytest.raises(UnsafeModelError, match=message):
            load_model(path, EXPORT_SPEC)


def test_input_specs_that_would_import_modules_are_refused(tmp_path: Path, exported_small_cnn: bytes) -> None:
    def inject(document: dict) -> None:
        signature = document["graph_module"]["module_call_graph"][0]["signature"]
        signature["in_spec"] = json.dumps(
            [
                1,
                {
                    "type": "collections.defaultdict",
                    "context": json.dumps(
                        {"default_factory_module": "antigravity", "default_factory_name": "fly", "dict_context": []}
                    ),
                    "children_spec": [],
                },
            ]
        )

    path = _rewrite(_archive(tmp_path, exported_small_cnn), tmp_path / "d.pt2", _edit_program(inject))
    with pytest.raises(UnsafeModelError, match=r"unsupported type 'collections.defaultdict'"):
        load_model(path, EXPORT_SPEC)


def test_value_names_that_are_not_identifiers_are_refused(tmp_path: Path, exported_small_cnn: bytes) -> None:
    def rename(document: dict) -> None:
        text = json.dumps(document).replace('"relu"', json.dumps("relu\nimport os\nrelu"))
        document.clear()
        document.update(json.loads(text))

    path = _rewrite(_archive(tmp_path, exported_small_cnn), tmp_path / "n.pt2", _edit_program(rename))
    with pytest.raises(UnsafeModelError, match="name"):
        load_model(path, EXPORT_SPEC)
