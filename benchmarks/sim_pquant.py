#!/usr/bin/env python3
"""Numpy model of the decode kernel's probability quantization, to size its error without a GPU.

decodeSplitKernel (plugin_src/kernels/decode_kernel.cuh) multiplies each key's softmax weight
p = 2^(s - m) (m: the split's running maximum, moved only when a tile's best score exceeds it by 3)
by the key's V scale and rounds the product to a 16-bit integer p' against a bound; O accumulates
p' * code exactly in int32 and is folded into fp32 whenever the bound or m moves. This script
replays that arithmetic per tile of 32 keys on random scores (normal, sigma in log2 units) and
3-bit codes, and compares with the exact weighted sum, for two bounds:
- 'grow': the kernel up to 2026-11-28 (451d9ec): 8x the largest V scale seen so far (x1.25), only
  growing; it loses resolution over long splits with diffuse attention;
- `--shrink F`: the kernel since 543662c (F = 64): per head, 1.25x (`--headroom`) the largest
  p * v_scale of the tile that set it, set again when a tile exceeds it or falls F times below it.
Only the probability quantization is modelled (scores, scales and codes are exact).

    python benchmarks/sim_pquant.py [--sigma 1 2 4 6.5] [--keys 32768] [--split 1376 128] [--shrink 16 64]
        [--headroom 1.25 2]
"""
import argparse

import numpy as np

E3 = np.array([-127, -79, -45, -14, 14, 45, 79, 127], float)  # 3-bit int8 codebook (format v2)
SLACK = 3.0
PMAX = 65535.0


def simulate(scores, vs, codes, split_len, shrink=None, tile=32, headroom=1.25):
    """Returns (kernel-model output, exact output, folds per tile), outputs in code units."""
    parts, folds, tiles = [], 0, 0
    for s0 in range(0, len(scores), split_len):
        s, v, e = scores[s0:s0 + split_len], vs[s0:s0 + split_len], codes[s0:s0 + split_len]
        m, l, bound, pf = -np.inf, 0.0, 0.0, 0.0
        o_f = np.zeros(e.shape[1])
        acc = np.zeros(e.shape[1])
        for t0 in range(0, len(s), tile):
            st, vt, et = s[t0:t0 + tile], v[t0:t0 + tile], e[t0:t0 + tile]
            tiles += 1
            fold = False
            gm = st.max()
            if gm > m + SLACK:
                fold = True
            if fold:  # fold int32 -> fp32, then rescale to the new maximum
                o_f += acc / pf if pf > 0 else 0.0
                acc[:] = 0
                alpha = 2.0 ** (m - gm) if np.isfinite(m) else 0.0
                o_f *= alpha
                l *= alpha
                m = gm
                folds += 1
            p = 2.0 ** (st - m)
            if shrink is None:
                new = vt.max() * 8 > bound
                nb = vt.max() * 1.25 * 2.0 ** SLACK
            else:
                pv = (p * vt).max()
                new = pv > bound or pv < bound / shrink
                nb = pv * headroom
            if new:
                o_f += acc / pf if pf > 0 else 0.0
                acc[:] = 0
                bound, pf = nb, PMAX / nb
                folds += 1
            l += p.sum()
            acc += np.minimum(np.rint(p * vt * pf), PMAX) @ et
        o_f += acc / pf if pf > 0 else 0.0
        parts.append((m, l, o_f))
    top = max(q[0] for q in parts)
    num = sum(2.0 ** (q[0] - top) * q[2] for q in parts)
    den = sum(2.0 ** (q[0] - top) * q[1] for q in parts)
    pe = 2.0 ** (scores - scores.max())
    return num / den, (pe * vs) @ codes / pe.sum(), folds / tiles


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sigma", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.5],
                    help="standard deviation of the scores in log2 units")
    ap.add_argument("--keys", type=int, default=32768)
    ap.add_argument("--split", type=int, nargs="+", default=[1376, 128], help="keys per split")
    ap.add_argument("--shrink", type=float, nargs="*", default=[16.0, 64.0])
    ap.add_argument("--headroom", type=float, nargs="+", default=[1.25],
                    help="a new bound is the tile's largest p * v_scale times this")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    modes = [None] + [(f, h) for f in a.shrink for h in a.headroom]
    print("relative error (mean of trials) and folds per tile; 'shrink 64x' = the kernel today")
    for sigma in a.sigma:
        for split in a.split:
            res = {mode: [] for mode in modes}
            for _ in range(a.trials):
                scores = rng.normal(0.0, sigma, a.keys)
                vs = np.abs(rng.normal(1.0, 0.3, a.keys)) + 0.05
                codes = E3[rng.integers(0, 8, (a.keys, a.head_dim))]
                for mode in modes:
                    o, ex, f = (simulate(scores, vs, codes, split) if mode is None
                                else simulate(scores, vs, codes, split, shrink=mode[0], headroom=mode[1]))
                    res[mode].append((np.linalg.norm(o - ex) / np.linalg.norm(ex), f))
            cells = [f"{'grow' if mode is None else f'shrink {mode[0]:g}x h{mode[1]:g}'}: "
                     f"{np.mean([r[0] for r in res[mode]]):.1e} ({np.mean([r[1] for r in res[mode]]):.2f})"
                     for mode in modes]
            print(f"sigma {sigma:>4g}  split {split:>5d}:  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
