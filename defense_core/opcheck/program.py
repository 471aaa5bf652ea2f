"""torch.export, static: the JSON of a serialized program checked before it is deserialized.

Deserializing evaluates parts of it: symbolic shape strings go to
``sympy.sympify`` and pytree specs name modules to import.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from defense_core.errors import ForbiddenOperatorError, UnsafeModelError
from defense_core.opcheck.policy import (
    EXPORT_PYTHON_OPS,
    check_higher_order,
    check_operator,
    not_an_operator,
    refuse_custom_class,
)

MAX_EXPR_CHARS = 10_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _export_target_operator(target: str) -> str:
    """The policy name of a serialized node target; raises for anything else."""
    if target in EXPORT_PYTHON_OPS:
        return ""
    parts = target.split(".")
    if len(parts) == 4 and parts[:2] == ["torch", "ops"] and parts[2] == "higher_order":
        check_higher_order(parts[3])
        return ""
    if (
        len(parts) in (4, 5)
        and parts[:2] == ["torch", "ops"]
        and all(_IDENTIFIER.match(p) for p in parts)
    ):
        return f"{parts[2]}::{parts[3]}"
    raise not_an_operator(target)


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
        raise UnsafeModelError(
            f"a symbolic shape expression does not parse: {text[:80]!r}"
        ) from exc
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            raise UnsafeModelError(
                f"a symbolic shape expression holds {type(node).__name__}: {text[:80]!r}"
            )
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES):
                raise UnsafeModelError(
                    f"a symbolic shape expression calls something unknown: {text[:80]!r}"
                )
            for kw in node.keywords:
                if kw.arg not in _SYMPY_ASSUMPTIONS or not isinstance(kw.value, ast.Constant) \
                        or not isinstance(kw.value.value, bool):
                    raise UnsafeModelError(
                        f"a symbolic shape expression has an unknown keyword: {text[:80]!r}"
                    )
            for i, arg in enumerate(node.args):
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not (
                    node.func.id == "Symbol" and i == 0 and _SYMBOL_NAME.match(arg.value)
                ):
                    raise UnsafeModelError(
                        f"a symbolic shape expression holds a string: {text[:80]!r}"
                    )
        elif isinstance(node, ast.Name):
            if node.id not in _SYMPY_NAMES and not _SYMBOL_NAME.match(node.id):
                raise UnsafeModelError(f"a symbolic shape expression names {node.id!r}")
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, (bool, str)):
                continue
            if not isinstance(value, (int, float)) or (isinstance(value, int) and abs(value) > 2**63):
                raise UnsafeModelError(f"a symbolic shape expression holds {value!r}")


_TREESPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict",
                             "collections.OrderedDict"})


def check_treespec(text: str) -> None:
    """Refuse a serialized pytree spec with types other than tuples, lists and
    dicts of plain keys (the loader would import the module a defaultdict
    factory or an enum names)."""
    try:
        _protocol, root = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UnsafeModelError("a serialized input/output spec is malformed") from exc
    stack = [root]
    while stack:
        spec = stack.pop()
        if not isinstance(spec, dict) or spec.get("type") not in _TREESPEC_TYPES:
            kind = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
            raise UnsafeModelError(
                f"the program's inputs or outputs use an unsupported type {kind!r}"
            )
        context = spec.get("context")
        if context is not None:
            try:
                decoded = json.loads(context)
            except (TypeError, ValueError, RecursionError) as exc:
                raise UnsafeModelError("a serialized input/output spec is malformed") from exc
            if decoded is not None and not (
                isinstance(decoded, list) and all(isinstance(k, (str, int)) for k in decoded)
            ):
                raise UnsafeModelError(
                    "a serialized input/output spec has a context that is not a list of keys"
                )
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
        raise UnsafeModelError(
            "exported programs with namedtuple inputs or outputs are not supported"
        )
    for key in document.get("range_constraints") or {}:
        if not _SYMBOL_NAME.match(str(key)):
            raise UnsafeModelError(f"a range constraint names {key!r}")
    for obj, _ in _walk_json(document):
        if obj.get("custom_obj_values"):
            refuse_custom_class("custom object", "the exported program")
        if "as_custom_obj" in obj or "as_custom_objs" in obj:
            refuse_custom_class("custom object", "the exported program")
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
