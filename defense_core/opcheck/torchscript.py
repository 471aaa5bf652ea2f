"""TorchScript, static: an archive's code and pickles checked before anything is loaded.

Serialized TorchScript is Python syntax: the ``code/`` members are parsed with
:mod:`ast` and every operator reference is checked, ``__setstate__`` included
(``torch.jit.load`` runs it while loading). Pickles are scanned for custom
class names, never unpickled.
"""

from __future__ import annotations

import ast
import os
import re
import zipfile
from pathlib import Path

from defense_core.errors import ModelLoadError, UnsafeModelError
from defense_core.opcheck.archive import archive_members, read_member
from defense_core.opcheck.policy import (
    ALLOWED_NAMESPACES,
    CUSTOM_CLASS_PREFIXES,
    check_operator,
    forbidden_by_base_name,
    refuse_custom_class,
)

MAX_CODE_MEMBERS = 10_000
MAX_CODE_BYTES = 64 * 1024**2          # all of code/ together
MAX_PICKLE_SCAN_BYTES = 64 * 1024**2   # data.pkl / constants.pkl, scanned for custom classes


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
                    f"the TorchScript archive has {len(code_members)} code files "
                    f"(limit {MAX_CODE_MEMBERS})"
                )
            if not code_members:
                raise UnsafeModelError("the TorchScript archive holds no code to check")
            total = sum(info.file_size for info, _ in code_members)
            if total > MAX_CODE_BYTES:
                raise UnsafeModelError(
                    f"the TorchScript archive holds {total} bytes of code (limit {MAX_CODE_BYTES})"
                )
            for info, inner in pickles:
                _scan_pickle_for_custom_classes(read_member(zf, info, MAX_PICKLE_SCAN_BYTES), inner)
            for info, inner in code_members:
                raw = read_member(zf, info, MAX_CODE_BYTES)
                try:
                    source = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise UnsafeModelError(f"{inner} is not UTF-8 text: {exc}") from exc
                scan_torchscript_source(source, filename=inner)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"the TorchScript archive cannot be read: {exc}") from exc


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


def _scan_pickle_for_custom_classes(data: bytes, inner: str) -> None:
    # Class references in a pickle are plain "module\nname" strings; a custom
    # class there would be instantiated (its C++ __setstate__ run) at load.
    for prefix in CUSTOM_CLASS_PREFIXES:
        at = data.find(prefix.encode())
        if at >= 0:
            end = data.find(b"\n", at)
            module = data[at: end if end > 0 else at + 200].decode("utf-8", "replace")
            refuse_custom_class(module, f"{inner} (unpickled at load)")


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
        loading = self.scope and self.scope[-1] == "__setstate__"
        runs = " (runs while the archive is loaded)" if loading else ""
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
        qualified = forbidden_by_base_name().get(base)
        if qualified is not None:
            check_operator(qualified, where=self._where(node))

    def _check_chain(self, chain: list[str], node: ast.AST) -> None:
        dotted = ".".join(chain)
        if dotted.startswith(CUSTOM_CLASS_PREFIXES):
            refuse_custom_class(dotted, self._where(node))
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
        raise UnsafeModelError(
            f"{filename} cannot be parsed, so it cannot be checked: {exc}"
        ) from exc
    _SourceScanner(filename).visit(tree)
