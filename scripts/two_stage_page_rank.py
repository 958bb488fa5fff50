"""Page ranking for FASA's two-stage prefilter: the upper bound (lambda = 1) against centre + lambda * spread.
SmolLM2 8K jargon window (the middle of three), layers, 8 decode positions among the last 256, per KV head,
budget 2048, candidates = factor x budget (whole pages), sink 4 / recent 64 forced. Recall = attention mass of
(exact ∩ two-stage) / mass of exact (mass = the group's mean softmax over visible keys).

    python scripts/two_stage_page_rank.py 2 3        # candidate factors; records q/k to /tmp/rk/qk.pt once
"""
import math
import sys
import time
from pathlib import Path

import torch

import sparse_compile
from sparse_compile.attention_mask import SiteFacts
from sparse_compile.calibration.text import attention_implementation, recording_attention
from sparse_compile.evaluation.corpus import load_corpus, tokenize, windows
from sparse_compile.evaluation.models import load_model
from sparse_compile.methods import fasa

L = 8192
layers = [1, 3, 6, 9, 12, 15, 18, 21, 24, 27]
torch.manual_seed(0)
t0 = time.time()
try:
    qk = torch.load("/tmp/rk/qk.pt")  # noqa: S614 (our own file)
except FileNotFoundError:
    model, tok = load_model("smollm2")
    ids = tokenize(tok, load_corpus("jargon").text)
    _, window = windows(ids, L, 3)[1]
    qk = {}
    class Done(Exception):
        pass
    def rec(layer, q, k):
        if layer in layers:
            qk[layer] = (q[:, -256:].clone(), k.clone())
        if len(qk) == len(layers):
            raise Done
    with attention_implementation(model, "rk_rec", recording_attention(rec)):
        try:
            with torch.no_grad():
                model.model(window[None])
        except Done:
            pass
    Path("/tmp/rk").mkdir(exist_ok=True)
    torch.save(qk, "/tmp/rk/qk.pt")
print("recorded", time.time() - t0, flush=True)
params = sparse_compile.load_policy("fasa").decode.params
H, Hkv, D = 9, 3, 64
G = H // Hkv
P = 32
budget, sink, recent = 2048, 4, 64
lambdas = [1.0, 0.75, 0.5, 0.25, 0.0]
factors = [float(f) for f in sys.argv[1:]] or [2.0]
res = {}
for layer in layers:
    q_all, k = qk[layer]  # q (H, 256, D), k (Hkv, L, D)
    site = SiteFacts(layer=layer, rope="rotate_half", rotary_dim=D, head_dim=D, num_heads=H, num_kv_heads=Hkv)
    member = fasa.site_host_tables(params, site, H, Hkv, D)[1].float()  # (H, D)
    for pos_i in range(8):
        qi = 255 - 32 * pos_i
        t = L - 256 + qi  # query position: keys 0..t
        q = q_all[:, qi].double()  # (H, D)
        kk = k[:, : t + 1].double()  # (Hkv, n, D)
        n = t + 1
        qm = (q * member.double()).view(Hkv, G, D)
        score = torch.einsum("kgd,knd->kn", qm, kk)  # per KV head, group's partial scores summed
        forced = torch.zeros(n, dtype=torch.bool)
        forced[:sink] = True
        forced[n - recent:] = True
        s_exact = score.masked_fill(forced[None], float("inf"))
        exact = s_exact.topk(budget, dim=-1).indices  # (Hkv, budget)
        logits = torch.einsum("hd,hnd->hn", q, kk.repeat_interleave(G, 0)) / math.sqrt(D)
        probs = logits.softmax(-1).view(Hkv, G, n).mean(1)  # (Hkv, n)
        NP = -(-n // P)
        pad = NP * P - n
        kp = torch.nn.functional.pad(kk, (0, 0, 0, pad))
        valid = torch.nn.functional.pad(torch.ones(n, dtype=torch.bool), (0, pad)).view(NP, P)
        big = torch.finfo(torch.float64).max
        lo = kp.view(Hkv, NP, P, D).masked_fill(~valid[None, :, :, None], big).amin(2)
        hi = kp.view(Hkv, NP, P, D).masked_fill(~valid[None, :, :, None], -big).amax(2)
        centre, half = (lo + hi) / 2, (hi - lo) / 2
        qs = qm  # (Hkv, G, D)
        c_score = torch.einsum("kgd,kpd->kgp", qs, centre).sum(1)
        spread = torch.einsum("kgd,kpd->kgp", qs.abs(), half).sum(1)
        pf = torch.nn.functional.pad(forced, (0, pad)).view(NP, P).any(1)
        mass_exact = probs.gather(1, exact).sum(1)
        for f in factors:
            keep = max(1, min(NP, math.ceil(f * budget / P)))
            for lam in lambdas:
                rank = (c_score + lam * spread).masked_fill(pf[None], float("inf"))
                pages = rank.topk(keep, dim=-1).indices  # (Hkv, keep)
                cand = torch.zeros(Hkv, NP, dtype=torch.bool).scatter_(1, pages, True)
                cand_tok = cand.repeat_interleave(P, 1)[:, :n]
                s2 = s_exact.masked_fill(~cand_tok, float("-inf"))
                two = s2.topk(budget, dim=-1).indices
                in_exact = torch.zeros(Hkv, n, dtype=torch.bool).scatter_(1, exact, True)
                hit = in_exact & torch.zeros(Hkv, n, dtype=torch.bool).scatter_(1, two, True)
                rec_ = (probs * hit).sum(1) / mass_exact
                res.setdefault((f, lam), []).append(rec_)
    print("layer", layer, {k: round(float(torch.cat(v).mean()), 4) for k, v in res.items()}, flush=True)
print("final (factor, lambda): mean recall, min")
for k, v in res.items():
    v = torch.cat(v)
    print(k, round(float(v.mean()), 4), round(float(v.min()), 4))
