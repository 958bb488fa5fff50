"""A read-only view of an FX graph for matching: node kinds, arguments, shapes, and a networkx
DiGraph (edges producer -> user) for ancestor/descendant questions."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

# Functions and methods that compute the same op, by one canonical name.
FUNCTION_NAMES = {
    operator.add: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul",
    operator.sub: "sub", torch.sub: "sub", operator.neg: "neg", torch.neg: "neg",
    operator.getitem: "getitem", torch.cat: "cat", torch.concat: "cat", torch.stack: "stack",
    torch.flatten: "flatten", torch.arange: "arange", operator.le: "le", operator.lt: "lt",
    operator.ge: "ge", operator.gt: "gt", torch.le: "le", torch.lt: "lt", torch.ge: "ge", torch.gt: "gt",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and", torch.cos: "cos",
    torch.sin: "sin", torch.repeat_interleave: "repeat_interleave", torch.reshape: "reshape",
    operator.setitem: "setitem", torch.roll: "roll", torch.tensor: "tensor", torch.chunk: "chunk",
    torch.split: "split", torch.transpose: "transpose", torch.unsqueeze: "unsqueeze",
    operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne", torch.diff: "diff",
    torch.cumsum: "cumsum",
}
METHOD_NAMES = {
    "add": "add", "__add__": "add", "mul": "mul", "__mul__": "mul", "sub": "sub", "neg": "neg",
    "flatten": "flatten", "cos": "cos", "sin": "sin", "le": "le", "lt": "lt", "ge": "ge", "gt": "gt",
    "__and__": "and", "logical_and": "and", "bitwise_and": "and", "expand": "expand", "reshape": "reshape",
    "view": "reshape", "to": "to", "float": "to", "type": "to", "contiguous": "contiguous", "clone": "clone",
    "new_ones": "new_ones", "repeat_interleave": "repeat_interleave", "index_copy_": "index_copy_",
    "unsqueeze": "unsqueeze", "transpose": "transpose", "roll": "roll", "copy_": "copy_", "chunk": "chunk",
    "split": "split", "eq": "eq", "__eq__": "eq", "ne": "ne", "__ne__": "ne", "cumsum": "cumsum",
}


def op_name(node: Any) -> str | None:
    """Canonical op name of an FX node ('add', 'getitem', ...), or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        if node.target in SDPA_TARGETS:
            return "sdpa"
        name = FUNCTION_NAMES.get(node.target)
        if name is None and getattr(node.target, "__name__", None) == "cos" and "torch" in str(node.target):
            return "cos"
        return name
    if node.op == "call_method":
        return METHOD_NAMES.get(node.target)
    return None


def meta_value(node: Any) -> Any:
    """The fake value (tensor or SymInt) dynamo/aot recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("val", node.meta.get("example_value"))


def shape_of(node: Any) -> tuple | None:
    value = meta_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def is_tensor_node(node: Any) -> bool:
    return isinstance(meta_value(node), torch.Tensor)


def call_args(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of a call, by parameter name."""
    out = dict(defaults)
    out.update(zip(names, node.args, strict=False))
    out.update(node.kwargs)
    return out


def sdpa_args(node: fx.Node) -> dict[str, Any]:
    return call_args(node, SDPA_ARG_NAMES, SDPA_DEFAULTS)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes]


TRANSPARENT = ("to", "contiguous", "clone")


def skip_transparent(node: Any) -> Any:
    """Follow dtype/device casts, contiguous() and clone() back to their input."""
    while op_name(node) in TRANSPARENT and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


class GraphView:
    """The FX graph as a networkx DiGraph plus graph-order positions."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        self.dag = nx.DiGraph()
        for node in graph.nodes:
            self.dag.add_node(node)
            for producer in node.all_input_nodes:
                self.dag.add_edge(producer, node)

    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        return nx.ancestors(self.dag, node)

    def has_ancestor_op(self, node: fx.Node, names: Iterable[str]) -> bool:
        wanted = set(names)
        return op_name(node) in wanted or any(op_name(a) in wanted for a in self.ancestors(node))

    def sdpa_nodes(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if op_name(n) == "sdpa"]

    def before(self, a: fx.Node, b: fx.Node) -> bool:
        return self.order[a] < self.order[b]
