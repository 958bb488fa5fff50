"""GPU check of kernels/sparse_decode.py (CUDA, not the interpreter): random problems against the float64
masked reference, and the non-finite contract (one NaN/+inf/-inf element in a counted or a masked key).

    python scripts/check_sparse_decode_gpu.py        # prints one line per case, exits 1 on a failure
"""

from __future__ import annotations

import sys

import torch

from sparse_compile.attention_mask import AttentionMask, SiteFacts, exact_attention_reference
from sparse_compile.kernels.sparse_decode import sparse_decode_attention
from sparse_compile.methods import dense

TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def main() -> int:
    failures = 0
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in (64, 80, 96, 128, 192, 256):
            for B, H, Hkv, L in ((1, 32, 8, 5000), (3, 8, 8, 777), (2, 12, 4, 4096)):
                q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype, generator=g)
                k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype, generator=g)
                v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype, generator=g)
                kv = torch.rand(B, L, device="cuda", generator=g) > 0.2
                kv[-1, : L // 3] = False  # left padding of the last row
                masks = (AttentionMask(True, L - 1, 0, kv), AttentionMask(True, L - 40, 0, None),
                         AttentionMask(True, L - 1, 300, kv))
                for mask in masks:
                    vis = dense.decode_key_mask(mask, B, L, q.device).reshape(B, L)
                    ref = exact_attention_reference(q.double(), k.double(), v.double(), mask, 0.1)
                    out, _ = dense.attention(q, k, v, mask, SiteFacts(), dense.Params(), 0.1)
                    err = float((out.double() - ref).abs().max())
                    ok = err <= TOL[dtype] * 4
                    # poison: masked keys everywhere, then one element of one visible key per batch row
                    kk, vv = k.clone(), v.clone()
                    kk[~vis[:, None, :].expand_as(kk[..., 0])] = float("nan")
                    vv[~vis[:, None, :].expand_as(vv[..., 0])] = float("inf")
                    out2, _ = dense.attention(q, kk, vv, mask, SiteFacts(), dense.Params(), 0.1)
                    ok &= torch.equal(out2, out)
                    for value, where in ((float("nan"), "k"), (-float("inf"), "k"), (float("inf"), "v"),
                                         (float("nan"), "v")):
                        j = int(vis[0].nonzero()[-1])  # the last visible key of row 0
                        t = (kk if where == "k" else vv).clone()
                        t[0, 0, j, D // 2] = value
                        out3, _ = dense.attention(q, t if where == "k" else kk, t if where == "v" else vv, mask,
                                                  SiteFacts(), dense.Params(), 0.1)
                        group = H // Hkv
                        ok &= bool(torch.isnan(out3[0, :group]).all())  # the heads of KV head 0
                        ok &= torch.equal(out3[0, group:], out[0, group:]) and torch.equal(out3[1:], out[1:])
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {str(dtype)[6:]:8s} D={D:3d} B={B} H={H} Hkv={Hkv} L={L} "
                          f"offset={mask.q_offset} window={mask.window} key_valid={mask.key_valid is not None} "
                          f"max|err| {err:.1e}", flush=True)
    # the method-facing kernel with index lists (FASA / LessIsMore): NaN in listed vs unlisted keys
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(2, 32, 1, 128, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(2, 8, 8192, 128, device="cuda", dtype=dtype, generator=g)
        v = torch.randn_like(k)
        idx = torch.randperm(8192, device="cuda", generator=g)[:2048].view(1, 1, -1).expand(2, 8, -1).contiguous()
        base = sparse_decode_attention(q, k, v, idx)
        unlisted = torch.ones(8192, dtype=torch.bool, device="cuda")
        unlisted[idx[0, 0].long()] = False
        v2 = v.clone()
        v2[:, :, unlisted] = float("nan")
        ok = torch.equal(sparse_decode_attention(q, k, v2, idx), base)
        v2[1, 3, int(idx[1, 3, 100]), 5] = float("inf")
        out = sparse_decode_attention(q, k, v2, idx)
        ok &= bool(torch.isnan(out[1, 12:16]).all()) and torch.equal(out[0], base[0])
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} index lists {dtype}: unlisted NaN ignored, listed inf poisons its group")
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
