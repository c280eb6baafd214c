"""The `turboquant` command line."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="turboquant")
def cli() -> None:
    """turboquant: KV-cache compression for TensorRT serving.

    \b
    Examples:
      turboquant formats                  # presets: bits/element, bytes, compression
      turboquant quantize --bits 3        # reference quantizer error on random data
      turboquant calibrate --out t/smol   # scale tables for SmolLM2-135M
      turboquant eval --data wiki.txt --table t/smol   # perplexity vs fp16 and baselines
    """


from .cli_format import formats_cmd, quantize_cmd  # noqa: E402

cli.add_command(formats_cmd)
cli.add_command(quantize_cmd)
from .cli_bench import bench as bench_group  # noqa: E402
cli.add_command(bench_group)
from .cli_model import calibrate_cmd, eval_cmd  # noqa: E402
cli.add_command(calibrate_cmd); cli.add_command(eval_cmd)  # noqa: E702


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
