"""How many dependent block reductions the set top-k's threshold search takes (kernels/topk_select.py), replayed in
NumPy on the kernel's own order-preserving codes and exit rule: v2 searched between the row's smallest and largest
codes, v3 between its finite extremes when the k-th value is finite (KERNEL_NOTES.md "Set top-k v3").

    python scripts/topk_search_steps.py --draws 30

Rows: the tune sweep's randn rows, and rows shaped as the 128K generate makes them (4101 page bounds of close values
with +inf forced pages and an -inf unfilled one; 6272 candidate scores with 68 forced +inf and 32 invisible -inf).
Both searches are checked to select the same set.
"""

from __future__ import annotations

import argparse

import numpy as np

INT32_MAX = 2**31 - 1
PINF_CODE = 2139095040  # +inf's code; NaN codes above it
NINF_CODE = -2139095041  # -inf's code


def codes(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, np.float32).view(np.int32).astype(np.int64)
    code = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return np.where(np.isnan(x), INT32_MAX, code)


def search(cs: np.ndarray, k: int, lo: int, hi: int) -> tuple[int, int]:
    """(threshold code, steps) of the kernel's loop from the bracket [lo, hi]."""
    steps = 0
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        count = int((cs >= mid).sum())
        steps += 1
        if count >= k:
            lo = mid
        hi = mid if count == k else (hi if count >= k else mid - 1)
    return lo, steps


def v2(x: np.ndarray, k: int) -> tuple[int, int]:
    cs = codes(x)
    return search(cs, k, int(cs.min()), int(cs.max()))


def v3(x: np.ndarray, k: int) -> tuple[int, int]:
    cs, finite = codes(x), np.isfinite(x)
    n_top, n_neg = int((cs >= PINF_CODE).sum()), int((x == -np.inf).sum())
    if n_top >= k:
        return search(cs, k, PINF_CODE, int(cs.max()))
    if len(x) - n_neg >= k:
        return search(cs, k, int(cs[finite].min()), int(cs[finite].max()))
    return NINF_CODE, 0


def chosen(x: np.ndarray, k: int, t: int) -> np.ndarray:
    cs = codes(x)
    above = np.nonzero(cs > t)[0]
    return np.sort(np.concatenate([above, np.nonzero(cs == t)[0][: k - len(above)]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = [
        ("tune sweep's page row (randn, 4096, k 192)", 192, lambda: rng.normal(0, 1, 4096)),
        ("model-like page row (300 +- 6, 4 x +inf, 1 x -inf; 4101, k 196)", 196,
         lambda: np.concatenate([300 + rng.normal(0, 6, 4096), [np.inf] * 4, [-np.inf]])),
        ("model-like final row (N(0, 13), 68 x +inf, 32 x -inf; 6272, k 2048)", 2048,
         lambda: np.concatenate([rng.normal(0, 13, 6172), [np.inf] * 68, [-np.inf] * 32])),
    ]
    print("| row | v2 steps (mean / max) | v3 steps (mean / max) |\n|---|---|---|")
    for name, k, draw in rows:
        old, new = [], []
        for _ in range(args.draws):
            x = np.asarray(draw(), np.float32)
            (t2, s2), (t3, s3) = v2(x, k), v3(x, k)
            assert np.array_equal(chosen(x, k, t2), chosen(x, k, t3)), name
            old.append(s2)
            new.append(s3)
        print(f"| {name} | {np.mean(old):.1f} / {max(old)} | {np.mean(new):.1f} / {max(new)} |")


if __name__ == "__main__":
    main()
