"""`turboquant bench kernels` on a machine without a GPU, its argument checks, and the random cache it
builds (CPU only)."""

import pytest
from click.testing import CliRunner

from turboquant_trt.cli import cli

torch = pytest.importorskip("torch")


def _run(args):
    r = CliRunner().invoke(cli, ["bench", "kernels", *args])
    return r.exit_code, r.output


@pytest.mark.parametrize("args, words", [
    (["--sinks", "17"], "--sinks"),
    (["--recent", "65"], "--recent"),
    (["--read-bw", "0"], "--read-bw"),
    (["--shape", "B8-L64K"], "--shape"),
])
def test_bad_options_are_usage_errors(args, words):
    code, out = _run(args)
    assert code == 2, out
    assert words in out and "Traceback" not in out


def test_help_shows_the_default_format_example():
    code, out = _run(["--help"])
    assert code == 0, out
    assert "--sinks 1 --recent 16" in out and "--shape B8-L32K" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_says_so():
    code, out = _run(["--sinks", "1", "--recent", "16", "--no-context"])
    assert code == 1, out
    assert "no CUDA GPU visible" in out and "Traceback" not in out


def test_shape_selection_keeps_table_order():
    from turboquant_trt.cli_bench import DEFAULT_SHAPES, select_shapes
    got = select_shapes(("SmolLM2-B16-L8K", "B8-L32K", "B8-L32K"))
    assert [s[0] for s in got] == ["B8-L32K", "SmolLM2-B16-L8K"]
    assert select_shapes(()) == list(DEFAULT_SHAPES)


def test_random_cache_is_a_random_paged_pool_on_cpu():
    """The benches' and profilers' cache: a block table that is a permutation of every block, random
    code bytes, and scale bytes that decode to 0.05-0.25 (docs/format.md section 3.1)."""
    import numpy as np
    import torch

    from turboquant_trt.cli_bench import random_cache
    from turboquant_trt.format import LayerFormat
    from turboquant_trt.reference import scale8_encode

    fmt = LayerFormat(64, (3, 2), (3, 4))
    gen = torch.Generator()
    gen.manual_seed(7)
    lay, bt = random_cache(fmt, 3, 200, 32, gen, device="cpu")
    assert bt.shape == (3, 7) and bt.dtype == torch.int32
    assert sorted(bt.flatten().tolist()) == list(range(21))
    assert bt.flatten().tolist() != list(range(21))
    layout = fmt.block_layout(32)
    assert lay.pool.shape == (21, layout.block_bytes)
    for h in range(fmt.kv_heads):
        for off, e in ((layout.k_meta[h], fmt.k_scale_exp[h]), (layout.v_meta[h], fmt.v_scale_exp[h])):
            lo, hi = (int(k) for k in scale8_encode(np.array([0.05, 0.25], np.float32), e))
            meta = lay.pool[:, off:off + 32]
            assert int(meta.min()) >= lo and int(meta.max()) <= hi and int(meta.max()) > int(meta.min())
    codes = lay.pool[:, layout.k_codes[0]:layout.k_codes[0] + 16]
    assert len(torch.unique(codes)) > 100  # random bytes, not the allocation fill
