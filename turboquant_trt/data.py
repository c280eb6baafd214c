"""Text loading and tokenization for calibration and evaluation.

Text files are read as UTF-8 and line ends are normalized (CRLF and lone CR become LF), so the
same tokens come out on every platform. Evaluation uses non-overlapping windows of `ctx` tokens
taken from the start of the tokenized text; calibration uses a range of the same stream that is
disjoint from it (or text the model generates itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


class DataError(ValueError):
    """A user-facing problem with input text (missing, empty, too short)."""


def normalize_newlines(text: str) -> str:
    """CRLF and lone CR -> LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str) -> str:
    """Read a UTF-8 text file with normalized line ends; clear errors for missing/empty files."""
    if not os.path.exists(path):
        raise DataError(f"text file not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"expected a text file, got a directory: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None
    text = normalize_newlines(text)
    if not text.strip():
        raise DataError(f"text file is empty: {path}")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids (int64, 1-D) of `text`, without special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors=None)["input_ids"]
    if len(ids) == 0:
        raise DataError("the text produced no tokens")
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class TokenRange:
    """Which tokens of a text were used: [start, start + count) in windows of `ctx`."""

    source: str
    start: int
    count: int
    ctx: int

    def to_dict(self) -> dict:
        return {"source": self.source, "start": self.start, "tokens": self.count, "ctx": self.ctx}


def windows(ids: torch.Tensor, *, start: int = 0, tokens: int | None, ctx: int) -> torch.Tensor:
    """Non-overlapping windows [n, ctx] from ids[start : start + tokens].

    `tokens=None` takes every whole window after `start`. Raises DataError when fewer than one
    window of text is available or when `tokens` is not a multiple of `ctx`.
    """
    if ctx < 2:
        raise DataError(f"--ctx must be at least 2 tokens, got {ctx}")
    avail = ids.numel() - start
    if avail < ctx:
        raise DataError(
            f"not enough text: {max(avail, 0)} tokens after position {start}, need at least one "
            f"window of {ctx}")
    if tokens is None:
        tokens = (avail // ctx) * ctx
    if tokens <= 0:
        raise DataError(f"--tokens must be positive, got {tokens}")
    if tokens % ctx:
        raise DataError(f"--tokens ({tokens}) must be a multiple of --ctx ({ctx})")
    if tokens > avail:
        raise DataError(
            f"not enough text: asked for {tokens} tokens after position {start}, the text has "
            f"{avail}")
    return ids[start:start + tokens].view(-1, ctx).clone()
