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

Modules: :mod:`~defense_core.opcheck.policy` (the decision),
:mod:`~defense_core.opcheck.archive` (model archives' members and bounded
reads, shared with :mod:`defense_core.loading`),
:mod:`~defense_core.opcheck.torchscript` and
:mod:`~defense_core.opcheck.program` (the static scans) and
:mod:`~defense_core.opcheck.graphs` (the checks after loading).
"""

from defense_core.opcheck.archive import (
    MAX_ARCHIVE_MEMBERS,
    archive_members,
    read_member,
)
from defense_core.opcheck.graphs import (
    check_exported_program,
    check_scripted_module,
)
from defense_core.opcheck.policy import (
    ALLOWED_NAMESPACES,
    EXPORT_HIGHER_ORDER_OPS,
    EXPORT_PYTHON_OPS,
    FORBIDDEN_OPERATORS,
    PATH_ARGUMENT_NAMES,
    STRUCTURAL_PRIM_KINDS,
    check_operator,
    forbidden_operator_names,
    operator_refusal,
)
from defense_core.opcheck.program import (
    MAX_EXPR_CHARS,
    check_sym_expr,
    check_treespec,
    scan_serialized_program,
)
from defense_core.opcheck.torchscript import (
    MAX_CODE_BYTES,
    MAX_CODE_MEMBERS,
    MAX_PICKLE_SCAN_BYTES,
    scan_torchscript_archive,
    scan_torchscript_source,
)

__all__ = [
    "ALLOWED_NAMESPACES",
    "EXPORT_HIGHER_ORDER_OPS",
    "EXPORT_PYTHON_OPS",
    "FORBIDDEN_OPERATORS",
    "MAX_ARCHIVE_MEMBERS",
    "MAX_CODE_BYTES",
    "MAX_CODE_MEMBERS",
    "MAX_EXPR_CHARS",
    "MAX_PICKLE_SCAN_BYTES",
    "PATH_ARGUMENT_NAMES",
    "STRUCTURAL_PRIM_KINDS",
    "archive_members",
    "check_exported_program",
    "check_operator",
    "check_scripted_module",
    "check_sym_expr",
    "check_treespec",
    "forbidden_operator_names",
    "operator_refusal",
    "read_member",
    "scan_serialized_program",
    "scan_torchscript_archive",
    "scan_torchscript_source",
]
