"""Recognise RoPE applied to a tensor, as transformers emits it under dynamo.

  rotate-half (Llama, Qwen, Mistral, ...):  x*cos + cat((-x[..., h:], x[..., :h]), -1)*sin,  h = R/2
  interleaved (Cohere, GPT-J):              x*cos + stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)*sin
  partial rotary (GPT-NeoX, StableLM):      cat([rope(x[..., :R]), x[..., R:]], -1)

`match_rope(node, view)` only reads the graph: it returns a RopeMatch or a reason string.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from sparse_compile.passes.graph import GraphView, op_name, shape_of, skip_transparent


@dataclass(frozen=True)
class RopeMatch:
    layout: str  # "rotate_half" | "interleaved"
    rotary_dim: int
    head_dim: int
    x: fx.Node  # the tensor RoPE was applied to (full head dim)
    cos: fx.Node
    sin: fx.Node


def last_dim_slice(node: object) -> tuple[fx.Node, slice] | None:
    """x[..., s] -> (x, s) for a getitem whose index is (Ellipsis, slice)."""
    if op_name(node) != "getitem":
        return None
    base, index = node.args
    if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice):
        return base, index[1]
    return None


def is_last_dim(dim: object, node: fx.Node) -> bool:
    shape = shape_of(node)
    return dim == -1 or (shape is not None and dim == len(shape) - 1)


def cat_parts(node: fx.Node) -> list | None:
    """The tensors of a torch.cat along the last dim, or None."""
    if op_name(node) != "cat":
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not is_last_dim(dim, node):
        return None
    return list(tensors)


def rotation_source(node: object) -> tuple[str, fx.Node] | None:
    """If `node` is rotate_half(x) or the interleaved rotation of x, return (layout, x)."""
    node = skip_transparent(node)
    parts = cat_parts(node) if isinstance(node, fx.Node) else None
    if parts is not None and len(parts) == 2 and op_name(parts[0]) == "neg":
        hi, lo = last_dim_slice(parts[0].args[0]), last_dim_slice(parts[1])
        if hi and lo and hi[0] is lo[0]:
            x = hi[0]
            shape = shape_of(x)
            if shape is None or not isinstance(shape[-1], int):
                return None
            half = shape[-1] // 2
            if (hi[1].start, hi[1].stop, hi[1].step) == (half, None, None) and (
                lo[1].start, lo[1].stop, lo[1].step) in ((None, half, None), (0, half, None)):
                return "rotate_half", x
    if op_name(node) == "flatten":
        stacked = node.args[0]
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if op_name(stacked) == "stack" and start == -2:
            tensors = stacked.args[0] if stacked.args else stacked.kwargs.get("tensors")
            dim = stacked.args[1] if len(stacked.args) > 1 else stacked.kwargs.get("dim", 0)
            pair = isinstance(tensors, (list, tuple)) and len(tensors) == 2
            if pair and dim == -1 and op_name(tensors[0]) == "neg":
                odd, even = last_dim_slice(tensors[0].args[0]), last_dim_slice(tensors[1])
                if odd and even and odd[0] is even[0]:
                    odd_ok = (odd[1].start, odd[1].step) == (1, 2)
                    if odd_ok and even[1].start in (None, 0) and even[1].step == 2:
                        return "interleaved", odd[0]
    return None


def mul_operands(node: object) -> tuple | None:
    if op_name(node) != "mul" or len(node.args) != 2:
        return None
    return node.args[0], node.args[1]


def match_full_rope(node: fx.Node, view: GraphView) -> tuple[str, fx.Node, fx.Node, fx.Node] | str:
    """x*cos + rot(x)*sin -> (layout, x, cos, sin), or a reason."""
    node = skip_transparent(node)
    if op_name(node) != "add" or len(node.args) != 2:
        source = node.target if isinstance(node, fx.Node) else node
        return f"not RoPE: the tensor comes from {source!r}, not x*cos + rot(x)*sin"
    left, right = mul_operands(node.args[0]), mul_operands(node.args[1])
    if left is None or right is None:
        return "not RoPE: an add whose operands are not both products"
    for plain, rotated in ((left, right), (right, left)):
        for r_i in (0, 1):
            rot = rotation_source(rotated[r_i])
            if rot is None:
                continue
            layout, x = rot
            sin = rotated[1 - r_i]
            for p_i in (0, 1):
                if skip_transparent(plain[p_i]) is skip_transparent(x):
                    cos = plain[1 - p_i]
                    if not isinstance(cos, fx.Node) or not isinstance(sin, fx.Node):
                        return "not RoPE: cos/sin are not tensors"
                    if not view.has_ancestor_op(cos, ("cos",)) or not view.has_ancestor_op(sin, ("sin",)):
                        return "not RoPE: the factors are not computed from cos()/sin()"
                    return layout, x, cos, sin
    return "not RoPE: no operand is rotate_half(x) or the interleaved rotation of the other operand's x"


def match_rope(node: fx.Node, view: GraphView) -> RopeMatch | str:
    """Recognise RoPE (full or partial rotary) producing `node`; a reason string if not proven."""
    node = skip_transparent(node)
    parts = cat_parts(node)
    if parts is not None and len(parts) == 2:
        passed = last_dim_slice(skip_transparent(parts[1]))
        if passed is not None and passed[1].stop is None and isinstance(passed[1].start, int):
            rotary_dim = passed[1].start
            full = match_full_rope(parts[0], view)
            if isinstance(full, str):
                return full
            layout, x_rot, cos, sin = full
            rot_slice = last_dim_slice(skip_transparent(x_rot))
            if rot_slice is None or rot_slice[0] is not passed[0] or rot_slice[1].stop != rotary_dim:
                return "not RoPE: partial rotary halves do not come from one tensor split at one index"
            base = passed[0]
            head_dim = shape_of(base)[-1] if shape_of(base) else None
            if not isinstance(head_dim, int):
                return "not RoPE: head_dim is not static"
            return RopeMatch(layout, rotary_dim, head_dim, base, cos, sin)
    full = match_full_rope(node, view)
    if isinstance(full, str):
        return full
    layout, x, cos, sin = full
    shape = shape_of(x)
    if shape is None or not isinstance(shape[-1], int):
        return "not RoPE: head_dim is not static"
    return RopeMatch(layout, shape[-1], shape[-1], x, cos, sin)
