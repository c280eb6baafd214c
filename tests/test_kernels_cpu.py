"""Checks of the kernel binding that need no GPU and no built library."""

import pytest

torch = pytest.importorskip("torch")

from turboquant_trt import kernels as K  # noqa: E402
from turboquant_trt.format import LayerFormat  # noqa: E402


def test_window_formats_allocate_a_ring_and_need_write_kv_in_context():
    fmt = LayerFormat(64, (3, 3), (3, 3), recent_tokens=8)
    lay = K.KernelLayer.allocate(fmt, num_blocks=2, tokens_per_block=32, num_slots=3, device="cpu")
    assert tuple(lay.recent_pool.shape) == (3, 2, 2, 8, 64)
    assert torch.isnan(lay.recent_pool.float()).all()
    # with a window, context attention must write the new tokens itself: refused before any
    # library call otherwise
    q = torch.zeros((2, 6, 64), dtype=torch.float16)
    with pytest.raises(K.KernelError, match="recent_tokens=8: .*write_kv=True"):
        K.context_attention(lay, q, None, None, [[0, 1]], [2], [2], 2, 2, write_kv=False)


def test_window_free_format_allocates_on_cpu():
    fmt = LayerFormat(64, (3, 2), (4, 3))
    lay = K.KernelLayer.allocate(fmt, num_blocks=3, tokens_per_block=64, num_slots=2, device="cpu")
    assert tuple(lay.pool.shape) == (3, fmt.block_layout(64).block_bytes)
    assert tuple(lay.sink_pool.shape) == (2, 2, 2, 1, 64)
    assert tuple(lay.recent_pool.shape) == (2, 2, 2, 1, 64)
