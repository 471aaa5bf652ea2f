"""Operator checks for models that carry their own code (TorchScript, torch.export).

A TorchScript archive or an exported program is untrusted *code*: its graph
may call any operator registered in the process. Everything here decides, in
one place (:func:`operator_refusal`), which operators such a model may use,
and applies that decision three ways:

* :func:`scan_torchscript_archive` — static, before anything is loaded: the
  archive's ``code/`` members are parsed with :mod:`ast` (serialized
  TorchScript is Python syntax) and every operator reference is checked,
  ``__setstate__`` included (``torch.jit.load`` runs it while loading).
* :func:`scan_serialized_program` — static, on the JSON of a ``torch.export``
  archive, before it is deserialized (deserializing evaluates parts of it).
* :func:`check_scripted_module` / :func:`check_exported_program` — after
  loading, on the real graphs (calls inlined, blocks and subgraphs walked).
  These are authoritative; the static scans keep code from running at load.

The policy
----------
Allowed:

* operators in the ``aten`` namespace (tensor math, NN layers, reductions,
  shape ops) and the ``prim`` namespace (TorchScript's constants, attribute
  access, lists/tuples/dicts, ``If``/``Loop``, exceptions, ``with`` blocks),
  except those refused below. A ``prim`` node kind without a schema is
  allowed only if it is one of the structural kinds in ``STRUCTURAL_PRIM_KINDS``.
* in exported programs, also the control-flow higher-order operators in
  ``EXPORT_HIGHER_ORDER_OPS`` (``cond``, ``while_loop``, the grad-mode and
  autocast wrappers; their subgraphs are checked with the same policy) and
  the Python functions export records for symbolic shapes
  (``EXPORT_PYTHON_OPS``: ``operator.getitem``/``add``/..., ``math.ceil``,
  ``torch.sym_*``).

Refused (:class:`~defense_core.errors.ForbiddenOperatorError`, naming the operator):

* every other namespace: custom operator libraries, ``c10d``,
  ``_c10d_functional`` and ``symm_mem`` (network), ``profiler`` (writes
  traces), ``quantized``/``_quantized`` (they need custom classes for packed
  weights, and a classifier to purify has float weights), ``mkldnn``,
  ``onednn``, ``cuda``, ``inductor``, ``prims``, ``static_runtime``, ... —
  and TorchScript custom classes (``__torch__.torch.classes.*``: C++ objects
  such as c10d stores and process groups, created with their own code).
* ``aten``/``prim`` operators that reach outside the tensors they are given,
  derived from ``torch._C._jit_get_all_schemas()`` (an operator is refused
  when any overload has such an argument) plus an explicit list:

  - files: a ``str`` argument named like a file or path (``filename``,
    ``path``, ...): ``aten::from_file`` (maps a host file, ``shared=True``
    writes it), ``aten::save``;
  - storages: a ``Storage`` argument or result (``aten::set_``, ``aten::set``):
    pointing a tensor at a storage is how mapped file bytes reach a buffer;
  - network, threads, futures: ``prim::rpc_async``/``rpc_sync``/``rpc_remote``,
    ``prim::fork``, ``aten::wait``, ``prim::awaitable*``;
  - calls back into Python: ``prim::PythonOp``, ``prim::IgnoredPythonOp``, and a
    ``prim::CallFunction`` that survives inlining;
  - process-wide state and output: ``aten::manual_seed``, ``aten::seed``, the
    cuFFT plan cache setters, ``prim::Print``, ``aten::_print``;
  - optimizer-internal nodes that hide subgraphs (``prim::DifferentiableGraph``,
    fusion groups, ...): never in a saved model.

The list of refused names is the union of ``FORBIDDEN_OPERATORS`` and the
derived set; :func:`forbidden_operator_names` returns it.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import operator
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from defense_core.errors import ForbiddenOperatorError, ModelLoadError, UnsafeModelError

log = logging.getLogger(__name__)

ALLOWED_NAMESPACES = frozenset({"aten", "prim"})

FORBIDDEN_OPERATORS: Mapping[str, str] = {
    "aten::from_file": "it maps a file of the host into a tensor",
    "aten::save": "it writes a file",
    "aten::set_": "it points a tensor at another storage",
    "aten::set": "it points a tensor at another storage",
    "prim::rpc_async": "it makes a remote call",
    "prim::rpc_sync": "it makes a remote call",
    "prim::rpc_remote": "it makes a remote call",
    "aten::rpc_async": "it makes a remote call",
    "aten::rpc_sync": "it makes a remote call",
    "aten::rpc_remote": "it makes a remote call",
    "prim::fork": "it runs code on another thread",
    "aten::wait": "it waits on a future from another thread",
    "prim::awaitable": "it defers code to be run later",
    "prim::awaitable_wait": "it defers code to be run later",
    "prim::awaitable_nowait": "it defers code to be run later",
    "prim::PythonOp": "it calls back into Python",
    "prim::IgnoredPythonOp": "it calls back into Python",
    "prim::CallFunction": "it calls a function that could not be inlined and checked",
    "aten::manual_seed": "it changes the process-wide random state",
    "aten::seed": "it changes the process-wide random state",
    "aten::_cufft_set_plan_cache_max_size": "it changes process-wide state",
    "aten::_cufft_clear_plan_cache": "it changes process-wide state",
    "prim::Print": "it writes to the process's standard output",
    "aten::_print": "it writes to the process's standard output",
    "prim::DifferentiableGraph": "it hides a subgraph (optimizer-internal)",
    "prim::FusionGroup": "it hides a subgraph (optimizer-internal)",
    "prim::CudaFusionGroup": "it hides a subgraph (optimizer-internal)",
    "prim::TensorExprGroup": "it hides a subgraph (optimizer-internal)",
    "prim::TensorExprDynamicGroup": "it hides a subgraph (optimizer-internal)",
    "prim::StaticSubgraph": "it hides a subgraph (optimizer-internal)",
    "prim::FallbackGraph": "it hides a subgraph (optimizer-internal)",
    "prim::oneDNNFusionGroup": "it hides a subgraph (optimizer-internal)",
}

# Schema-less node kinds TorchScript graphs are built from.
STRUCTURAL_PRIM_KINDS = frozenset({
    "prim::Param", "prim::Return", "prim::Constant", "prim::GetAttr", "prim::SetAttr",
    "prim::CallMethod", "prim::If", "prim::Loop", "prim::ListConstruct", "prim::ListUnpack",
    "prim::TupleConstruct", "prim::TupleUnpack", "prim::TupleIndex", "prim::TupleSlice",
    "prim::DictConstruct", "prim::CreateObject", "prim::Enter", "prim::Exit",
    "prim::Uninitialized", "prim::unchecked_cast", "prim::isinstance", "prim::EnumName",
    "prim::EnumValue",
})

# A str argument with one of these names takes a file or location.
PATH_ARGUMENT_NAMES = frozenset({
    "filename", "file_name", "file", "filepath", "path", "fname", "dir", "dirname",
    "directory", "url", "uri",
})

EXPORT_HIGHER_ORDER_OPS = frozenset({
    "cond", "while_loop", "wrap_with_set_grad_enabled", "wrap_with_autocast",
})

# Python callables torch.export records for symbolic shape arithmetic, by serialized name.
EXPORT_PYTHON_OPS: Mapping[str, Any] = {
    **{f"_operator.{name}": getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos",
        "abs", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_",
    )},
    **{f"math.{name}": getattr(math, name) for name in ("ceil", "floor", "trunc")},
    **{f"torch.{name}": getattr(torch, name) for name in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum",
        "_sym_sqrt",
    ) if hasattr(torch, name)},
}

MAX_CODE_MEMBERS = 10_000
MAX_CODE_BYTES = 64 * 1024**2          # all of code/ together
MAX_PICKLE_SCAN_BYTES = 64 * 1024**2   # data.pkl / constants.pkl, scanned for custom classes
MAX_ARCHIVE_MEMBERS = 200_000
MAX_EXPR_CHARS = 10_000

_CUSTOM_CLASS_PREFIXES = ("__torch__.torch.classes", "torch.classes")
_LIBRARY_SUFFIXES = (".so", ".dylib", ".dll", ".pyd")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --------------------------------------------------------------------------- the policy


def _schema_refusal(schema: Any) -> str | None:
    for arg in schema.arguments:
        kind = str(arg.type)
        if "Storage" in kind:
            return "it takes a storage"
        if arg.name in PATH_ARGUMENT_NAMES and "str" in kind:
            return "it takes a file name"
    if any("Storage" in str(ret.type) for ret in schema.returns):
        return "it returns a storage"
    return None


@functools.lru_cache(maxsize=1)
def _derived_refusals() -> Mapping[str, str]:
    refused: dict[str, str] = {}
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.split("::", 1)[0] in ALLOWED_NAMESPACES:
            reason = _schema_refusal(schema)
            if reason is not None:
                refused.setdefault(schema.name, reason)
    return refused


def forbidden_operator_names() -> frozenset[str]:
    """Every ``aten``/``prim`` operator the policy refuses by name."""
    return frozenset(FORBIDDEN_OPERATORS) | frozenset(_derived_refusals())


@functools.lru_cache(maxsize=1)
def _forbidden_by_base_name() -> Mapping[str, str]:
    # "from_file" -> "aten::from_file", ...: what a method call or ``torch.<name>`` says.
    by_base: dict[str, str] = {}
    for name in sorted(forbidden_operator_names()):
        by_base.setdefault(name.split("::", 1)[1], name)
    return by_base


def operator_refusal(qualified_name: str, *, schemas: Iterable[Any] = ()) -> str | None:
    """Why the operator ``namespace::name`` is refused, or ``None`` when it is allowed.

    ``schemas`` (the operator's own schemas, when known) are checked with the
    same rules the derived list comes from, for operators registered after
    the list was built.
    """
    namespace, sep, name = qualified_name.partition("::")
    if not sep or not namespace or not name:
        return "it is not an operator name"
    if namespace not in ALLOWED_NAMESPACES:
        return f"only aten and prim operators are allowed, not the {namespace!r} namespace"
    reason = FORBIDDEN_OPERATORS.get(qualified_name) or _derived_refusals().get(qualified_name)
    if reason is not None:
        return reason
    for schema in schemas:
        reason = _schema_refusal(schema)
        if reason is not None:
            return reason
    return None


def check_operator(qualified_name: str, *, where: str = "", schemas: Iterable[Any] = ()) -> None:
    """Raise :class:`ForbiddenOperatorError` if the policy refuses ``qualified_name``."""
    reason = operator_refusal(qualified_name, schemas=schemas)
    if reason is not None:
        raise ForbiddenOperatorError(qualified_name, reason, where=where)


def _refuse_custom_class(name: str, where: str) -> None:
    raise ForbiddenOperatorError(
        name, "it is a custom class (C++ code outside the allowed operators)", where=where
    )


# --------------------------------------------------------------------------- TorchScript, static


def scan_torchscript_archive(path: str | os.PathLike[str]) -> None:
    """Refuse a TorchScript archive whose code references a forbidden operator,
    a custom class or a native library, before anything in it is loaded.

    Reads only the archive's listing, its ``code/*.py`` members (at most
    ``MAX_CODE_MEMBERS`` files and ``MAX_CODE_BYTES`` in all) and the bytes of
    its pickles (scanned for custom-class names, never unpickled). Source
    that does not parse is refused too.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = archive_members(zf)
            code_members, pickles = [], []
            for info, inner in members:
                kind = _torchscript_member_kind(inner)
                if kind is None:
                    raise UnsafeModelError(
                        f"the TorchScript archive holds an unexpected member {inner!r}; "
                        "it is not written by torch.jit.save"
                    )
                if kind == "code":
                    code_members.append((info, inner))
                elif kind == "pickle":
                    pickles.append((info, inner))
            if len(code_members) > MAX_CODE_MEMBERS:
                raise UnsafeModelError(
                    f"the TorchScript archive has {len(code_members)} code files (limit {MAX_CODE_MEMBERS})"
                )
            if not code_members:
                raise UnsafeModelError("the TorchScript archive holds no code to check")
            total = sum(info.file_size for info, _ in code_members)
            if total > MAX_CODE_BYTES:
                raise UnsafeModelError(
                    f"the TorchScript archive holds {total} bytes of code (limit {MAX_CODE_BYTES})"
                )
            for info, inner in pickles:
                _scan_pickle_for_custom_classes(_read_member(zf, info, MAX_PICKLE_SCAN_BYTES), inner)
            for info, inner in code_members:
                raw = _read_member(zf, info, MAX_CODE_BYTES)
                try:
                    source = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UnsafeModelError(f"{inner} is not UTF-8 text: {exc}") from exc
                scan_torchscript_source(source, filename=inner)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"the TorchScript archive cannot be read: {exc}") from exc


def archive_members(zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    """``(info, name inside the top folder)`` for every member; one top folder, no tricks."""
    infos = zf.infolist()
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise UnsafeModelError(f"the archive has {len(infos)} members (limit {MAX_ARCHIVE_MEMBERS})")
    roots, seen, out = set(), set(), []
    for info in infos:
        name = info.filename
        if "\\" in name or "\x00" in name or name.startswith("/") or "/" not in name:
            raise UnsafeModelError(f"the archive has a member with an unexpected name: {name!r}")
        root, inner = name.split("/", 1)
        parts = inner.rstrip("/").split("/") if info.is_dir() else inner.split("/")
        if not root or any(p in (".", "..") for p in parts) or (inner and "" in parts):
            raise UnsafeModelError(f"the archive has a member with an unexpected name: {name!r}")
        if name in seen:
            raise UnsafeModelError(f"the archive holds {name!r} twice")
        seen.add(name)
        roots.add(root)
        if not info.is_dir():
            if inner.lower().endswith(_LIBRARY_SUFFIXES):
                raise UnsafeModelError(f"the archive carries a native library: {inner!r}")
            out.append((info, inner))
    if len(roots) != 1:
        raise UnsafeModelError("the archive's members must all be under one top folder")
    return out


def _torchscript_member_kind(inner: str) -> str | None:
    if inner.startswith("code/"):
        if inner.endswith(".py"):
            return "code"
        if inner.endswith(".py.debug_pkl"):
            return "debug"   # source ranges; read by a restricted C++ unpickler
        return None
    if inner in ("data.pkl", "constants.pkl"):
        return "pickle"
    if re.fullmatch(r"(data|constants)/\d+", inner):
        return "tensor"
    if inner in ("version", ".data/version", "byteorder", ".data/serialization_id"):
        return "meta"
    if inner.startswith("extra/"):
        return "extra"       # read only when asked for by name; never here
    return None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise UnsafeModelError(f"{info.filename} is {info.file_size} bytes (limit {limit})")
    with zf.open(info) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UnsafeModelError(f"{info.filename} expands beyond {limit} bytes")
    return data


def _scan_pickle_for_custom_classes(data: bytes, inner: str) -> None:
    # Class references in a pickle are plain "module\nname" strings; a custom
    # class there would be instantiated (its C++ __setstate__ run) at load.
    for prefix in _CUSTOM_CLASS_PREFIXES:
        at = data.find(prefix.encode())
        if at >= 0:
            end = data.find(b"\n", at)
            module = data[at: end if end > 0 else at + 200].decode("utf-8", "replace")
            _refuse_custom_class(module, f"{inner} (unpickled at load)")


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]`` for a chain of names, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


# Python-level builtins TorchScript prints as plain calls, and what they compile to.
_BUILTIN_CALLS = {
    "print": "prim::Print",
    "fork": "prim::fork",
    "wait": "aten::wait",
    "awaitable": "prim::awaitable",
    "awaitable_wait": "prim::awaitable_wait",
    "awaitable_nowait": "prim::awaitable_nowait",
    "rpc_async": "prim::rpc_async",
    "rpc_sync": "prim::rpc_sync",
    "rpc_remote": "prim::rpc_remote",
}


def _chain_operator(chain: list[str]) -> tuple[str, bool] | None:
    """The operator a reference names, and whether its namespace is explicit."""
    if chain[0] == "torch" and len(chain) >= 2 and chain[1] == "ops":
        chain = chain[1:]
    if chain[0] == "ops" and len(chain) >= 2:
        if len(chain) == 2:
            return f"{chain[1]}::", True
        return f"{chain[1]}::{chain[2]}", True
    if chain[0] == "torch" and len(chain) >= 2:
        return f"aten::{chain[-1]}", False
    return None


class _SourceScanner(ast.NodeVisitor):
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.scope: list[str] = []

    def _where(self, node: ast.AST) -> str:
        place = ".".join(self.scope) or "module level"
        runs = " (runs while the archive is loaded)" if self.scope and self.scope[-1] == "__setstate__" else ""
        return f"{place} in {self.filename}, line {getattr(node, 'lineno', '?')}{runs}"

    def _scoped(self, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_ClassDef = _scoped
    visit_FunctionDef = _scoped
    visit_AsyncFunctionDef = _scoped

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _dotted(node)
        if chain is not None:
            self._check_chain(chain, node)
            return  # the inner attributes are prefixes of this chain
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _BUILTIN_CALLS:
            check_operator(_BUILTIN_CALLS[func.id], where=self._where(node))
        # A method call (``x.set_(...)``), ``torch.<op>(...)`` or a call through an alias.
        if isinstance(func, ast.Attribute):
            self._check_base_name(func.attr, node)
        if (isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            self._check_base_name(node.args[1].value, node)
        self.generic_visit(node)

    def _check_base_name(self, base: str, node: ast.AST) -> None:
        qualified = _forbidden_by_base_name().get(base)
        if qualified is not None:
            check_operator(qualified, where=self._where(node))

    def _check_chain(self, chain: list[str], node: ast.AST) -> None:
        dotted = ".".join(chain)
        if dotted.startswith(_CUSTOM_CLASS_PREFIXES):
            _refuse_custom_class(dotted, self._where(node))
        found = _chain_operator(chain)
        if found is None:
            return
        op, explicit = found
        if op.endswith("::"):  # ``ops.<namespace>`` on its own
            namespace = op[:-2]
            if namespace not in ALLOWED_NAMESPACES:
                check_operator(f"{namespace}::?", where=self._where(node))
            return
        if explicit:
            check_operator(op, where=self._where(node))
        else:
            self._check_base_name(chain[-1], node)


def scan_torchscript_source(source: str, *, filename: str = "<code>") -> None:
    """Check one serialized TorchScript source file; refuses what does not parse."""
    try:
        tree = ast.parse(source, filename=filename)
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise UnsafeModelError(f"{filename} cannot be parsed, so it cannot be checked: {exc}") from exc
    _SourceScanner(filename).visit(tree)


# --------------------------------------------------------------------------- TorchScript, loaded


def check_scripted_module(
    module: torch.jit.ScriptModule, *, compilation_unit: Any | None = None
) -> None:
    """Check every method of every submodule (``__setstate__``/``__getstate__``
    and hooks included) and, when given, every function of the compilation
    unit the module was loaded into, with calls inlined and nested blocks walked.

    A method called on a non-module class object must be found (in
    ``compilation_unit``, else in the process's own TorchScript classes) and
    is checked too; a class whose code cannot be found is refused.
    """
    module_types: set[str] = set()
    graphs: list[tuple[str, Any]] = []
    in_unit: set[str] = set()
    if compilation_unit is not None:
        for function in compilation_unit.get_functions():
            in_unit.add(function.qualified_name)
            graphs.append((function.qualified_name, function.graph))
    for _, sub in module.named_modules():
        cpp = sub._c
        qualified = cpp._type().qualified_name()
        module_types.add(qualified)
        for method in cpp._method_names():
            if f"{qualified}.{method}" not in in_unit:  # each function is checked once
                graphs.append((f"{qualified}.{method}", cpp._get_method(method).graph))
        for hook in [*cpp._get_forward_pre_hooks(), *cpp._get_forward_hooks()]:
            graphs.append((f"{qualified} hook {getattr(hook, 'name', '?')}", hook.graph))
    checked_classes: set[str] = set()
    pending: list[tuple[str, Any]] = graphs
    while pending:
        where, graph = pending.pop()
        copy = graph.copy()
        torch._C._jit_pass_inline(copy)
        for class_name in _check_graph(copy, where=where):
            if class_name in module_types or class_name in checked_classes:
                continue
            checked_classes.add(class_name)
            pending.extend(_class_methods(class_name, compilation_unit))


def _class_methods(class_name: str, compilation_unit: Any | None) -> list[tuple[str, Any]]:
    units = [u for u in (compilation_unit, torch.jit._state._python_cu) if u is not None]
    for unit in units:
        cls = unit.get_class(class_name)
        if cls is None:
            continue
        found = []
        for method in cls.method_names():
            fn = unit.find_function(f"{class_name}.{method}")
            if fn is None:
                break
            found.append((f"{class_name}.{method}", fn.graph))
        else:
            return found
    raise UnsafeModelError(f"the code of the TorchScript class {class_name} cannot be found to be checked")


def _types_in(t: Any) -> Iterator[Any]:
    yield t
    for inner in t.containedTypes():
        yield from _types_in(inner)


def _check_graph(graph: Any, *, where: str) -> set[str]:
    """Check every node of ``graph``; return the class types its values use."""
    classes: set[str] = set()

    def note_types(values: Iterable[Any]) -> None:
        for value in values:
            for t in _types_in(value.type()):
                if t.kind() == "ClassType":
                    name = t.qualified_name()
                    if name.startswith(_CUSTOM_CLASS_PREFIXES):
                        _refuse_custom_class(name, where)
                    classes.add(name)

    def walk(block: Any) -> None:
        for node in block.nodes():
            kind = node.kind()
            if kind not in STRUCTURAL_PRIM_KINDS:
                schemas = torch._C._jit_get_schemas_for_operator(kind)
                if kind.startswith("prim::") and not schemas and kind not in FORBIDDEN_OPERATORS:
                    raise ForbiddenOperatorError(kind, "it is not a known TorchScript construct", where=where)
                check_operator(kind, where=where, schemas=schemas)
            note_types(node.inputs())
            note_types(node.outputs())
            for inner in node.blocks():
                walk(inner)
            if node.hasAttribute("Subgraph"):
                walk(node.g("Subgraph"))

    note_types(graph.inputs())
    walk(graph)
    return classes


# --------------------------------------------------------------------------- torch.export, static


def _export_target_operator(target: str) -> str:
    """The policy name of a serialized node target; raises for anything else."""
    if target in EXPORT_PYTHON_OPS:
        return ""
    parts = target.split(".")
    if len(parts) == 4 and parts[:2] == ["torch", "ops"] and parts[2] == "higher_order":
        if parts[3] in EXPORT_HIGHER_ORDER_OPS:
            return ""
        raise ForbiddenOperatorError(f"higher_order::{parts[3]}", "it is not an allowed control-flow operator")
    if len(parts) in (4, 5) and parts[:2] == ["torch", "ops"] and all(_IDENTIFIER.match(p) for p in parts):
        return f"{parts[2]}::{parts[3]}"
    raise ForbiddenOperatorError(target, "it is not an operator of the allowed namespaces")


# Names a symbolic-shape expression may use (sympy and torch.utils._sympy functions).
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Max", "Min", "Abs", "Mod",
    "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "true",
    "false", "True", "False", "oo", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
    "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
})
_SYMPY_ASSUMPTIONS = frozenset({
    "integer", "positive", "negative", "nonnegative", "nonpositive", "real", "finite",
    "nonzero", "zero", "even", "odd", "rational",
})
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]*\Z")
_EXPR_NODES = (ast.Expression, ast.Call, ast.Name, ast.Constant, ast.BinOp, ast.UnaryOp,
               ast.BoolOp, ast.Compare, ast.keyword, ast.Load, ast.Add, ast.Sub, ast.Mult,
               ast.Div, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or,
               ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def check_sym_expr(text: str) -> None:
    """Refuse a symbolic-shape expression that is more than names, numbers and
    the sympy functions export writes. The deserializer hands these strings to
    ``sympy.sympify``, which evaluates them as Python."""
    if not isinstance(text, str) or len(text) > MAX_EXPR_CHARS:
        raise UnsafeModelError("a symbolic shape expression is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise UnsafeModelError(f"a symbolic shape expression does not parse: {text[:80]!r}") from exc
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            raise UnsafeModelError(f"a symbolic shape expression holds {type(node).__name__}: {text[:80]!r}")
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES):
                raise UnsafeModelError(f"a symbolic shape expression calls something unknown: {text[:80]!r}")
            for kw in node.keywords:
                if kw.arg not in _SYMPY_ASSUMPTIONS or not isinstance(kw.value, ast.Constant) \
                        or not isinstance(kw.value.value, bool):
                    raise UnsafeModelError(f"a symbolic shape expression has an unknown keyword: {text[:80]!r}")
            for i, arg in enumerate(node.args):
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not (
                    node.func.id == "Symbol" and i == 0 and _SYMBOL_NAME.match(arg.value)
                ):
                    raise UnsafeModelError(f"a symbolic shape expression holds a string: {text[:80]!r}")
        elif isinstance(node, ast.Name):
            if node.id not in _SYMPY_NAMES and not _SYMBOL_NAME.match(node.id):
                raise UnsafeModelError(f"a symbolic shape expression names {node.id!r}")
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or isinstance(value, str):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, int) and abs(value) > 2**63:
                raise UnsafeModelError(f"a symbolic shape expression holds {value!r}")


_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict",
                             "collections.OrderedDict"})


def check_treespec(text: str) -> None:
    """Refuse a serialized pytree spec with types other than tuples, lists and
    dicts of plain keys (the loader would import the module a defaultdict
    factory or an enum names)."""
    try:
        protocol, root = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UnsafeModelError("a serialized input/output spec is malformed") from exc
    stack = [root]
    while stack:
        spec = stack.pop()
        if not isinstance(spec, dict) or spec.get("type") not in _TREESPEC_TYPES:
            kind = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
            raise UnsafeModelError(f"the program's inputs or outputs use an unsupported type {kind!r}")
        context = spec.get("context")
        if context is not None:
            try:
                decoded = json.loads(context)
            except (TypeError, ValueError, RecursionError) as exc:
                raise UnsafeModelError("a serialized input/output spec is malformed") from exc
            if decoded is not None and not (
                isinstance(decoded, list) and all(isinstance(k, (str, int)) for k in decoded)
            ):
                raise UnsafeModelError("a serialized input/output spec has a context that is not a list of keys")
        children = spec.get("children_spec", [])
        if not isinstance(children, list):
            raise UnsafeModelError("a serialized input/output spec is malformed")
        stack.extend(children)


def _walk_json(value: Any, depth: int = 0) -> Iterator[tuple[dict[str, Any], int]]:
    if depth > 200:
        raise UnsafeModelError("the serialized program is nested too deeply")
    if isinstance(value, dict):
        yield value, depth
        for item in value.values():
            yield from _walk_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            yield from _walk_json(item, depth + 1)


def scan_serialized_program(document: Mapping[str, Any]) -> None:
    """Check the JSON of a ``torch.export`` program (``models/<name>.json``)
    before it is deserialized: node targets against the policy, symbolic
    expressions, input/output specs, value names; custom objects refused."""
    if not isinstance(document, Mapping) or "graph_module" not in document:
        raise UnsafeModelError("the exported program's JSON is not a serialized ExportedProgram")
    graph_module = document["graph_module"]
    if not isinstance(graph_module, Mapping):
        raise UnsafeModelError("the exported program's JSON is not a serialized ExportedProgram")
    if graph_module.get("treespec_namedtuple_fields"):
        raise UnsafeModelError("exported programs with namedtuple inputs or outputs are not supported")
    for key in document.get("range_constraints") or {}:
        if not _SYMBOL_NAME.match(str(key)):
            raise UnsafeModelError(f"a range constraint names {key!r}")
    for obj, _ in _walk_json(document):
        if obj.get("custom_obj_values"):
            _refuse_custom_class("custom object", "the exported program")
        if "as_custom_obj" in obj or "as_custom_objs" in obj:
            _refuse_custom_class("custom object", "the exported program")
        if "expr_str" in obj:
            check_sym_expr(obj["expr_str"])
        for key in ("in_spec", "out_spec"):
            if key in obj:
                check_treespec(obj[key])
        for key in ("tensor_values", "sym_int_values", "sym_float_values", "sym_bool_values"):
            if isinstance(obj.get(key), dict):
                for name in obj[key]:
                    _check_value_name(name)
        for key in ("name", "as_name"):
            if isinstance(obj.get(key), str) and obj[key]:
                _check_value_name(obj[key])
        if "target" in obj and "inputs" in obj and "outputs" in obj:
            target = obj["target"]
            if not isinstance(target, str):
                raise UnsafeModelError("a node of the exported program has no operator name")
            where = f"node {obj.get('name') or '?'} of the exported program"
            try:
                op = _export_target_operator(target)
            except ForbiddenOperatorError as exc:
                raise ForbiddenOperatorError(exc.operator, exc.reason, where=where) from None
            if op:
                check_operator(op, where=where)


def _check_value_name(name: str) -> None:
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise UnsafeModelError(f"a value of the exported program has the name {str(name)[:80]!r}")


# --------------------------------------------------------------------------- torch.export, loaded


def check_exported_program(ep: torch.export.ExportedProgram) -> None:
    """Check every node of every graph of ``ep`` (subgraphs of ``cond``,
    ``while_loop``, ... included) against the policy; constants must be tensors."""
    python_ops = {id(fn): name for name, fn in EXPORT_PYTHON_OPS.items()}
    for module_name, gm in ep.graph_module.named_modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            where = f"node {node.name} of the exported program{f' ({module_name})' if module_name else ''}"
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                raise ForbiddenOperatorError(str(node.target), f"a {node.op} node is not allowed", where=where)
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                check_operator(target._schema.name, where=where, schemas=[target._schema])
            elif isinstance(target, torch._ops.HigherOrderOperator):
                if target.name() not in EXPORT_HIGHER_ORDER_OPS:
                    raise ForbiddenOperatorError(
                        f"higher_order::{target.name()}", "it is not an allowed control-flow operator",
                        where=where,
                    )
            elif id(target) not in python_ops:
                name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
                raise ForbiddenOperatorError(name, "it is not an operator of the allowed namespaces",
                                             where=where)
    for name, value in ep.constants.items():
        if not isinstance(value, torch.Tensor):
            _refuse_custom_class(f"{type(value).__name__} constant {name!r}", "the exported program")
