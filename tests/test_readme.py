"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_lines(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside and line.strip() and not line.startswith("#"):
            lines.append(line.strip())
    return lines


def test_ci_runs_the_readme_test_command():
    readme = _code_lines((ROOT / "README.md").read_text())
    test_cmds = [c for c in readme if c.endswith("python -m pytest -q")]
    assert test_cmds, "README.md names no test command ending in 'python -m pytest -q'"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmds[0] in ci, "the README's test command must appear verbatim in .ci/run"


def test_readme_opens_with_setup_main_job_and_tests():
    readme = _code_lines((ROOT / "README.md").read_text())
    assert "turboquant calibrate" in readme[0] and "turboquant eval" in readme[0]
    assert readme[1].endswith("python -m pytest -q")
    for cmd in readme[:2]:
        assert cmd.startswith("python3 -m venv .venv") and "pip install torch==2.13.0" in cmd
