"""Loaded models: every graph of a scripted module or an exported program, checked.

These checks are authoritative (calls inlined, blocks and subgraphs walked);
the static scans before loading keep code from running at load.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from defense_core.errors import ForbiddenOperatorError, UnsafeModelError
from defense_core.opcheck.policy import (
    CUSTOM_CLASS_PREFIXES,
    EXPORT_PYTHON_OPS,
    FORBIDDEN_OPERATORS,
    STRUCTURAL_PRIM_KINDS,
    check_higher_order,
    check_operator,
    not_an_operator,
    refuse_custom_class,
)


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
    raise UnsafeModelError(
        f"the code of the TorchScript class {class_name} cannot be found to be checked"
    )


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
                    if name.startswith(CUSTOM_CLASS_PREFIXES):
                        refuse_custom_class(name, where)
                    classes.add(name)

    def walk(block: Any) -> None:
        for node in block.nodes():
            kind = node.kind()
            if kind not in STRUCTURAL_PRIM_KINDS:
                schemas = torch._C._jit_get_schemas_for_operator(kind)
                if kind.startswith("prim::") and not schemas and kind not in FORBIDDEN_OPERATORS:
                    raise ForbiddenOperatorError(
                        kind, "it is not a known TorchScript construct", where=where
                    )
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


def check_exported_program(ep: torch.export.ExportedProgram) -> None:
    """Check every node of every graph of ``ep`` (subgraphs of ``cond``,
    ``while_loop``, ... included) against the policy; constants must be tensors."""
    python_ops = {id(fn): name for name, fn in EXPORT_PYTHON_OPS.items()}
    for module_name, gm in ep.graph_module.named_modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            inside = f" ({module_name})" if module_name else ""
            where = f"node {node.name} of the exported program{inside}"
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                raise ForbiddenOperatorError(
                    str(node.target), f"a {node.op} node is not allowed", where=where
                )
            target = node.target
            if isinstance(target, torch._ops.OpOverload):
                check_operator(target._schema.name, where=where, schemas=[target._schema])
            elif isinstance(target, torch._ops.HigherOrderOperator):
                check_higher_order(target.name(), where=where)
            elif id(target) not in python_ops:
                module = getattr(target, "__module__", "?")
                raise not_an_operator(
                    f"{module}.{getattr(target, '__qualname__', target)}", where=where
                )
    for name, value in ep.constants.items():
        if not isinstance(value, torch.Tensor):
            refuse_custom_class(f"{type(value).__name__} constant {name!r}", "the exported program")
