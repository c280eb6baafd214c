"""`turboquant formats` and `turboquant quantize`: the format and the reference quantizer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import numpy as np

from .format import (
    DEFAULT_REF_TOKENS,
    PRESETS,
    SCALE_EXP_MAX,
    SCALE_EXP_MIN,
    SUPPORTED_BITS,
    SUPPORTED_HEAD_DIMS,
    SUPPORTED_KINDS,
    FormatError,
    KVFormat,
)
from .reference import LayerQuantizer, codebook_mse, scale_exp_for_max, turbo_scale
from .table import print_table


def _preset_rows(head_dim: int, sink_tokens: int, ref_tokens: int, recent_tokens: int = 0) -> list[dict]:
    rows = []
    for name, p in PRESETS.items():
        f = KVFormat(p.k_bits, p.v_bits, p.kind, head_dim, p.group_size, p.rotation,
                     p.norm_correction, sink_tokens, recent_tokens)
        rows.append({
            "preset": name,
            "k_bits": f.k_bits,
            "v_bits": f.v_bits,
            "kind": f.kind,
            "head_dim": head_dim,
            "sink_tokens": sink_tokens,
            "recent_tokens": recent_tokens,
            "bytes_per_token_head": f.bytes_per_token_head(),
            "bits_per_element": round(f.bits_per_element(ref_tokens), 4),
            "compression": round(f.compression(ref_tokens), 3),
        })
    return rows


@click.command("formats")
@click.option("--head-dim", type=click.Choice([str(d) for d in SUPPORTED_HEAD_DIMS]), default="128",
              show_default=True, help="Head dimension the figures are computed for.")
@click.option("--sink-tokens", type=click.IntRange(0, 16), default=0, show_default=True,
              help="Leading tokens kept in fp16 (counted over --ref-tokens).")
@click.option("--recent-tokens", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Recent-token window kept in fp16 per sequence (docs/format.md §5.2; the CUDA "
                   "kernels do not read it yet), counted over --ref-tokens.")
@click.option("--ref-tokens", type=click.IntRange(1), default=DEFAULT_REF_TOKENS, show_default=True,
              help="Sequence length that sink copies, the window and calibrated tables are spread over.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def formats_cmd(head_dim: str, sink_tokens: int, recent_tokens: int, ref_tokens: int, as_json: bool) -> None:
    """List the named format presets with every metadata byte counted.

    \b
    bytes_per_token_head: K and V codes plus their one-byte scales for one token of one KV
    head; bits_per_element also counts fp16 sink copies, the fp16 recent-token window and the
    calibrated tables (means, smoothing, clip: fp16; two scale exponents: one byte each)
    spread over --ref-tokens tokens.

    \b
    Examples:
      turboquant formats
      turboquant formats --head-dim 64 --sink-tokens 4 --json
      turboquant formats --head-dim 64 --recent-tokens 16
    """
    rows = _preset_rows(int(head_dim), sink_tokens, ref_tokens, recent_tokens)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    print_table(rows, ["preset", "k_bits", "v_bits", "kind", "bytes_per_token_head",
                       "bits_per_element", "compression"],
                title=f"TurboQuant presets at head_dim={head_dim}, {sink_tokens} sink tokens, "
                      f"{recent_tokens}-token window, amortized over {ref_tokens} tokens")


def _load_tensor(path: Path, name: str | None) -> np.ndarray:
    if not path.exists():
        raise click.BadParameter(f"{path} does not exist", param_hint="--input")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file
        tensors = load_file(str(path))
        if name is None:
            if len(tensors) != 1:
                raise click.BadParameter(
                    f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:8])}); "
                    "choose one with --tensor", param_hint="--tensor")
            name = next(iter(tensors))
        if name not in tensors:
            raise click.BadParameter(f"no tensor {name!r} in {path}; it holds "
                                     f"{', '.join(sorted(tensors)[:8])}", param_hint="--tensor")
        return tensors[name]
    raise click.BadParameter(f"{path}: expected a .npy or .safetensors file", param_hint="--input")


def error_stats(x: np.ndarray, xq: np.ndarray, rng: np.random.Generator) -> dict:
    """Error of a reconstruction xq of vectors x [n, d], and of inner products with random queries."""
    x = x.astype(np.float64)
    xq = xq.astype(np.float64)
    err = xq - x
    rel_mse = float(np.sum(err ** 2) / max(np.sum(x ** 2), 1e-300))
    nx = np.linalg.norm(x, axis=-1)
    nq = np.linalg.norm(xq, axis=-1)
    ok = (nx > 0) & (nq > 0)
    cos = float(np.mean(np.sum(x[ok] * xq[ok], -1) / (nx[ok] * nq[ok]))) if ok.any() else float("nan")
    q = rng.standard_normal((64, x.shape[-1]))
    ip = x @ q.T
    ipq = xq @ q.T
    ip_rel = float(np.sqrt(np.mean((ipq - ip) ** 2) / max(np.mean(ip ** 2), 1e-300)))
    return {"rel_mse": rel_mse, "max_abs_err": float(np.max(np.abs(err))), "cosine": cos,
            "ip_rel_rms": ip_rel}


@click.command("quantize")
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A .npy or .safetensors tensor [..., head_dim]; random Gaussian data if omitted.")
@click.option("--tensor", "tensor_name", help="Tensor name inside a .safetensors file.")
@click.option("--bits", "bits_list", type=click.Choice([str(b) for b in SUPPORTED_BITS]),
              multiple=True, help="Bit widths to try (repeatable; default: all).")
@click.option("--kind", type=click.Choice(SUPPORTED_KINDS), default="turbo", show_default=True)
@click.option("--group-size", type=int, default=0, show_default=True,
              help="Channels per group for kind 'uniform' (0: the whole head).")
@click.option("--no-rotation", is_flag=True, help="Kind 'uniform' without the Hadamard rotation.")
@click.option("--no-norm-correction", is_flag=True, help="Kind 'turbo' with the plain norm scale.")
@click.option("--head-dim", type=click.Choice([str(d) for d in SUPPORTED_HEAD_DIMS]), default="128",
              show_default=True, help="Head dimension of random data (a file's last axis wins).")
@click.option("--vectors", type=click.IntRange(1), default=4096, show_default=True,
              help="Number of random vectors.")
@click.option("--scale-exp", type=click.IntRange(SCALE_EXP_MIN, SCALE_EXP_MAX), default=None,
              help="Exponent E of the one-byte turbo scales (docs/format.md §3.1); default: "
                   "chosen from the data as calibration does (floor(log2 max scale) - 11).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def quantize_cmd(input_path, tensor_name, bits_list, kind, group_size, no_rotation,
                 no_norm_correction, head_dim, vectors, scale_exp, seed, as_json) -> None:
    """Run the reference quantizer on a tensor and print its error statistics.

    Every vector along the last axis is quantized as one KV-head vector (no calibrated tables).
    rel_mse is |x - x^|^2 / |x|^2; ip_rel_rms the RMS error of inner products with 64 random
    queries, relative to their RMS; gauss_theory the distortion of the format's codebook c_b on
    N(0,1) at that width; scale_exp the exponent E of the one-byte scales (kind 'turbo').

    \b
    Examples:
      turboquant quantize --bits 3 --bits 4
      turboquant quantize --input keys.npy --kind uniform --group-size 32 --json
      turboquant quantize --input kv.safetensors --tensor layer0.k
    """
    rng = np.random.default_rng(seed)
    if input_path is not None:
        x = _load_tensor(input_path, tensor_name)
        if x.ndim < 1 or x.shape[-1] not in SUPPORTED_HEAD_DIMS:
            raise click.BadParameter(f"the last axis of the tensor is {x.shape[-1] if x.ndim else 0}; "
                                     f"it must be a head_dim in {SUPPORTED_HEAD_DIMS}",
                                     param_hint="--input")
        x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        if not np.all(np.isfinite(x)):
            raise click.BadParameter("the tensor holds NaN or Inf values", param_hint="--input")
        source = str(input_path)
    else:
        x = rng.standard_normal((vectors, int(head_dim))).astype(np.float32)
        source = f"N(0,1) x {vectors}"
    d = x.shape[-1]
    rows = []
    for b in (bits_list or [str(b) for b in SUPPORTED_BITS]):
        b = int(b)
        try:
            fmt = KVFormat(b, b, kind, d, group_size, not no_rotation, not no_norm_correction)
        except FormatError as e:
            raise click.UsageError(str(e)) from None
        exp = scale_exp
        if kind == "turbo" and exp is None:
            lq0 = LayerQuantizer(fmt.layer(1))
            _, sc = turbo_scale(lq0.transform(x[:, None, :], "k")[:, 0], b,
                                not no_norm_correction)
            exp = scale_exp_for_max(float(sc.max()))
        if exp is not None:
            fmt = dataclasses.replace(fmt, scale_exp=exp)
        lq = LayerQuantizer(fmt.layer(1))
        xq = lq.fake_quant(x[:, None, :], "k")[:, 0, :]
        st = error_stats(x, xq, rng)
        rows.append({"bits": b, "kind": kind, "bits_per_element": round(fmt.bits_per_element(0, False), 4),
                     "scale_exp": exp if kind == "turbo" else None,
                     **{k: float(f"{v:.6g}") for k, v in st.items()},
                     "gauss_theory": float(f"{codebook_mse(b):.6g}") if kind == "turbo" else None})
    if as_json:
        click.echo(json.dumps({"source": source, "head_dim": d, "vectors": int(x.shape[0]),
                               "rows": rows}, indent=1))
        return
    print_table(rows, ["bits", "kind", "bits_per_element", "scale_exp", "rel_mse", "gauss_theory",
                       "ip_rel_rms", "cosine", "max_abs_err"],
                title=f"reference quantizer on {source}, head_dim={d}")

