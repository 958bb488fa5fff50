"""Sets of layer indices as policies name them: ints and "a-b" ranges (`[0, 3, "5-7"]`).

    parse_layers(value, where, key)  a policy value -> LayerSet (PolicyError naming where/key otherwise)
    LayerSet                         sorted merged inclusive ranges; `layer in s` is a binary search
    layer_list(value, key, where)    a validated list in canonical form, as a tuple (for frozen params)
    in_layers(layer, layers)         membership of a canonical tuple (memoised parse)
"""

from __future__ import annotations

import bisect
import functools
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sparse_compile.params import PolicyError, show

MAX_LAYER = 100_000  # largest layer index a policy may name (no model has more layers)
LAYER_RANGE = re.compile(r"[ \t]*([0-9]+)[ \t]*(?:-[ \t]*([0-9]+)[ \t]*)?")  # "a-b" or "a", ASCII digits


@dataclass(frozen=True)
class LayerSet:
    """A set of layer indices held as sorted, merged, inclusive (lo, hi) ranges: never materialised.

    `layer in layers` is a binary search; `to_list()` is the canonical form (ints and "a-b").
    """

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]]) -> LayerSet:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if lo > hi:
                raise ValueError(f"empty layer range ({lo}, {hi})")
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return cls(tuple(merged))

    @classmethod
    def of(cls, layers: Iterable[int]) -> LayerSet:
        """From individual layer indices (e.g. a set of ints)."""
        return cls.from_ranges((i, i) for i in layers)

    def __contains__(self, layer: object) -> bool:
        try:
            index = operator.index(layer)  # type: ignore[arg-type]
        except TypeError:
            return False
        i = bisect.bisect_right(self.ranges, (index, float("inf"))) - 1
        return i >= 0 and self.ranges[i][0] <= index <= self.ranges[i][1]

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def to_list(self) -> list[int | str]:
        """[0, "2-5", 9]: single layers as ints, runs as "a-b" strings, sorted and merged."""
        return [lo if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges]

    def __repr__(self) -> str:
        return f"LayerSet({self.to_list()!r})"



def layer_index(text: str) -> int:
    """A run of ASCII digits as an int, without converting absurdly long runs."""
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(MAX_LAYER)) else MAX_LAYER + 1


def parse_layers(value: Any, where: str, key: str = "layers", allow_empty: bool = False) -> LayerSet:
    """[0, 3, "5-7"] -> LayerSet ranges ((0, 0), (3, 3), (5, 7)); indices in [0, MAX_LAYER].

    key: the key named in errors; allow_empty: accept [] (an empty set)."""
    allowed = f"allowed: ints in [0, {MAX_LAYER}] and 'a-b' ranges with 0 <= a <= b <= {MAX_LAYER}"
    if not isinstance(value, list) or not (value or allow_empty):
        raise PolicyError(f"{where}: key '{key}' must be a non-empty list, got {show(value)}; {allowed}")
    ranges: list[tuple[int, int]] = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item <= MAX_LAYER:
                raise PolicyError(f"{where}: key '{key}': layer {show(item)} is out of range; {allowed}")
            ranges.append((item, item))
            continue
        match = LAYER_RANGE.fullmatch(item) if isinstance(item, str) else None
        if match is None:
            raise PolicyError(f"{where}: key '{key}': entry {show(item)} is not a layer or an 'a-b' range; {allowed}")
        lo = layer_index(match[1])
        hi = lo if match[2] is None else layer_index(match[2])
        if hi > MAX_LAYER:
            raise PolicyError(f"{where}: key '{key}': layer range {show(item)} is out of range; {allowed}")
        if lo > hi:
            raise PolicyError(f"{where}: key '{key}': layer range {show(item)} is empty (a > b); {allowed}")
        ranges.append((lo, hi))
    return LayerSet.from_ranges(ranges)


def layer_list(value: Any, key: str, where: str) -> tuple[int | str, ...]:
    """A validated layer list ([2, "5-7"], empty allowed) in canonical form, as a tuple (hashable, frozen)."""
    return tuple(parse_layers(list(value) if isinstance(value, tuple) else value, where, key,
                              allow_empty=True).to_list())


@functools.lru_cache(maxsize=1024)
def layer_set(layers: tuple[int | str, ...]) -> LayerSet:
    """The LayerSet of a canonical layer tuple (memoised: methods ask at every call)."""
    return parse_layers(list(layers), "layers", allow_empty=True)


def in_layers(layer: int, layers: tuple[int | str, ...]) -> bool:
    """Whether `layer` is in a canonical layer tuple (from `layer_list`)."""
    return layer in layer_set(tuple(layers))
