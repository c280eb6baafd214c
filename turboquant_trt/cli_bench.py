"""`turboquant bench kernels`: our decode attention vs torch fp16 SDPA, timed in one process.

Also used by benchmarks/bench_decode.py. Needs a CUDA GPU, torch and the built libturboquant.so.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import click

from .provenance import source_commit

READ_BW_BYTES = 2 << 30  # the tensor the read-bandwidth probe reduces: 40x the H100's/H200's L2

# (name, batch, seq_len, q heads, kv heads, head_dim)
DEFAULT_SHAPES = [
    ("B8-L32K", 8, 32768, 32, 8, 128),
    ("B1-L128K", 1, 131072, 32, 8, 128),
    ("B32-L8K", 32, 8192, 32, 8, 128),
    ("SmolLM2-B16-L8K", 16, 8192, 9, 3, 64),
    ("GQA8-B8-L32K", 8, 32768, 64, 8, 128),  # Llama-70B-class heads: 8 query heads per KV head
]


@dataclass
class Row:
    shape: str
    batch: int
    seq_len: int
    q_heads: int
    kv_heads: int
    head_dim: int
    bits: str
    tokens_per_block: int
    splits: int
    ours_ms: float
    ours_spread_ms: float
    sdpa_ms: float
    speedup: float
    bytes_read: int
    ours_tbps: float
    frac_hbm: float
    sdpa_tbps: float
    write_ms: float
    write_frac: float
    step_ms: float          # the write kernel then decode attention (the write kernel zeroes the counters)
    write_in_step_ms: float  # step_ms - ours_ms: what the write kernel adds to the step
    fused_ms: float = 0.0    # the plugin's decode step: a decode that writes the new tokens itself
    write_in_fused_ms: float = 0.0  # fused_ms - ours_ms: what writing the new tokens adds to decode


def _time(fn, iters: int, warmup: int = 3, per_graph: int = 20) -> tuple[float, float]:
    """Median and (p90 - p10) in ms of one call, from CUDA-event times of graph replays.

    ``per_graph`` consecutive calls are captured in one CUDA graph, so host overhead (Python,
    ctypes) is not timed; each replay's time is divided by ``per_graph``.
    """
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(5, iters // 4)):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / per_graph)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))] - times[int(0.1 * (len(times) - 1))]


def _random_pool(layer, fmt, t, num_blocks, gen):
    """Random codes and random one-byte scales between 0.05 and 0.25 in every block."""
    import numpy as np
    import torch

    from .reference import scale8_encode
    layer.pool.random_(0, 256, generator=gen)
    lay = fmt.block_layout(t)
    for h in range(fmt.kv_heads):
        for off, e in ((lay.k_meta[h], fmt.k_scale_exp[h]), (lay.v_meta[h], fmt.v_scale_exp[h])):
            lo, hi = (int(k) for k in scale8_encode(np.array([0.05, 0.25], np.float32), e))
            layer.pool[:, off:off + t] = torch.randint(lo, hi + 1, (num_blocks, t), generator=gen,
                                                       device=layer.pool.device, dtype=torch.uint8)


def random_cache(fmt, batch, seq_len, t, gen, device="cuda"):
    """A pool of ``batch`` sequences of ``seq_len`` positions with random codes and scales
    (``_random_pool``), and its block table [batch, ceil(seq_len / t)] int32: a random permutation of
    the blocks, so that no sequence's blocks are contiguous."""
    import torch

    from . import kernels as K
    bps = math.ceil(seq_len / t)
    lay = K.KernelLayer.allocate(fmt, batch * bps, t, batch, device=device)
    _random_pool(lay, fmt, t, batch * bps, gen)
    bt = torch.randperm(batch * bps, device=device, generator=gen).to(torch.int32).reshape(batch, bps)
    return lay, bt


def measure_read_bw(iters: int = 50) -> float:
    """The card's HBM read bandwidth in bytes/s, measured in this process: the best of two torch
    reductions (sum and max) over a 2 GiB fp16 tensor, which read every byte once and write almost
    nothing. ``run_all`` takes the decode kernel's fraction of the larger of this and fp16 SDPA's
    read rate in the same run."""
    import torch
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    x = torch.randn((READ_BW_BYTES // 2,), dtype=torch.float16, device="cuda", generator=gen)
    best = min(_time(lambda: torch.sum(x, dtype=torch.float32), iters, per_graph=5)[0],
               _time(lambda: torch.amax(x), iters, per_graph=5)[0])
    del x
    torch.cuda.empty_cache()
    return READ_BW_BYTES / (best * 1e-3)


def bench_shape(name, b, L, hq, h, d, k_bits=3, v_bits=3, t=64, iters=50, l2_bytes=50 << 20, recent=0, sinks=0,
                finish="counters"):
    import torch
    import torch.nn.functional as F

    from . import kernels as K
    from .format import LayerFormat

    dev = "cuda"
    gen = torch.Generator(device=dev)
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    fmt = LayerFormat(d, (k_bits,) * h, (v_bits,) * h, sink_tokens=sinks, recent_tokens=recent)
    blocks_per_seq = math.ceil(L / t)
    num_blocks = b * blocks_per_seq
    per_token_head = fmt.head_bytes(0)
    pool_bytes = num_blocks * fmt.block_layout(t).block_bytes
    # enough copies that consecutive calls never find their cache in L2
    copies = max(1, math.ceil(4 * l2_bytes / pool_bytes))
    layers, tables = [], []
    for _ in range(copies):
        lay, bt = random_cache(fmt, b, L, t, gen, dev)
        lay.recent_pool.normal_(0.0, 0.5, generator=gen)  # finite fp16 window values (unused if w = 0)
        lay.sink_pool.normal_(0.0, 0.5, generator=gen)  # and sink rows (unused without sinks)
        layers.append(lay)
        tables.append(bt)
    lens = torch.full((b,), L, dtype=torch.int32, device=dev)
    slot = torch.arange(b, dtype=torch.int32, device=dev)
    q = torch.randn((b, hq, d), dtype=torch.float16, device=dev, generator=gen)
    out = torch.empty_like(q)
    state = {"i": 0}

    # the decode's finish counters; the write + decode step below has the write kernel zero them, as
    # the plugin's decode step did before the decode wrote the new tokens itself (finish="kernel":
    # no counters, the reduce kernel; the write then zeroes nothing)
    counters = None
    if finish == "counters":
        counters = torch.zeros(K.library().tq_decode_finish_counters(b, hq, h), dtype=torch.int32, device=dev)

    def ours():
        i = state["i"] = (state["i"] + 1) % copies
        K.decode_attention(layers[i], q, tables[i], lens, L, seq_slot=slot, out=out, finish=finish,
                           finish_counters=counters)

    ours_ms, spread = _time(ours, iters)
    splits = K.library().tq_decode_num_splits(b, hq, h, d, L, 0)

    # write kernel: one new token per sequence (decode step)
    kn = torch.randn((b, h, d), dtype=torch.float16, device=dev, generator=gen)
    vn = torch.randn((b, h, d), dtype=torch.float16, device=dev, generator=gen)

    def write():
        K.quantize_kv(layers[0], kn, vn, tables[0], lens, seq_slot=slot, zero_words=counters)

    write_ms, _ = _time(write, iters)

    # a decode step as the plugin runs it: the write kernel, then decode attention behind it on the
    # stream (on sm_90+ decode is a programmatic dependent launch that the write kernel lets start
    # early); what the write adds to the step is step_ms - ours_ms
    def step():
        i = state["i"] = (state["i"] + 1) % copies
        K.quantize_kv(layers[i], kn, vn, tables[i], lens, seq_slot=slot, zero_words=counters)
        K.decode_attention(layers[i], q, tables[i], lens, L, seq_slot=slot, out=out, finish=finish,
                           finish_counters=counters)

    step_ms, _ = _time(step, iters)

    # a decode step as the plugin runs it: one decode that writes the new tokens itself (its finish
    # counters are the plugin's own, left at 0 by the call before, as these are)
    def fused():
        i = state["i"] = (state["i"] + 1) % copies
        K.decode_attention(layers[i], q, tables[i], lens, L, seq_slot=slot, out=out, finish=finish,
                           finish_counters=counters, k=kn, v=vn)

    fused_ms, _ = _time(fused, iters)
    del layers, tables
    torch.cuda.empty_cache()

    # fp16 SDPA baseline, same shapes, same process
    kv_bytes = 2 * b * h * L * d * 2
    bcopies = max(1, math.ceil(4 * l2_bytes / kv_bytes))
    kvs = [(torch.randn((b, h, L, d), dtype=torch.float16, device=dev, generator=gen),
            torch.randn((b, h, L, d), dtype=torch.float16, device=dev, generator=gen)) for _ in range(bcopies)]
    q4 = q.reshape(b, hq, 1, d)

    def sdpa():
        i = state["i"] = (state["i"] + 1) % bcopies
        k, v = kvs[i]
        F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)

    sdpa_ms, _ = _time(sdpa, iters)
    del kvs
    torch.cuda.empty_cache()
    # codes + scales of every position (window and sink positions' codes are not read; counted
    # anyway, a conservative figure), the fp16 window ring and sink rows, q and out
    bytes_read = (b * L * h * per_token_head + b * h * 2 * (min(recent, L) + min(sinks, L)) * d * 2
                  + 2 * q.numel() * 2)
    label = f"k{k_bits}v{v_bits}" + (f"s{sinks}" if sinks else "") + (f"w{recent}" if recent else "")
    return Row(name, b, L, hq, h, d, label, t, splits, ours_ms, spread, sdpa_ms,
               sdpa_ms / ours_ms, bytes_read, bytes_read / ours_ms / 1e6,
               0.0,  # frac_hbm: set by run_all, which needs every shape's SDPA rate first
               kv_bytes / sdpa_ms / 1e6, write_ms, write_ms / ours_ms, step_ms, step_ms - ours_ms,
               fused_ms, fused_ms - ours_ms)


def bench_context(b, prefix, q_len, hq, h, d, t=64, iters=20):
    """Chunked prefill: q_len new tokens over a quantized prefix, vs fp16 SDPA (causal over the whole)."""
    import torch
    import torch.nn.functional as F

    from . import kernels as K
    from .format import LayerFormat

    dev = "cuda"
    gen = torch.Generator(device=dev)
    gen.manual_seed(int.from_bytes(os.urandom(4), "little"))
    fmt = LayerFormat(d, (3,) * h, (3,) * h)
    L = prefix + q_len
    lay, bt = random_cache(fmt, b, L, t, gen, dev)
    q = torch.randn((b * q_len, hq, d), dtype=torch.float16, device=dev, generator=gen)
    k = torch.randn((b * q_len, h, d), dtype=torch.float16, device=dev, generator=gen)
    v = torch.randn((b * q_len, h, d), dtype=torch.float16, device=dev, generator=gen)
    ql = torch.full((b,), q_len, dtype=torch.int32, device=dev)
    sl = torch.full((b,), L, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    slot = torch.arange(b, dtype=torch.int32, device=dev)

    def ours():
        K.context_attention(lay, q, k, v, bt, ql, sl, q_len, L, seq_slot=slot, out=out)

    ours_ms, _ = _time(ours, iters, warmup=3)
    kf = torch.randn((b, h, L, d), dtype=torch.float16, device=dev, generator=gen)
    vf = torch.randn((b, h, L, d), dtype=torch.float16, device=dev, generator=gen)
    q4 = q.reshape(b, q_len, hq, d).transpose(1, 2)
    mask = None
    if prefix:
        mask = torch.ones((q_len, L), dtype=torch.bool, device=dev).tril(diagonal=prefix)

    def sdpa():
        F.scaled_dot_product_attention(q4, kf, vf, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    sdpa_ms, _ = _time(sdpa, iters, warmup=3)
    return {"batch": b, "prefix": prefix, "q_len": q_len, "q_heads": hq, "kv_heads": h, "head_dim": d,
            "ours_ms": ours_ms, "sdpa_ms": sdpa_ms, "ratio_sdpa_over_ours": sdpa_ms / ours_ms}


def select_shapes(names):
    """The DEFAULT_SHAPES named in `names`, in their table order (each once); all of them when empty."""
    return [s for s in DEFAULT_SHAPES if s[0] in set(names)] if names else list(DEFAULT_SHAPES)


def run_all(shapes=None, iters=50, tokens_per_block=64, context=True, out_json=None, recent=0, read_bw=None,
            sinks=0, finish="counters"):
    import torch
    measured = read_bw is None
    probe = measure_read_bw() if measured else read_bw
    print(f"{torch.cuda.get_device_name()}: read bandwidth {probe / 1e12:.2f} TB/s "
          f"({'measured: torch sum/max over 2 GiB' if measured else 'given with --read-bw'})", flush=True)
    rows = []
    for spec in shapes or DEFAULT_SHAPES:
        rows.append(bench_shape(*spec, t=tokens_per_block, iters=iters, recent=recent, sinks=sinks, finish=finish))
        r = rows[-1]
        print(f"{r.shape:18s} ours {r.ours_ms:8.4f} ms  sdpa {r.sdpa_ms:8.4f} ms  x{r.speedup:5.2f}  "
              f"{r.ours_tbps:6.0f} GB/s (sdpa {r.sdpa_tbps:6.0f})  write {r.write_ms * 1000:6.1f} us "
              f"({100 * r.write_frac:4.1f}%), in a step +{r.write_in_step_ms * 1000:4.1f} us  fused step {r.fused_ms:8.4f} ms "
              f"(+{r.write_in_fused_ms * 1000:4.1f} us)  splits {r.splits}",
              flush=True)
    # a measured reference is the fastest read seen in this run: the probe or fp16 SDPA on a shape
    ref = max([probe] + [r.sdpa_tbps * 1e9 for r in rows]) if measured else probe
    for r in rows:
        r.frac_hbm = r.ours_tbps * 1e9 / ref
    ctx = []
    if context:
        for spec in [(1, 0, 4096, 32, 8, 128), (1, 8192, 512, 32, 8, 128), (4, 0, 2048, 9, 3, 64)]:
            c = bench_context(*spec)
            ctx.append(c)
            print(f"context B={c['batch']} prefix={c['prefix']} q_len={c['q_len']} Hq={c['q_heads']} d={c['head_dim']}: "
                  f"ours {c['ours_ms']:.3f} ms  sdpa {c['sdpa_ms']:.3f} ms", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": source_commit(), "torch": torch.__version__, "tokens_per_block": tokens_per_block,
            "recent_tokens": recent, "sink_tokens": sinks, "decode_finish": finish, "read_bw_probe_bytes_per_s": probe, "read_bw_bytes_per_s": ref,
            "read_bw_measured": measured}
    result = {"meta": meta, "decode": [asdict(r) for r in rows], "context": ctx}
    print()
    print(f"{meta['device']}  {meta['date']}  commit {meta['commit']}")
    print(f"%BW: of {ref / 1e12:.2f} TB/s, " + ("the fastest read in this run (the 2 GiB probe or fp16 SDPA)"
                                               if measured else "given with --read-bw"))
    print("write%: the write kernel alone (a graph of writes) over decode; step+%: what the write kernel adds "
          "to a write + decode step, over decode; fused+%: what writing the new tokens adds to a decode that "
          "writes them itself (the plugin's decode step), over decode")
    print(f"{'shape':18s} {'ours ms':>9s} {'sdpa ms':>9s} {'speedup':>8s} {'GB/s':>7s} {'%BW':>7s} {'write%':>7s} "
          f"{'step+%':>7s} {'fused+%':>7s}")
    for r in rows:
        print(f"{r.shape:18s} {r.ours_ms:9.4f} {r.sdpa_ms:9.4f} {r.speedup:8.2f} {r.ours_tbps:7.0f} "
              f"{100 * r.frac_hbm:7.1f} {100 * r.write_frac:7.1f} {100 * r.write_in_step_ms / r.ours_ms:7.1f} "
              f"{100 * r.write_in_fused_ms / r.ours_ms:7.1f}")
    if out_json:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out_json)) or ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, out_json)
    return result


@click.group("bench")
def bench() -> None:
    """Benchmarks that need a GPU."""


@bench.command("kernels")
@click.option("--iters", default=50, show_default=True, help="timed calls per measurement (median reported)")
@click.option("--tokens-per-block", default=64, show_default=True, help="page size of the quantized pool")
@click.option("--no-context", is_flag=True, help="skip the context (prefill) measurements")
@click.option("--json", "out_json", type=click.Path(dir_okay=False), help="also write the results as JSON")
@click.option("--recent", default=0, show_default=True, type=click.IntRange(0, 64),
              help="recent-token window of the format: each sequence's last W positions read from the fp16 "
                   "ring instead of their codes (the calibration's default is 16)")
@click.option("--sinks", default=0, show_default=True, type=click.IntRange(0, 16),
              help="sink tokens of the format: each sequence's first N positions read from their fp16 "
                   "copies instead of their codes (the calibration's default is 1)")
@click.option("--shape", "shape_names", multiple=True, type=click.Choice([s[0] for s in DEFAULT_SHAPES]),
              help="time only this decode shape (repeatable) [default: all of them]")
@click.option("--finish", type=click.Choice(["counters", "kernel"]), default="counters", show_default=True,
              help="how decode combines its splits: the last CTA of each row, counted by finish counters (the "
                   "plugin's way), or a separate reduce kernel")
@click.option("--read-bw", type=click.FloatRange(min=1.0, min_open=False), default=None,
              help="the card's HBM read bandwidth in GB/s for the '% of bandwidth' column "
                   "[default: the fastest read measured in the run: a 2 GiB torch reduction or fp16 SDPA]")
def kernels_cmd(iters: int, tokens_per_block: int, no_context: bool, out_json: str | None, recent: int,
                sinks: int, shape_names: tuple[str, ...], finish: str, read_bw: float | None) -> None:
    """Decode attention over the 3-bit cache vs torch fp16 SDPA, same shapes, same process.

    Also times the write kernel alone and a write + decode step as the plugin runs one (CUDA graphs
    of 20 calls each); the step column is what the write adds to decode there. Then, unless
    --no-context, context (prefill) attention: causal attention of new tokens over the quantized
    cache, their write included, against fp16 SDPA (B=1 with 4,096 new tokens; B=1 with 512 over an
    8,192-token prefix; B=4 with 2,048 and SmolLM2's heads).

    \b
    Examples:
      turboquant bench kernels --iters 100 --json bench.json
      turboquant bench kernels --recent 16 --no-context    # with the default 16-token window
      turboquant bench kernels --sinks 1 --recent 16 --no-context   # the calibration's defaults
      turboquant bench kernels --shape B8-L32K --shape SmolLM2-B16-L8K --no-context
    """
    try:
        import torch
    except ImportError:
        raise click.ClickException("torch is not installed: pip install torch") from None
    if not torch.cuda.is_available():
        raise click.ClickException("no CUDA GPU visible: run this on a machine with an NVIDIA GPU")
    from .kernels import KernelError, library
    try:
        library()
    except KernelError as e:
        raise click.ClickException(str(e)) from None
    shapes = select_shapes(shape_names)
    run_all(shapes=shapes, iters=iters, tokens_per_block=tokens_per_block, context=not no_context,
            out_json=out_json, recent=recent, read_bw=None if read_bw is None else read_bw * 1e9, sinks=sinks,
            finish=finish)


if __name__ == "__main__":
    sys.exit(bench())
