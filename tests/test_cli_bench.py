"""`turboquant bench kernels` on a machine without a GPU, and its argument checks (CPU only)."""

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
