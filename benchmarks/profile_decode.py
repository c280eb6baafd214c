#!/usr/bin/env python3
"""One decode step at a benchmark shape, for Nsight Compute (ncu) or compute-sanitizer.

    ncu --kernel-name regex:attentionSplit --launch-skip 3 --launch-count 1 \
        python3 benchmarks/profile_decode.py --batch 8 --seq-len 32768
"""

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@click.command()
@click.option("--batch", default=8, show_default=True)
@click.option("--seq-len", default=32768, show_default=True)
@click.option("--q-heads", default=32, show_default=True)
@click.option("--kv-heads", default=8, show_default=True)
@click.option("--head-dim", default=128, show_default=True)
@click.option("--bits", default=3, show_default=True)
@click.option("--tokens-per-block", default=64, show_default=True)
@click.option("--repeat", default=5, show_default=True)
def main(batch, seq_len, q_heads, kv_heads, head_dim, bits, tokens_per_block, repeat):

    import torch

    from turboquant_trt import kernels as K
    from turboquant_trt.cli_bench import random_cache
    from turboquant_trt.format import LayerFormat

    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234)
    fmt = LayerFormat(head_dim, (bits,) * kv_heads, (bits,) * kv_heads)
    lay, bt = random_cache(fmt, batch, seq_len, tokens_per_block, gen)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    slot = torch.arange(batch, dtype=torch.int32, device="cuda")
    q = torch.randn((batch, q_heads, head_dim), dtype=torch.float16, device="cuda", generator=gen)
    out = torch.empty_like(q)
    for _ in range(repeat):
        K.decode_attention(lay, q, bt, lens, seq_len, seq_slot=slot, out=out)
    torch.cuda.synchronize()
    print("ok", float(out.float().abs().mean()))


if __name__ == "__main__":
    main()
