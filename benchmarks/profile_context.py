#!/usr/bin/env python3
"""One context (prefill) attention call at a benchmark shape, for Nsight Compute (ncu) or
compute-sanitizer. The call writes the new tokens' K/V into the pool and attends them over the
quantized prefix and themselves (causal).

    ncu --kernel-name regex:attentionSplit --launch-skip 2 --launch-count 1 \\
        python3 benchmarks/profile_context.py --batch 1 --q-len 4096
"""

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@click.command()
@click.option("--batch", default=1, show_default=True)
@click.option("--prefix", default=0, show_default=True, help="already cached tokens per sequence")
@click.option("--q-len", default=4096, show_default=True, help="new tokens per sequence")
@click.option("--q-heads", default=32, show_default=True)
@click.option("--kv-heads", default=8, show_default=True)
@click.option("--head-dim", default=128, show_default=True)
@click.option("--bits", default=3, show_default=True)
@click.option("--tokens-per-block", default=64, show_default=True)
@click.option("--repeat", default=4, show_default=True)
def main(batch, prefix, q_len, q_heads, kv_heads, head_dim, bits, tokens_per_block, repeat):

    import torch

    from turboquant_trt import kernels as K
    from turboquant_trt.cli_bench import random_cache
    from turboquant_trt.format import LayerFormat

    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    fmt = LayerFormat(head_dim, (bits,) * kv_heads, (bits,) * kv_heads)
    total = prefix + q_len
    lay, bt = random_cache(fmt, batch, total, tokens_per_block, gen)
    rows = batch * q_len
    q = torch.randn((rows, q_heads, head_dim), dtype=torch.float16, device="cuda", generator=gen)
    k = torch.randn((rows, kv_heads, head_dim), dtype=torch.float16, device="cuda", generator=gen)
    v = torch.randn((rows, kv_heads, head_dim), dtype=torch.float16, device="cuda", generator=gen)
    ql = torch.full((batch,), q_len, dtype=torch.int32, device="cuda")
    sl = torch.full((batch,), total, dtype=torch.int32, device="cuda")
    slot = torch.arange(batch, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    for _ in range(repeat):
        K.context_attention(lay, q, k, v, bt, ql, sl, q_len, total, seq_slot=slot, out=out)
    torch.cuda.synchronize()
    print("ok", float(out.float().abs().mean()))


if __name__ == "__main__":
    main()
