"""An exported program as a trainable module whose layers follow ``train()``/``eval()``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from defense_core.errors import ModelLoadError

_aten = torch.ops.aten
_CONV2D_OPS = (_aten.conv2d.default, _aten.conv2d.padding)
_DROPOUT_OPS = tuple(
    getattr(_aten, name).default
    for base in ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
    for name in (base, f"{base}_")  # nn.Dropout(inplace=True) records the in-place op
)
# Graphs after run_decompositions() freeze BatchNorm/dropout in one mode; not supported.
_FIXED_MODE_OPS = frozenset(
    getattr(getattr(_aten, name), overload)
    for name, overload in (
        ("_native_batch_norm_legit_no_training", "default"),
        ("_native_batch_norm_legit_functional", "default"),
        ("_native_batch_norm_legit", "default"),
        ("_native_batch_norm_legit", "no_stats"),
        ("native_batch_norm", "default"),
        ("_batch_norm_with_update", "default"),
        ("_batch_norm_with_update_functional", "default"),
        ("_batch_norm_no_update", "default"),
        ("native_dropout", "default"),
    )
    if hasattr(_aten, name) and hasattr(getattr(_aten, name), overload)
)
_BATCHNORM_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


class ExportedDropout(nn.Module):
    """A dropout node of an exported graph that follows ``train()``/``eval()``."""

    def __init__(self, op: Any, p: float) -> None:
        super().__init__()
        self.op = op
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"{self.op}, p={self.p}"


def module_from_exported_program(ep: torch.export.ExportedProgram) -> nn.Module:
    """A trainable module from a (checked) exported program.

    ``ep.module()`` gives a ``GraphModule`` whose ``train()``/``eval()`` raise
    and whose layers are frozen in the mode the model was exported in (export
    records ``aten.batch_norm(..., training=<bool>, ...)``, ``aten.dropout(...,
    train=<bool>)``). Here those methods are restored, and each
    ``aten.conv2d``, ``aten.batch_norm`` with running statistics and dropout
    node is turned back into an ``nn.Conv2d``, ``nn.BatchNorm{1,2,3}d`` or
    :class:`ExportedDropout` that holds the same parameters and buffers (so
    the state-dict keys stay those of the original model): the mode then
    follows ``train()``/``eval()``, BatchNorm updates its statistics when
    training, and the defense finds the convolutions and BatchNorm layers.

    Refused (:class:`ModelLoadError`): BatchNorm or dropout in a form whose mode
    cannot be switched (graphs after ``run_decompositions()``, or a BatchNorm
    whose tensors are not one layer's). Not switched: other mode-dependent
    operators (``rrelu``, ``instance_norm`` with running statistics) keep the
    mode they were exported in. A BatchNorm with ``momentum=None`` exported in
    eval mode is recorded with momentum 0 and keeps its statistics.
    """
    try:
        gm = ep.module(check_guards=False)  # no guard code: it would be compiled from the archive
    except Exception as exc:
        raise ModelLoadError(f"cannot build a module from the exported program: {exc}") from exc
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)  # ep.module() replaces both with methods that raise
    graph = gm.graph
    dropouts = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CONV2D_OPS:
            _conv_to_module_(gm, node)
        elif node.target is _aten.batch_norm.default:
            _batchnorm_to_module_(gm, node)
        elif node.target in _DROPOUT_OPS:
            args = _normalized(gm, node)
            if args is not None and isinstance(args.get("p"), (int, float)):
                while hasattr(gm, f"dropout_{dropouts}"):
                    dropouts += 1
                gm.add_submodule(
                    f"dropout_{dropouts}", ExportedDropout(node.target, float(args["p"]))
                )
                _call_module_instead(gm, node, f"dropout_{dropouts}", args["input"])
    frozen = sorted(
        {
            str(n.target)
            for n in graph.nodes
            if n.op == "call_function"
            and (
                n.target in _FIXED_MODE_OPS
                or n.target in _DROPOUT_OPS
                or (
                    n.target is _aten.batch_norm.default
                    and _normalized_arg(gm, n, "running_mean") is not None
                )
            )
        }
    )
    if frozen:
        raise ModelLoadError(
            f"the exported program has {', '.join(frozen)} in a form whose train/eval mode "
            "cannot be switched; export the model with torch.export.export and save it "
            "without run_decompositions()"
        )
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm


def _normalized(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, Any] | None:
    pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    return dict(pair.kwargs) if pair is not None else None


def _normalized_arg(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str) -> Any:
    args = _normalized(gm, node)
    return None if args is None else args.get(name)


def _attr_of(value: Any, leaf: str) -> str | None:
    """The layer path of a ``get_attr`` of ``<layer>.<leaf>``, else None."""
    if (
        not isinstance(value, torch.fx.Node)
        or value.op != "get_attr"
        or not isinstance(value.target, str)
    ):
        return None
    prefix, _, last = value.target.rpartition(".")
    return prefix if prefix and last == leaf else None


def _plain_container(gm: torch.fx.GraphModule, prefix: str, names: set[str]) -> bool:
    """``prefix`` is a bare module from ``ep.module()`` holding exactly ``names``."""
    try:
        module = gm.get_submodule(prefix)
    except AttributeError:
        return False
    held = {n for n, _ in module.named_parameters(recurse=False)} | {
        n for n, _ in module.named_buffers(recurse=False)
    }
    return type(module) is nn.Module and not list(module.children()) and held == names


def _replace_layer(gm: torch.fx.GraphModule, prefix: str, layer: nn.Module) -> None:
    parent, _, leaf = prefix.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, layer)


def _call_module_instead(
    gm: torch.fx.GraphModule, node: torch.fx.Node, target: str, input_node: Any
) -> None:
    with gm.graph.inserting_before(node):
        replacement = gm.graph.call_module(target, (input_node,))
    replacement.meta = dict(node.meta)
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)


def _conv_to_module_(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    args = _normalized(gm, node)
    if args is None:
        return
    prefix, bias = _attr_of(args.get("weight"), "weight"), args.get("bias")
    if prefix is None or (bias is not None and _attr_of(bias, "bias") != prefix):
        return
    config = {
        "stride": tuple(args["stride"]),
        "padding": args["padding"] if isinstance(args["padding"], str) else tuple(args["padding"]),
        "dilation": tuple(args["dilation"]),
        "groups": int(args["groups"]),
    }
    existing = gm.get_submodule(prefix)
    if isinstance(existing, nn.Conv2d):  # the same layer called again
        if any(getattr(existing, k) != v for k, v in config.items()):
            return
    elif _plain_container(gm, prefix, {"weight"} | ({"bias"} if bias is not None else set())):
        weight = (
            gm.get_parameter(f"{prefix}.weight")
            if "weight" in dict(existing.named_parameters())
            else None
        )
        if weight is None or weight.ndim != 4:
            return
        layer = nn.Conv2d(
            weight.shape[1] * config["groups"],
            weight.shape[0],
            tuple(weight.shape[2:]),
            bias=bias is not None,
            device="meta",
            **config,
        )
        layer.weight = weight
        if bias is not None:
            layer.bias = gm.get_parameter(f"{prefix}.bias")
        _replace_layer(gm, prefix, layer)
    else:
        return
    _call_module_instead(gm, node, prefix, args["input"])


def _batchnorm_to_module_(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    args = _normalized(gm, node)
    if args is None:
        return
    prefix = _attr_of(args.get("running_mean"), "running_mean")
    weight, bias = args.get("weight"), args.get("bias")
    affine = weight is not None
    if (
        prefix is None
        or _attr_of(args.get("running_var"), "running_var") != prefix
        or (affine != (bias is not None))
        or (affine and (_attr_of(weight, "weight") != prefix or _attr_of(bias, "bias") != prefix))
        or not isinstance(args.get("momentum"), float)
        or not isinstance(args.get("eps"), float)
    ):
        return
    val = args["input"].meta.get("val") if isinstance(args["input"], torch.fx.Node) else None
    cls = _BATCHNORM_BY_RANK.get(val.dim()) if isinstance(val, torch.Tensor) else None
    if cls is None:
        return
    existing = gm.get_submodule(prefix)
    if isinstance(existing, nn.modules.batchnorm._BatchNorm):  # the same layer called again
        if (
            type(existing) is not cls
            or existing.eps != args["eps"]
            or existing.momentum != args["momentum"]
            or existing.affine != affine
        ):
            return
    else:
        names = {"running_mean", "running_var"} | ({"weight", "bias"} if affine else set())
        counter = "num_batches_tracked" in dict(existing.named_buffers(recurse=False))
        if not _plain_container(
            gm, prefix, names | ({"num_batches_tracked"} if counter else set())
        ):
            return
        running_mean = gm.get_buffer(f"{prefix}.running_mean")
        layer = cls(
            running_mean.shape[0],
            eps=args["eps"],
            momentum=args["momentum"],
            affine=affine,
            track_running_stats=True,
            device="meta",
        )
        if affine:
            layer.weight = gm.get_parameter(f"{prefix}.weight")
            layer.bias = gm.get_parameter(f"{prefix}.bias")
        layer.running_mean = running_mean
        layer.running_var = gm.get_buffer(f"{prefix}.running_var")
        layer.num_batches_tracked = (
            gm.get_buffer(f"{prefix}.num_batches_tracked") if counter else None
        )
        _replace_layer(gm, prefix, layer)
        # A model exported in train mode counts batches in the graph; the layer does that now.
        for counted in list(gm.graph.nodes):
            if counted.op == "get_attr" and counted.target == f"{prefix}.num_batches_tracked":
                for user in list(counted.users):
                    if (
                        user.target is _aten.add_.Tensor
                        and not user.users
                        and user.args[0] is counted
                    ):
                        gm.graph.erase_node(user)
    _call_module_instead(gm, node, prefix, args["input"])
