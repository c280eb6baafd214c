"""Calibration: from a model and calibration text to scale tables under bit budgets.

1. Run the model (fp32) over calibration windows, capturing per layer the post-RoPE queries,
   keys and values and the gradient of the next-token loss at each attention output
   (:mod:`turboquant_trt.calibration.collect`).
2. Transform tables per layer and KV head (:func:`calibration.stats.derive_tables`): key and
   value means over all positions but the first few (post-RoPE: the format stores post-RoPE
   keys, see docs/accuracy.md), key smoothing `s = sqrt(rms(k - μ) / rms(q))` per channel.
3. Sensitivity (:mod:`turboquant_trt.calibration.sensitivity`): for every layer, KV head, K or V,
   bit width (2, 3, 4, 8) and clip factor, the loss increase estimated from the change of that
   head's attention output, weighted by the captured gradient (Fisher). The best clip factor
   per bit width is kept. The one-byte scales of that head are rounded on their log grid with
   `E = floor(log2 max scale) - 11` (docs/format.md §3.1), the largest scale of the captured
   positions read from codes (all but the sinks) at that bit width and clip; the table keeps E
   of the chosen bits and clip. With a recent-token window `w` (docs/format.md §5.2) the `w` most
   recent keys/values of each query are exact in this estimate, as the format reads them;
   :func:`with_window` re-estimates for another window on the same capture.
4. Allocation: bit widths per layer/head/K/V minimizing the summed estimate under the average
   budget (every metadata byte counted, the window's fp16 ring included), by a Lagrangian sweep
   and a greedy fill (:func:`build_table`, one window for every layer), or, with the sensitivity
   estimated for several windows, each layer's window chosen together with the bit widths
   (:func:`build_table_per_layer_window`: an exact knapsack over the stored bytes).

SmolLM2-135M calibrates in 70-125 s on 2 CPU cores with 4 windows of 1024 tokens (forward and
backward about half of it, the sensitivity sweep the other half); sampling the calibration text
when no file is given adds about 2 minutes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .format import DEFAULT_REF_TOKENS, DEFAULT_SCALE_EXP, SUPPORTED_BITS, LayerFormat, ModelFormat
from .model_loading import ModelIdentity
from .scale_table import ScaleTable

CLIP_GRID = (0.85, 0.9, 1.0, 1.1, 1.2, 1.3)
CLIP_GRID_8 = (1.0,)  # 8-bit codes do not use the clip (absmax scale, docs/format.md §3.1, version 4)


class CalibrationError(ValueError):
    """A user-facing problem with calibration settings (impossible budget, no data)."""


@dataclass
class CalibrationResult:
    samples: list            # LayerSample per layer
    base_tables: list        # LayerTables per layer (clip 1)
    cost: dict               # (layer, head, "k"|"v", bits) -> estimated nats per token
    clip: dict               # same key -> best clip factor
    nll: float               # mean NLL of the calibration windows (fp)
    seconds: float
    recent: int = 0          # the recent-token window the costs were estimated with
    queries: int = 256
    sinks: int = 1           # the sink tokens the costs were estimated with
    scale_exp: dict = field(default_factory=dict)  # same key as clip -> E at the best clip


def generate_text(model, tokenizer, n: int, length: int, seed: int = 0, progress=None) -> torch.Tensor:
    """`n` sequences of `length` tokens sampled from the model (temperature 1, top-p 0.95),
    each started from the BOS token (or EOS if there is none): calibration text that no
    evaluation file contains."""
    from transformers import DynamicCache

    torch.manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise CalibrationError("the tokenizer has neither BOS nor EOS; pass --data")
    dev = next(model.parameters()).device
    ids = torch.full((n, 1), start, dtype=torch.long, device=dev)
    cache = DynamicCache(config=model.config)
    out = [ids]
    x = ids
    with torch.no_grad():
        for step in range(length - 1):
            logits = model(x, cache=cache, use_cache=True).logits[:, -1].float()
            probs = torch.softmax(logits, dim=-1)
            sp, si = torch.sort(probs, descending=True, dim=-1)
            cut = sp.cumsum(-1) - sp > 0.95
            sp = sp.masked_fill(cut, 0.0)
            nxt = si.gather(-1, torch.multinomial(sp, 1))
            out.append(nxt)
            x = nxt
            if progress is not None:
                progress(1)
    return torch.cat(out, dim=1).cpu()


def collect(model, windows: torch.Tensor, progress=None):
    """Forward/backward over calibration windows [N, T]; per-layer LayerSample list and NLL."""
    from .calibration.collect import Recorder, forward_backward
    from .calibration.stats import LayerSample

    rec = Recorder(keep_grads=True)
    qs, ks, vs, gs = {}, {}, {}, {}
    nlls = []
    for i in range(windows.shape[0]):
        nlls.append(forward_backward(model, windows[i:i + 1], rec))
        for li in rec.q:
            qs.setdefault(li, []).append(rec.q[li].float().cpu())
            ks.setdefault(li, []).append(rec.k[li].float().cpu())
            vs.setdefault(li, []).append(rec.v[li].float().cpu())
            gs.setdefault(li, []).append(rec.out[li].grad.transpose(1, 2).float().cpu())
        rec.clear()
        if progress is not None:
            progress(1)
    if not qs:
        raise CalibrationError("no attention layer was captured: unsupported model structure")
    scaling = 1.0 / math.sqrt(ks[0][0].shape[-1])
    attn0 = None
    for m in model.modules():
        if hasattr(m, "scaling") and hasattr(m, "layer_idx"):
            attn0 = m
            break
    if attn0 is not None:
        scaling = float(attn0.scaling)
    samples = [LayerSample(torch.cat(qs[li]), torch.cat(ks[li]), torch.cat(vs[li]),
                           torch.cat(gs[li]), scaling) for li in sorted(qs)]
    return samples, float(np.mean(nlls))


def sensitivity(samples, tables, *, sinks: int, recent: int, queries: int = 256,
                clip_grid=CLIP_GRID, bits=SUPPORTED_BITS, progress=None):
    from .calibration.sensitivity import (
        HeadQuantizer,
        choose_scale_exp,
        cost_k,
        cost_v,
        head_tensors,
    )

    cost, clip, exps = {}, {}, {}
    for li, (s, t) in enumerate(zip(samples, tables)):
        d = s.k.shape[-1]
        for h in range(s.kv_heads):
            ht = head_tensors(s, h, queries, seed=li * 131 + h, recent=recent)
            hk = HeadQuantizer(torch.from_numpy(t.k_mean[h]), torch.from_numpy(t.k_smooth[h]), li, d)
            hv = HeadQuantizer(torch.from_numpy(t.v_mean[h]), torch.from_numpy(t.v_smooth[h]), li, d)
            yk, yv = hk.transform(ht.k), hv.transform(ht.v)
            for b in bits:
                for which, hq, y, fn in (("k", hk, yk, cost_k), ("v", hv, yv, cost_v)):
                    grid = clip_grid if b < 8 else CLIP_GRID_8
                    # E of the one-byte scales from this head's captured scales at b and gm
                    es = {gm: choose_scale_exp(y, b, gm, sinks) for gm in grid}
                    cs = {gm: fn(ht, hq, b, gm, sinks, y=y, scale_exp=es[gm]) for gm in grid}
                    best = min(cs, key=cs.get)
                    cost[(li, h, which, b)] = cs[best]
                    clip[(li, h, which, b)] = best
                    exps[(li, h, which, b)] = es[best]
        if progress is not None:
            progress(1)
    return cost, clip, exps


def run_calibration(model, windows: torch.Tensor, *, sinks: int = 1, recent: int = 0,
                    queries: int = 256, progress_factory=None) -> CalibrationResult:
    """Steps 1-3 (everything but the allocation, which is per budget)."""
    from .calibration.stats import derive_tables

    t0 = time.time()
    pf = progress_factory or (lambda total, desc: _NullBar())
    with pf(windows.shape[0], "calibration forward/backward") as bar:
        samples, nll = collect(model, windows, bar.update)
    base = [derive_tables(s, li, skip_first=max(sinks, 1), smooth_v="none")
            for li, s in enumerate(samples)]
    with pf(len(samples), f"sensitivity per layer/head/bits (window {recent})") as bar:
        cost, clip, exps = sensitivity(samples, base, sinks=sinks, recent=recent,
                                       queries=queries, progress=bar.update)
    return CalibrationResult(samples, base, cost, clip, nll, time.time() - t0, recent, queries,
                             sinks, exps)


def with_window(res: CalibrationResult, recent: int, *, sinks: int = 1,
                progress_factory=None) -> CalibrationResult:
    """The same capture and transform tables, sensitivity re-estimated for another recent-token
    window (the capture, about half of calibration, is not repeated)."""
    if recent == res.recent:
        return res
    t0 = time.time()
    pf = progress_factory or (lambda total, desc: _NullBar())
    with pf(len(res.samples), f"sensitivity per layer/head/bits (window {recent})") as bar:
        cost, clip, exps = sensitivity(res.samples, res.base_tables, sinks=sinks, recent=recent,
                                       queries=res.queries, progress=bar.update)
    return CalibrationResult(res.samples, res.base_tables, cost, clip, res.nll,
                             time.time() - t0, recent, res.queries, sinks, exps)


class _NullBar:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, n=1):
        pass


def overhead_bits(num_layers: int, kv_heads: int, head_dim: int, sinks: int, recent: int,
                  ref_tokens: int = 1024) -> float:
    """Bits/element that do not depend on the code widths: one-byte scales, sinks, window ring,
    tables (with the scale exponents)."""
    lf = LayerFormat(head_dim, (2,) * kv_heads, (2,) * kv_heads, sink_tokens=sinks,
                     recent_tokens=recent)
    return lf.bits_per_element(ref_tokens) - 2.0


def allocate(cost: dict, items: list, code_budget: float, bits=SUPPORTED_BITS) -> dict:
    """Choose bits per item minimizing Σ cost with mean bits <= code_budget (all items equal
    size): Lagrangian sweep, then greedy upgrades by cost decrease per added bit."""
    n = len(items)
    if code_budget < min(bits) - 1e-9:
        raise CalibrationError(f"budget leaves {code_budget:.3f} bits per code; the minimum is "
                               f"{min(bits)}")

    def pick(lam):
        return {it: min(bits, key=lambda b: (cost[it + (b,)] + lam * b, b)) for it in items}

    lo, hi = 0.0, 1.0
    while sum(pick(hi).values()) > code_budget * n + 1e-9 and hi < 1e6:
        hi *= 4
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sum(pick(mid).values()) > code_budget * n + 1e-9:
            lo = mid
        else:
            hi = mid
    ch = pick(hi)
    used = sum(ch.values())
    while True:
        best = None
        for it in items:
            b = ch[it]
            for x in bits:
                if x > b and used - b + x <= code_budget * n + 1e-9:
                    gain = (cost[it + (b,)] - cost[it + (x,)]) / (x - b)
                    if best is None or gain > best[0]:
                        best = (gain, it, x)
        if best is None or best[0] <= 0:
            break
        used += best[2] - ch[best[1]]
        ch[best[1]] = best[2]
    return ch


def _exps(res: CalibrationResult, layer: int, which: str, bits: tuple) -> tuple[int, ...]:
    """The scale exponent E per KV head at the chosen bits (and the clip chosen with them);
    DEFAULT_SCALE_EXP for a result that carries none (a cost table built by hand)."""
    return tuple(int(res.scale_exp.get((layer, h, which, b), DEFAULT_SCALE_EXP))
                 for h, b in enumerate(bits))


def build_table(res: CalibrationResult, identity: ModelIdentity, budget: float, *, sinks: int,
                recent: int | None = None, calibration_info: dict) -> ScaleTable:
    """The scale table for one average-bits budget (every metadata byte counted), with the
    recent-token window the sensitivity of `res` was estimated for."""
    if recent is None:
        recent = res.recent
    if recent != res.recent:
        raise CalibrationError(f"the sensitivity was estimated with a {res.recent}-token window, "
                               f"not {recent}; use with_window() first")
    L = len(res.samples)
    H = res.samples[0].kv_heads
    d = res.samples[0].k.shape[-1]
    code = budget - overhead_bits(L, H, d, sinks, recent)
    if code < 2 - 1e-9:
        raise CalibrationError(
            f"--bits {budget} is below the smallest format: 2-bit codes plus one-byte scales, "
            f"{sinks} sink token(s), tables and the recent window need "
            f"{2 + overhead_bits(L, H, d, sinks, recent):.3f} bits/element")
    items = [(li, h, w) for li in range(L) for h in range(H) for w in ("k", "v")]
    ch = allocate(res.cost, items, min(code, 8.0))
    layers, tables = [], []
    for li in range(L):
        kb = tuple(ch[(li, h, "k")] for h in range(H))
        vb = tuple(ch[(li, h, "v")] for h in range(H))
        layers.append(LayerFormat(d, kb, vb, sink_tokens=sinks, recent_tokens=recent,
                                  k_scale_exp=_exps(res, li, "k", kb),
                                  v_scale_exp=_exps(res, li, "v", vb)))
        t = copy.deepcopy(res.base_tables[li])
        t.k_clip = np.array([res.clip[(li, h, "k", kb[h])] for h in range(H)], np.float32)
        t.v_clip = np.array([res.clip[(li, h, "v", vb[h])] for h in range(H)], np.float32)
        tables.append(t)
    est = sum(res.cost[it + (ch[it],)] for it in items)
    info = dict(calibration_info)
    info.update({"budget_bits": budget, "estimated_delta_nll": round(est, 6),
                 "estimated_delta_ppl_pct": round((math.exp(est) - 1) * 100, 3),
                 "sink_tokens": sinks, "recent_tokens": recent,
                 "method": "post-RoPE means, key smoothing sqrt(rms_k/rms_q), per-head clip and "
                           "bits by Fisher-weighted attention-output error"})
    return ScaleTable(identity, ModelFormat(tuple(layers)), tables, info)


def layer_bytes(head_dim: int, k_bits, v_bits, sinks: int, recent: int,
                ref_tokens: int = DEFAULT_REF_TOKENS) -> int:
    """Bytes one layer stores for one sequence of `ref_tokens` tokens, every byte of
    docs/format.md §6 counted (codes, scales, sink copies, the window ring, the tables)."""
    lf = LayerFormat(head_dim, tuple(k_bits), tuple(v_bits), sink_tokens=sinks,
                     recent_tokens=recent)
    x = lf.bytes_per_token(ref_tokens, tables=True) * ref_tokens
    n = int(round(x))
    if abs(x - n) > 1e-6 * max(1.0, x):
        raise CalibrationError(f"ref_tokens={ref_tokens} does not give whole bytes per layer")
    return n


@dataclass
class PerLayerAllocation:
    choice: list            # per layer: the index into `results` (its window and sinks)
    bits: dict              # (layer, head, "k"|"v") -> bits
    estimate: float         # summed estimated nats per token
    total_bytes: int        # stored bytes of all layers for one ref_tokens sequence
    budget_bytes: int       # the most the budget allows


def allocate_per_layer(results: list, num_layers: int, kv_heads: int, head_dim: int,
                       budget: float, ref_tokens: int = DEFAULT_REF_TOKENS,
                       bits=SUPPORTED_BITS) -> PerLayerAllocation:
    """Choose per layer one of `results` (sensitivities estimated with a recent-token window and
    a number of sinks) and per layer/KV head/K/V a bit width, minimizing the summed estimate
    such that the model's bits/element (docs/format.md §6: every byte, the ring and sinks of
    each layer's own choice included) is at most `budget`.

    The estimate of a head is measured with the other heads exact, so the costs of layers add
    whatever windows the other layers use. The minimum is exact: the stored bytes of every
    choice are whole multiples of their greatest common divisor, so a knapsack over those units
    (per layer: the best bit widths for each byte count, then across layers) finds it.
    """
    if not results:
        raise CalibrationError("no sensitivity estimate to allocate from")
    bits = tuple(sorted(bits))
    L, H, d = num_layers, kv_heads, head_dim
    lo = (bits[0],) * H
    fixed = [layer_bytes(d, lo, lo, r.sinks, r.recent, ref_tokens) for r in results]
    ref0 = layer_bytes(d, lo, lo, 0, 0, ref_tokens)
    inc = {b: layer_bytes(d, (b,) + lo[1:], lo, 0, 0, ref_tokens) - ref0 for b in bits}
    if any(layer_bytes(d, lo, (b,) + lo[1:], 0, 0, ref_tokens) - ref0 != inc[b] for b in bits):
        raise CalibrationError("K and V codes of one bit width differ in size")
    fmin = min(fixed)
    g = 0
    for x in [f - fmin for f in fixed] + list(inc.values()):
        g = math.gcd(g, x)
    g = g or 1
    # the budget in bytes; the small slack absorbs the decimal budget's binary rounding only
    budget_bytes = math.floor(budget * ref_tokens * L * H * 2 * d / 8 + 1e-6)
    cap = budget_bytes - L * fmin
    if cap < 0:
        need = 8 * L * fmin / (ref_tokens * L * H * 2 * d)
        raise CalibrationError(f"--bits {budget} is below the smallest format: {bits[0]}-bit "
                               f"codes with the smallest window and sinks need {need:.3f} "
                               f"bits/element")
    C = cap // g
    items = [(h, w) for h in range(H) for w in ("k", "v")]
    options = []  # per layer: Pareto list of (units, cost, result index, bits per item)
    for li in range(L):
        opts = []
        for ri, r in enumerate(results):
            base_u = (fixed[ri] - fmin) // g
            if base_u > C:
                continue
            best = {0: (0.0, ())}
            for h, w in items:
                nxt = {}
                for u, (c, ch) in best.items():
                    for b in bits:
                        u2 = u + inc[b] // g
                        if base_u + u2 > C:
                            continue
                        c2 = c + r.cost[(li, h, w, b)]
                        if u2 not in nxt or c2 < nxt[u2][0]:
                            nxt[u2] = (c2, ch + (b,))
                best = nxt
            opts += [(base_u + u, c, ri, ch) for u, (c, ch) in best.items()]
        opts.sort(key=lambda o: (o[0], o[1], o[2]))
        pareto = []
        for o in opts:
            if not pareto or o[1] < pareto[-1][1]:
                pareto.append(o)
        options.append(pareto)
    dp = np.zeros(C + 1)
    arg = np.full((L, C + 1), -1, np.int32)
    for li, opts in enumerate(options):
        new = np.full(C + 1, np.inf)
        for oi, (u, c, _, _) in enumerate(opts):
            cand = np.full(C + 1, np.inf)
            cand[u:] = dp[:C + 1 - u] + c
            better = cand < new
            new[better] = cand[better]
            arg[li, better] = oi
        dp = new
    if not np.isfinite(dp[C]):
        raise CalibrationError(f"--bits {budget} is below the smallest format of the given "
                               f"windows")
    cap_left = C
    choice, alloc, est, total = [0] * L, {}, 0.0, 0
    for li in reversed(range(L)):
        u, c, ri, ch = options[li][arg[li, cap_left]]
        cap_left -= u
        choice[li] = ri
        est += c
        for (h, w), b in zip(items, ch):
            alloc[(li, h, w)] = b
        kb = tuple(alloc[(li, h, "k")] for h in range(H))
        vb = tuple(alloc[(li, h, "v")] for h in range(H))
        total += layer_bytes(d, kb, vb, results[ri].sinks, results[ri].recent, ref_tokens)
    if total > budget_bytes:  # cannot happen: every option's units are exact
        raise AssertionError(f"allocation uses {total} bytes, budget {budget_bytes}")
    return PerLayerAllocation(choice, alloc, est, total, budget_bytes)


def build_table_per_layer_window(results: list, identity: ModelIdentity, budget: float, *,
                                 calibration_info: dict) -> ScaleTable:
    """The scale table for one budget with each layer's recent-token window (and sinks) chosen
    from `results` (the same capture, sensitivity estimated per window, e.g. by
    :func:`with_window`) together with the bit widths: :func:`allocate_per_layer`."""
    L = len(results[0].samples)
    H = results[0].samples[0].kv_heads
    d = results[0].samples[0].k.shape[-1]
    if any(len(r.samples) != L for r in results):
        raise CalibrationError("the sensitivity estimates come from different models")
    a = allocate_per_layer(results, L, H, d, budget)
    layers, tables = [], []
    for li in range(L):
        r = results[a.choice[li]]
        kb = tuple(a.bits[(li, h, "k")] for h in range(H))
        vb = tuple(a.bits[(li, h, "v")] for h in range(H))
        layers.append(LayerFormat(d, kb, vb, sink_tokens=r.sinks, recent_tokens=r.recent,
                                  k_scale_exp=_exps(r, li, "k", kb),
                                  v_scale_exp=_exps(r, li, "v", vb)))
        t = copy.deepcopy(r.base_tables[li])
        t.k_clip = np.array([r.clip[(li, h, "k", kb[h])] for h in range(H)], np.float32)
        t.v_clip = np.array([r.clip[(li, h, "v", vb[h])] for h in range(H)], np.float32)
        tables.append(t)
    windows = [lf.recent_tokens for lf in layers]
    info = dict(calibration_info)
    info.update({"budget_bits": budget, "estimated_delta_nll": round(a.estimate, 6),
                 "estimated_delta_ppl_pct": round((math.exp(a.estimate) - 1) * 100, 3),
                 "sink_tokens": (layers[0].sink_tokens
                                 if len({lf.sink_tokens for lf in layers}) == 1
                                 else [lf.sink_tokens for lf in layers]),
                 "recent_tokens": windows,
                 "window_choice": "per layer, jointly with the bits, from "
                                  f"{sorted({r.recent for r in results})}",
                 "method": "post-RoPE means, key smoothing sqrt(rms_k/rms_q), per-head clip, "
                           "bits and per-layer recent window by Fisher-weighted attention-output "
                           "error (exact knapsack over stored bytes)"})
    return ScaleTable(identity, ModelFormat(tuple(layers)), tables, info)
