"""The operator policy: which operators a model that carries code may use, and why not."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from defense_core.errors import ForbiddenOperatorError

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
CUSTOM_CLASS_PREFIXES = ("__torch__.torch.classes", "torch.classes")


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
def forbidden_by_base_name() -> Mapping[str, str]:
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


def refuse_custom_class(name: str, where: str) -> None:
    raise ForbiddenOperatorError(
        name, "it is a custom class (C++ code outside the allowed operators)", where=where
    )


def check_higher_order(name: str, *, where: str = "") -> None:
    """Raise :class:`ForbiddenOperatorError` unless ``name`` is an allowed control-flow operator."""
    if name not in EXPORT_HIGHER_ORDER_OPS:
        raise ForbiddenOperatorError(
            f"higher_order::{name}", "it is not an allowed control-flow operator", where=where
        )


def not_an_operator(name: str, *, where: str = "") -> ForbiddenOperatorError:
    """The refusal of a call target that is neither an operator nor a Python op export records."""
    return ForbiddenOperatorError(
        name, "it is not an operator of the allowed namespaces", where=where
    )
