"""Read the structure of the attention mask transformers builds under tracing.

Under dynamo, transformers materialises a boolean (B, 1, Lq, Lk) mask from aranges:

    q_idx  = (arange(Lq) + q_offset)[None, None, :, None]
    kv_idx = (arange(Lk) + kv_offset)[None, None, None, :]
    mask   = (kv_idx <= q_idx) [& (kv_idx > q_idx - window)] [& padding[b_idx, kv_idx]] .expand(B, 1, Lq, Lk)

Without a padding mask and without a cache (`model(ids, use_cache=False)`), transformers also
builds position ids in the graph (`arange(L) + offset` as a (1, L) row, expanded over the batch)
and a packed-sequence mask from them,

    packed = cumsum(diff(position_ids, prepend=position_ids[:, :1] - 1) != 1, -1)
    mask   = ... & (packed[b_idx, q_idx] == packed[b_idx, kv_idx])

and (newer releases) compares position ids instead of indices: position_ids[b_idx, kv_idx] <=
position_ids[b_idx, q_idx]. Both are read here: position ids that are an arange step by 1, so the
packed mask is all zeros (one sequence per row) and the comparison is causal on the indices.
User-given position_ids are graph inputs, so such masks stay unproven (exact attention).

With a StaticCache passed to the model (transformers 5.17 and 5.25), the query offset is the cache's fill
counter, a 0-d int64 tensor graph input that the cache increments in place (`add_`) after the mask read it:

    q_idx = (arange(Lq) + cumulative_length)[None, None, :, None]     kv_idx over all max_cache_len slots
    mask  = (kv_idx <= q_idx) [& pad(attention_mask, (0, max_cache_len - w))[b_idx, kv_idx]] .expand(...)

A 0-d integer tensor added to arange(L) is read as a `TensorOffset` (its value as that add reads it): a
prefill node gets causal with that offset, which also hides the unfilled slots (every one sits past the
last query, at or after cumulative_length + Lq); a decode mask (one query) with a tensor offset is kept
whole as its (B, 1, 1, Lk) key validity, O(B * Lk), so decode graphs need no host read. Any other tensor
read by the mask (a float or 1-D offset, a tensor compared directly) keeps the mask a tensor. The
4-D masks `generate` builds for a static cache arrive as graph inputs: the decode one is key validity,
the prefill one stays a tensor.

`analyze_mask` interprets the mask's subgraph abstractly (each node becomes a position vector,
a predicate or a padding lookup) and returns a `MaskMatch` — the structure the fused node takes
instead of the tensor — or a reason why it cannot prove one. It only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from sparse_compile.passes.graph import meta_value, op_name, shape_of

# Offsets are ints, FX nodes producing SymInts (e.g. the cache length in decode graphs), or
# TensorOffsets (a 0-d integer tensor such as a StaticCache's cumulative_length).
Offset = Any


@dataclass(frozen=True)
class TensorOffset:
    """A 0-d integer tensor added to positions: `value` as node `read_at` reads it.

    A StaticCache keeps its fill level in a tensor (`cumulative_length`) and increments it in place
    (`add_`) inside the graph, after the mask has read it; the rewrite copies `value` to the host just
    before `read_at` and hands the copy to the node (`q_offset_tensor`), so the node sees the value the
    mask saw."""

    value: fx.Node
    read_at: fx.Node

    def __str__(self) -> str:
        return f"tensor({self.value.name})"


@dataclass(frozen=True)
class Positions:
    """arange(length) + offset, later placed on an axis ('b', 'q' or 'kv') by indexing; `shift` is
    a constant added afterwards (q_idx - window)."""

    offset: tuple[Offset, ...] = ()
    axis: str | None = None
    shift: int = 0


@dataclass(frozen=True)
class Predicate:
    """A conjunction of mask atoms."""

    causal: bool = False
    window: int = 0
    q_offset: tuple[Offset, ...] = ()
    kv_offset: tuple[Offset, ...] = ()
    padding: fx.Node | None = None
    padding_kv_offset: tuple[Offset, ...] = ()
    padding_read: fx.Node | None = None  # the padding[b_idx, kv_idx] gather itself, (B, 1, 1, Lk)


@dataclass(frozen=True)
class RowPositions:
    """position_ids built in the graph: arange(L) + offset as a (1, L) row (expanded over the batch)."""

    offset: tuple[Offset, ...] = ()


@dataclass(frozen=True)
class RowFirst:
    """row[:, :1] + shift of a RowPositions row: the first position id of each batch row, shifted."""

    row: RowPositions
    shift: int = 0


@dataclass(frozen=True)
class Constant:
    """A tensor whose every element is `value` (e.g. the packed-sequence ids of arange positions)."""

    value: int


@dataclass(frozen=True)
class Leaf:
    """A tensor the analysis does not look into (e.g. the 2-D padding mask)."""

    node: fx.Node


@dataclass
class MaskMatch:
    """The mask of one SDPA call as structure.

    q_offset_terms / kv_offset_terms: offsets as sums of ints, SymInt nodes and TensorOffsets; the
      node's q_offset is sum(q_offset_terms) - sum(kv_offset_terms) (TensorOffsets reach it as its
      q_offset_tensor argument, see passes/rewrite.py).
    key_valid: node producing the (B, Lk) bool padding mask, or None.
    key_valid_from_4d: True when key_valid is a (B, 1, 1, Lk) tensor whose [:, 0, 0] is the key
      validity: a decode mask input of StaticCache graphs (or the recognised decode mask with a
      TensorOffset a StaticCache passed to the model builds), or the gather padding[b_idx, kv_idx]
      itself when the padding mask is read at a key offset (sliding-window DynamicCache decode,
      where the cache holds only the last keys: positions kv_offset .. kv_offset + Lk - 1).
    key_valid_needs_cut: the padding mask's width is not provably Lk; the node gets its first Lk
      columns (what padding[b_idx, arange(Lk)] reads; eager fails the same way if it is shorter).
    dense_mask: the SDPA mask node kept as a tensor (structure unproven), or None.
    """

    causal: bool
    window: int = 0
    q_offset_terms: tuple[Offset, ...] = ()
    kv_offset_terms: tuple[Offset, ...] = ()
    key_valid: fx.Node | None = None
    key_valid_from_4d: bool = False
    key_valid_needs_cut: bool = False
    dense_mask: fx.Node | None = None
    reason: str = ""
    nodes: set[fx.Node] = field(default_factory=set)

    def describe(self) -> str:
        if self.dense_mask is not None:
            return "tensor"
        parts = []
        if self.causal:
            terms = [str(t) for t in self.q_offset_terms if t != 0]
            minus = [str(t) for t in self.kv_offset_terms if t != 0]
            off = "+".join(terms) or "0"
            if minus:
                off += "-" + "-".join(minus)
            parts.append(f"causal(q_offset={off})")
        else:
            parts.append("full")
        if self.window:
            parts.append(f"window={self.window}")
        if self.key_valid is not None:
            parts.append("padding")
        return "+".join(parts)


class Unsupported(Exception):
    pass


def is_symint_or_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, fx.Node):
        return isinstance(meta_value(value), (int, torch.SymInt))
    return False


AXIS_OF_INDEX = {
    (None, None, "s", None): "q",
    (None, None, None, "s"): "kv",
    ("s", None, None, None): "b",
}


def index_pattern(index: Any) -> tuple | None:
    if not isinstance(index, tuple):
        return None
    out = []
    for item in index:
        if item is None:
            out.append(None)
        elif isinstance(item, slice) and item == slice(None, None, None):
            out.append("s")
        else:
            return None
    return tuple(out)


def conjoin(a: Predicate, b: Predicate) -> Predicate:
    def pick(x, y, name):
        if x and y and x != y:
            raise Unsupported(f"two different {name} atoms in one mask")
        return x or y

    if a.padding is not None and b.padding is not None and a.padding is not b.padding:
        raise Unsupported("two different padding masks")
    return Predicate(
        causal=a.causal or b.causal,
        window=pick(a.window, b.window, "window"),
        q_offset=pick(a.q_offset, b.q_offset, "query offset"),
        kv_offset=pick(a.kv_offset, b.kv_offset, "key offset"),
        padding=a.padding if a.padding is not None else b.padding,
        padding_kv_offset=pick(a.padding_kv_offset, b.padding_kv_offset, "padding offset"),
        padding_read=a.padding_read if a.padding_read is not None else b.padding_read,
    )


def compare(name: str, lhs: Any, rhs: Any) -> Predicate:
    """kv <= q (causal) or kv > q - w (window), in either operand order."""
    flipped = {"le": "ge", "ge": "le", "lt": "gt", "gt": "lt"}
    if isinstance(lhs, Positions) and lhs.axis == "q":
        lhs, rhs, name = rhs, lhs, flipped[name]
    placed = isinstance(lhs, Positions) and isinstance(rhs, Positions)
    if not (placed and lhs.axis == "kv" and rhs.axis == "q"):
        raise Unsupported(f"comparison '{name}' is not between key and query positions")
    if lhs.shift:
        raise Unsupported("shifted key positions")
    if name == "le" and rhs.shift == 0:
        return Predicate(causal=True, q_offset=rhs.offset, kv_offset=lhs.offset)
    if name == "lt" and rhs.shift == 1:
        return Predicate(causal=True, q_offset=rhs.offset, kv_offset=lhs.offset)
    if name == "gt" and rhs.shift < 0:
        return Predicate(window=-rhs.shift, q_offset=rhs.offset, kv_offset=lhs.offset)
    raise Unsupported(f"comparison kv {name} q{rhs.shift:+d} is neither causal nor a sliding window")


def interpret(node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """The abstract value of one node of the mask subgraph."""
    name = op_name(node)
    args = list(fx.node.map_arg(node.args, lambda a: env.get(a, a)))
    if name == "arange":
        if len(node.args) != 1 or node.kwargs.get("dtype") not in (None, torch.int64):
            raise Unsupported("arange with a start/step or dtype")
        return Positions()
    if name in ("add", "sub") and isinstance(args[0], RowFirst) and isinstance(node.args[1], int):
        delta = node.args[1] if name == "add" else -node.args[1]
        return RowFirst(args[0].row, args[0].shift + delta)
    if name == "unsqueeze" and isinstance(args[0], Positions) and args[0].axis is None and args[1] in (0, -2):
        return RowPositions(args[0].offset)
    if name == "diff":
        return diff_of_positions(node, env)
    if name in ("eq", "ne"):
        return compare_constants(name, args[0], args[1])
    if name == "cumsum" and isinstance(args[0], Constant):
        if args[0].value != 0:
            raise Unsupported("cumsum of a non-zero constant")
        return Constant(0)
    if name in ("add", "sub") and isinstance(args[0], Positions):
        pos, other = args[0], node.args[1]
        if is_offset_tensor(other):
            if pos.axis is not None or name != "add" or node.kwargs:
                raise Unsupported(f"'{name}' of a 0-d tensor on placed positions (only arange(L) + offset is read)")
            return Positions(offset=pos.offset + (TensorOffset(other, node),))
        if not is_symint_or_int(other):
            raise Unsupported("a position offset that is a tensor (data-dependent), not an int/SymInt")
        if pos.axis is None and name == "add":
            return Positions(offset=pos.offset + (other,))
        if pos.axis == "q" and isinstance(other, int):
            return Positions(pos.offset, "q", pos.shift + (other if name == "add" else -other))
        raise Unsupported(f"'{name}' on placed positions with a symbolic operand")
    if name == "getitem":
        base, index = args
        if isinstance(base, Positions) and base.axis is None:
            axis = AXIS_OF_INDEX.get(index_pattern(index))
            if axis is None:
                raise Unsupported(f"position indexing {index!r}")
            return Positions(base.offset, axis, base.shift)
        if isinstance(base, RowPositions) and isinstance(index, tuple) and len(index) == 2:
            b_pos, at = index
            if at == slice(None, 1, None) and b_pos == slice(None, None, None):
                return RowFirst(base)
            if is_batch_positions(b_pos) and isinstance(at, Positions) and at.axis in ("q", "kv") and not at.shift:
                # position_ids[b, x] = x + offset: the ids of an arange row are their indices, shifted
                return Positions(at.offset + base.offset, at.axis)
        if isinstance(base, Constant) and isinstance(index, tuple) and len(index) == 2 and is_batch_positions(
                index[0]) and isinstance(index[1], Positions):
            return base
        if isinstance(base, Leaf) and isinstance(index, tuple) and len(index) == 2:
            b_pos, kv_pos = index
            if is_batch_positions(b_pos) and (
                isinstance(kv_pos, Positions) and kv_pos.axis == "kv" and kv_pos.shift == 0
            ):
                return Predicate(padding=base.node, padding_kv_offset=kv_pos.offset, padding_read=node)
        raise Unsupported("indexing that is neither position placement nor padding[b_idx, kv_idx]")
    if name in ("le", "lt", "ge", "gt"):
        return compare(name, args[0], args[1])
    if name == "and":
        a, b = (True if isinstance(x, Constant) and x.value is True else x for x in args)
        if a is True:
            return b
        if b is True:
            return a
        if isinstance(a, Predicate) and isinstance(b, Predicate):
            return conjoin(a, b)
        raise Unsupported("'&' of non-predicates")
    if name == "new_ones":
        if tuple(node.args[1:]) in (((),), ()) and node.kwargs.get("dtype") == torch.bool:
            return True
        raise Unsupported("new_ones of a non-scalar")
    if name in ("to", "expand", "contiguous"):
        base = args[0]
        if isinstance(base, Leaf):
            return Leaf(node)
        if isinstance(base, (RowPositions, Constant)):
            return base
        if name == "to" and any(isinstance(a, torch.dtype) and a != torch.bool for a in node.args[1:]):
            raise Unsupported("mask cast to a non-bool dtype")
        if name == "to" and node.kwargs.get("dtype") not in (None, torch.bool):
            raise Unsupported("mask cast to a non-bool dtype")
        return base
    if node.op == "placeholder":
        raise Unsupported(f"the mask reads graph input {node.target} as data (a tensor offset is read only as a "
                          f"0-d integer tensor added to arange(L))")
    raise Unsupported(f"unsupported op in the mask subgraph: {node.target}")


def is_offset_tensor(value: Any) -> bool:
    """A 0-d int64/int32 tensor node: read as one opaque integer offset (its value is data), never
    looked into. The StaticCache fill level `cumulative_length` (transformers 5.17 and 5.25)."""
    value = meta_value(value) if isinstance(value, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype in (torch.int64, torch.int32)


def tensor_offsets(*offsets: tuple[Offset, ...]) -> bool:
    return any(isinstance(t, TensorOffset) for offset in offsets for t in offset)


def is_batch_positions(value: Any) -> bool:
    """arange(B) placed on the batch axis: the b_idx of an index read."""
    return isinstance(value, Positions) and value.axis == "b" and value.offset in ((), (0,))


def diff_of_positions(node: fx.Node, env: dict[fx.Node, Any]) -> Constant:
    """torch.diff(row, prepend=row[:, :1] - 1, dim=-1) of arange position ids: every step is 1."""
    args = list(fx.node.map_arg(node.args, lambda a: env.get(a, a)))
    kwargs = dict(fx.node.map_arg(node.kwargs, lambda a: env.get(a, a)))
    row = args[0]
    prepend = kwargs.get("prepend", args[3] if len(args) > 3 else None)
    dim = kwargs.get("dim", args[2] if len(args) > 2 else -1)
    n = kwargs.get("n", args[1] if len(args) > 1 else 1)
    if not isinstance(row, RowPositions) or n != 1 or dim not in (-1, 1) or "append" in kwargs:
        raise Unsupported("diff of something other than in-graph position ids")
    if not (isinstance(prepend, RowFirst) and prepend.row == row and prepend.shift == -1):
        raise Unsupported("diff of position ids with a prepend other than position_ids[:, :1] - 1")
    return Constant(1)


def compare_constants(name: str, a: Any, b: Any) -> Any:
    """==/!= between constants (or a constant and an int): a constant bool, or True (no constraint)."""
    values = [x.value if isinstance(x, Constant) else x for x in (a, b)]
    if not all(isinstance(v, (int, bool)) for v in values) or not any(isinstance(x, Constant) for x in (a, b)):
        raise Unsupported(f"'{name}' of values that are not constants")
    result = (values[0] == values[1]) if name == "eq" else (values[0] != values[1])
    return True if result else Constant(False)


def offsets_equal(a: tuple, b: tuple) -> bool:
    return tuple(t for t in a if t != 0) == tuple(t for t in b if t != 0)


def analyze_mask(mask: fx.Node, q: fx.Node, k: fx.Node) -> MaskMatch:
    """Structure of SDPA's `attn_mask` node (never None here); falls back to a kept tensor."""
    q_shape, k_shape, m_shape = shape_of(q), shape_of(k), shape_of(mask)
    value = meta_value(mask)
    if m_shape is None or q_shape is None or k_shape is None:
        return MaskMatch(causal=False, dense_mask=mask, reason="mask, q or k has no recorded shape")
    # A (B, 1, 1, Lk) boolean mask in a decode graph is exactly per-batch key validity.
    if mask.op == "placeholder" or not mask.all_input_nodes:
        decode_shape = len(m_shape) == 4 and m_shape[1] == 1 and m_shape[2] == 1 and q_shape[2] == 1
        if value.dtype == torch.bool and decode_shape:
            return MaskMatch(causal=False, key_valid=mask, key_valid_from_4d=True)
        return MaskMatch(
            causal=False, dense_mask=mask, reason="mask is a graph input, not a (B,1,1,Lk) bool decode mask"
        )
    if value.dtype != torch.bool:
        reason = f"mask dtype {value.dtype} (only bool masks are read)"
        return MaskMatch(causal=False, dense_mask=mask, reason=reason)
    # Collect the subgraph: ancestors down to aranges, SymInt inputs and the 2-D padding mask (a leaf).
    order: list[fx.Node] = []
    leaves: set[fx.Node] = set()
    seen: set[fx.Node] = set()

    def visit(node: fx.Node) -> None:
        if node in seen:
            return
        seen.add(node)
        if not isinstance(meta_value(node), torch.Tensor):
            return  # SymInt / int producers are read as offsets
        name = op_name(node)
        is_index = name == "getitem" and isinstance(node.args[1], tuple) and len(node.args[1]) == 2 and all(
            isinstance(a, fx.Node) for a in node.args[1]
        )
        for inp in node.all_input_nodes:
            if name == "add" and len(node.args) == 2 and inp is node.args[1] and is_offset_tensor(inp):
                continue  # arange(L) + cumulative_length: the 0-d tensor is an offset, like a SymInt
            if is_index and inp is node.args[0] and reads_graph_input(inp):
                leaves.add(inp)  # padding[b_idx, kv_idx]: do not look inside the padding mask
                continue
            visit(inp)
        order.append(node)

    visit(mask)
    env: dict[fx.Node, Any] = {leaf: Leaf(leaf) for leaf in leaves}
    try:
        for node in order:
            if node in env:
                continue
            env[node] = interpret(node, env)
        result = env[mask]
        if result is True:
            result = Predicate()
        if not isinstance(result, Predicate):
            raise Unsupported("the mask does not reduce to a predicate")
        if result.window and not result.causal:
            raise Unsupported("a sliding window without causality")
        gathered = False
        if result.padding is not None:
            pad_shape = shape_of(result.padding)
            if pad_shape is None or len(pad_shape) != 2:
                raise Unsupported("the padding mask is not 2-D")
            if result.kv_offset and not offsets_equal(result.kv_offset, result.padding_kv_offset):
                raise Unsupported("padding and causal key offsets differ")
            if not offsets_equal(result.padding_kv_offset, ()):
                # Read at a key offset: keep the O(B * Lk) gather padding[b_idx, kv_idx] as key validity.
                read_shape = shape_of(result.padding_read)
                if read_shape is None or len(read_shape) != 4 or read_shape[1:3] != (1, 1) or not (
                    sym_equal(read_shape[3], k_shape[2]) and sym_equal(read_shape[0], q_shape[0])
                ):
                    raise Unsupported(
                        f"the padding mask is read at a key offset as {read_shape}, not (B, 1, 1, Lk)"
                    )
                gathered = True
    except Unsupported as err:
        return MaskMatch(causal=False, dense_mask=mask, reason=str(err))
    if tensor_offsets(result.q_offset, result.kv_offset, result.padding_kv_offset) and q_shape[2] == 1:
        return decode_key_validity(mask, m_shape, q_shape, k_shape)
    kept = set()
    if gathered:  # the gather and what it reads stay in the graph
        kept = {result.padding_read} | ancestors_within(result.padding_read, order)
    nodes = {n for n in order if n not in leaves and n not in kept}
    return MaskMatch(
        causal=result.causal,
        window=result.window,
        q_offset_terms=result.q_offset,
        kv_offset_terms=result.kv_offset,
        key_valid=result.padding_read if gathered else result.padding,
        key_valid_from_4d=gathered,
        key_valid_needs_cut=result.padding is not None and not gathered
        and not sym_equal(shape_of(result.padding)[1], k_shape[2]),
        nodes=nodes,
    )


def decode_key_validity(mask: fx.Node, m_shape: tuple, q_shape: tuple, k_shape: tuple) -> MaskMatch:
    """A recognised decode mask (one query) whose offsets are tensors: its (B, 1, 1, Lk) rows are exactly
    the key validity, so the O(B * Lk) mask stays in the graph as key_valid (no host copy of the offset,
    CUDA-graph safe) instead of becoming a causal offset. StaticCache decode: key j is visible iff
    j <= cumulative_length (unfilled slots are not) and the padding mask allows it."""
    if not (len(m_shape) == 4 and m_shape[1] == 1 and m_shape[2] == 1 and sym_equal(m_shape[0], q_shape[0])
            and sym_equal(m_shape[3], k_shape[2])):
        reason = f"a decode mask with a tensor offset of shape {m_shape}, not (B, 1, 1, Lk)"
        return MaskMatch(causal=False, dense_mask=mask, reason=reason)
    return MaskMatch(causal=False, key_valid=mask, key_valid_from_4d=True)


def reads_graph_input(node: fx.Node) -> bool:
    """True when a tensor graph input (e.g. the 2-D padding mask or user position_ids) feeds `node`;
    False for tensors computed from aranges only (in-graph position ids and what derives from them)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "get_attr") and isinstance(meta_value(n), torch.Tensor):
            return True
        stack.extend(i for i in n.all_input_nodes if isinstance(meta_value(i), torch.Tensor))
    return False


def ancestors_within(node: fx.Node, scope: list[fx.Node]) -> set[fx.Node]:
    """The ancestors of `node` among the nodes of `scope`."""
    allowed, out, stack = set(scope), set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in allowed and n not in out:
            out.add(n)
            stack.extend(n.all_input_nodes)
    return out


def sym_equal(a: Any, b: Any) -> bool:
    """True only when a == b is provable (ints or SymInts with the same expression)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - unprovable comparisons are simply not equal here
        return False
