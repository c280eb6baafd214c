"""The commit a report records: HEAD, marked -dirty when tracked files differ from it."""

import shutil
import subprocess

import pytest

from turboquant_trt.provenance import source_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_clean_dirty_and_untracked(tmp_path, monkeypatch):
    monkeypatch.delenv("TURBOQUANT_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    head = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert source_commit(tmp_path) == head
    (tmp_path / "new.txt").write_text("untracked files do not change what was built\n")
    assert source_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("two\n")
    assert source_commit(tmp_path) == head + "-dirty"


def test_override_and_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOQUANT_COMMIT", "abc1234")
    assert source_commit(tmp_path) == "abc1234"
    monkeypatch.delenv("TURBOQUANT_COMMIT")
    assert source_commit(tmp_path) == "unknown"
