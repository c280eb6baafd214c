"""Scale tables: the calibrated per-layer tensors and formats a model's KV cache is stored with.

On disk a table is two files side by side:

- `NAME.safetensors`: per layer `l` the fp16 tensors of docs/format.md §2 —
  `layers.l.k_mean`, `layers.l.k_smooth`, `layers.l.v_mean`, `layers.l.v_smooth` [H, d],
  `layers.l.k_clip`, `layers.l.v_clip` [H], `layers.l.signs` [d] (±1);
- `NAME.json`: the manifest — `format_version`, `kind: "turboquant-scale-table"`, the model's
  identity (architecture, layers, heads, KV heads, head_dim, RoPE settings, config hash), the
  per-layer formats (bits and one-byte scale exponents E per KV head for K and V, sink tokens,
  recent-token window, ...),
  `recent_tokens` (the largest window of any layer, a summary of the per-layer field), bits/element
  and compression, a summary of the calibration data, the tensor-parallel shard it is (if any),
  and the sha256 of the safetensors file.

Loading validates all of it and refuses a table made for another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

from .format import FORMAT_VERSION, READABLE_FORMAT_VERSIONS, FormatError, LayerFormat, ModelFormat
from .model_loading import ModelIdentity
from .reference import LayerTables

TABLE_KIND = "turboquant-scale-table"
TENSOR_NAMES = ("k_mean", "k_smooth", "v_mean", "v_smooth", "k_clip", "v_clip", "signs")


class ScaleTableError(ValueError):
    """A scale table that cannot be used: missing, corrupt, or made for another model."""


@dataclass
class ScaleTable:
    identity: ModelIdentity
    format: ModelFormat
    tables: list[LayerTables]
    calibration: dict = field(default_factory=dict)
    tp: dict | None = None   # {"rank", "size", "kv_heads": [global KV head ids]} for a shard

    def __post_init__(self) -> None:
        if len(self.tables) != len(self.format.layers):
            raise ScaleTableError(f"{len(self.tables)} layer tables for "
                                  f"{len(self.format.layers)} layer formats")
        if self.tp is None and len(self.tables) != self.identity.num_layers:
            raise ScaleTableError(f"table has {len(self.tables)} layers, the model "
                                  f"{self.identity.num_layers}")
        heads = len(self.tp["kv_heads"]) if self.tp else self.identity.num_kv_heads
        for li, (lf, lt) in enumerate(zip(self.format.layers, self.tables)):
            if lf.kv_heads != heads or lt.kv_heads != heads:
                raise ScaleTableError(f"layer {li}: format has {lf.kv_heads} KV heads, tables "
                                      f"{lt.kv_heads}, expected {heads}")
            if lf.head_dim != self.identity.head_dim or lt.head_dim != self.identity.head_dim:
                raise ScaleTableError(f"layer {li}: head_dim {lf.head_dim}/{lt.head_dim}, model "
                                      f"{self.identity.head_dim}")

    @property
    def recent_tokens(self) -> int:
        """The largest recent-token window of any layer (docs/format.md §5.2)."""
        return self.format.recent_tokens

    # -- accounting --------------------------------------------------------------------------
    def bits_per_element(self, ref_tokens: int = 1024) -> float:
        """Every stored byte (codes, scales, sinks, recent-token ring, tables): docs/format.md §6."""
        return self.format.bits_per_element(ref_tokens)

    def compression(self, ref_tokens: int = 1024) -> float:
        return 16.0 / self.bits_per_element(ref_tokens)

    # -- checks ------------------------------------------------------------------------------
    def check_model(self, identity: ModelIdentity) -> None:
        diffs = self.identity.mismatches(identity)
        if diffs:
            raise ScaleTableError(
                f"this scale table was made for model '{self.identity.name}' "
                f"({self.identity.architecture}), not for '{identity.name}': " + "; ".join(diffs))
        if self.tp is not None:
            raise ScaleTableError("this is a tensor-parallel shard; use the whole table here")

    # -- serialization -----------------------------------------------------------------------
    def manifest(self) -> dict:
        return {
            "kind": TABLE_KIND,
            "format_version": FORMAT_VERSION,
            "model": self.identity.to_dict(),
            "format": self.format.to_dict(),
            "recent_tokens": self.recent_tokens,
            "bits_per_element": round(self.bits_per_element(), 6),
            "compression": round(self.compression(), 6),
            "calibration": self.calibration,
            "tp": self.tp,
        }

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for li, t in enumerate(self.tables):
            for name in TENSOR_NAMES:
                out[f"layers.{li}.{name}"] = np.ascontiguousarray(
                    np.asarray(getattr(t, name), np.float32).astype(np.float16))
        return out

    def save(self, path: str) -> tuple[str, str]:
        """Write NAME.safetensors and NAME.json atomically (temp files, then rename)."""
        from safetensors.numpy import save_file

        st_path, js_path = table_paths(path)
        d = os.path.dirname(os.path.abspath(st_path))
        if not os.path.isdir(d):
            raise ScaleTableError(f"output directory does not exist: {d}")
        if not os.access(d, os.W_OK):
            raise ScaleTableError(f"cannot write to {d}")
        tmp_st = tmp_js = None
        try:
            fd, tmp_st = tempfile.mkstemp(prefix=".tq-", suffix=".safetensors", dir=d)
            os.close(fd)
            save_file(self.tensors(), tmp_st, metadata={"kind": TABLE_KIND,
                                                        "format_version": str(FORMAT_VERSION)})
            man = self.manifest()
            man["safetensors_sha256"] = _sha256(tmp_st)
            fd, tmp_js = tempfile.mkstemp(prefix=".tq-", suffix=".json", dir=d)
            with os.fdopen(fd, "w") as f:
                json.dump(man, f, indent=1)
                f.write("\n")
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp_st, 0o666 & ~mask)
            os.chmod(tmp_js, 0o666 & ~mask)
            os.replace(tmp_st, st_path)
            tmp_st = None
            os.replace(tmp_js, js_path)
            tmp_js = None
        except OSError as e:
            raise ScaleTableError(f"cannot write scale table {st_path}: {e.strerror or e}") from None
        finally:
            for p in (tmp_st, tmp_js):
                if p and os.path.exists(p):
                    os.unlink(p)
        return st_path, js_path

    @classmethod
    def load(cls, path: str, identity: ModelIdentity | None = None) -> "ScaleTable":
        """Load and validate; with `identity`, refuse a table made for another model."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        st_path, js_path = table_paths(path)
        for p in (js_path, st_path):
            if not os.path.isfile(p):
                raise ScaleTableError(f"scale table file not found: {p}")
        try:
            with open(js_path) as f:
                man = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ScaleTableError(f"{js_path} is not a readable JSON manifest: {e}") from None
        if not isinstance(man, dict) or man.get("kind") != TABLE_KIND:
            raise ScaleTableError(f"{js_path} is not a turboquant scale table manifest")
        if man.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ScaleTableError(
                f"{js_path} was made for KV format version {man.get('format_version')!r}; this "
                f"turboquant reads versions {READABLE_FORMAT_VERSIONS[0]} to {FORMAT_VERSION}: "
                "re-run turboquant calibrate")
        want = man.get("safetensors_sha256")
        if want and _sha256(st_path) != want:
            raise ScaleTableError(f"{st_path} does not match its manifest (sha256 differs): the "
                                  "two files belong to different tables or one was modified")
        try:
            ident = ModelIdentity.from_dict(man["model"])
            fmt = ModelFormat.from_dict(man["format"])
            tensors = load_file(st_path)
        except (KeyError, TypeError, ValueError, FormatError, SafetensorError) as e:
            raise ScaleTableError(f"invalid scale table {path}: {e}") from None
        tables = []
        for li in range(len(fmt.layers)):
            try:
                arrs = {n: tensors[f"layers.{li}.{n}"].astype(np.float32) for n in TENSOR_NAMES}
            except KeyError as e:
                raise ScaleTableError(f"{st_path} lacks tensor {e.args[0]}") from None
            for n, a in arrs.items():
                if not np.all(np.isfinite(a)):
                    raise ScaleTableError(f"{st_path}: layers.{li}.{n} has non-finite values")
            try:
                tables.append(LayerTables(**arrs))
            except FormatError as e:
                raise ScaleTableError(f"{st_path}: layer {li}: {e}") from None
        extra = set(tensors) - {f"layers.{li}.{n}" for li in range(len(fmt.layers))
                                for n in TENSOR_NAMES}
        if extra:
            raise ScaleTableError(f"{st_path} has unexpected tensors: {sorted(extra)[:3]}")
        if "recent_tokens" in man and man["recent_tokens"] != fmt.recent_tokens:
            raise ScaleTableError(
                f"{js_path}: recent_tokens {man['recent_tokens']!r} disagrees with the per-layer "
                f"formats (largest window {fmt.recent_tokens}); the table was written by another "
                "version: calibrate it again")
        table = cls(ident, fmt, tables, man.get("calibration") or {}, man.get("tp"))
        if identity is not None:
            table.check_model(identity)
        return table


def table_paths(path: str) -> tuple[str, str]:
    """(NAME.safetensors, NAME.json) for NAME, NAME.safetensors or NAME.json."""
    base = path
    for ext in (".safetensors", ".json"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base + ".safetensors", base + ".json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- tensor parallelism ------------------------------------------------------------------------

_PER_HEAD = ("k_bits", "v_bits", "k_scale_exp", "v_scale_exp")  # LayerFormat fields per KV head

def _subset_layer(lf: LayerFormat, lt: LayerTables, heads: list[int]) -> tuple[LayerFormat, LayerTables]:
    fd = lf.to_dict()
    for name in _PER_HEAD:
        fd[name] = [getattr(lf, name)[h] for h in heads]
    t = LayerTables(lt.k_mean[heads], lt.k_smooth[heads], lt.v_mean[heads], lt.v_smooth[heads],
                    lt.k_clip[heads], lt.v_clip[heads], lt.signs)
    return LayerFormat.from_dict(fd), t


def split_tp(table: ScaleTable, tp_size: int) -> list[ScaleTable]:
    """One table per tensor-parallel rank, KV heads split as TensorRT-LLM splits them:
    contiguous blocks of H/tp heads when tp divides H; when H divides tp each KV head is
    replicated on tp/H consecutive ranks."""
    H = table.identity.num_kv_heads
    if table.tp is not None:
        raise ScaleTableError("table is already a tensor-parallel shard")
    if tp_size < 1:
        raise ScaleTableError(f"tp size must be >= 1, got {tp_size}")
    if H % tp_size == 0:
        per = H // tp_size
        groups = [list(range(r * per, (r + 1) * per)) for r in range(tp_size)]
    elif tp_size % H == 0:
        rep = tp_size // H
        groups = [[r // rep] for r in range(tp_size)]
    else:
        raise ScaleTableError(f"cannot split {H} KV heads over {tp_size} ranks (one must divide "
                              "the other)")
    shards = []
    for r, heads in enumerate(groups):
        pairs = [_subset_layer(lf, lt, heads) for lf, lt in zip(table.format.layers, table.tables)]
        shards.append(ScaleTable(table.identity, ModelFormat(tuple(p[0] for p in pairs)),
                                 [p[1] for p in pairs], dict(table.calibration),
                                 {"rank": r, "size": tp_size, "kv_heads": heads}))
    return shards


def merge_tp(shards: list[ScaleTable]) -> ScaleTable:
    """Reassemble the whole table from all ranks' shards (inverse of :func:`split_tp`)."""
    if not shards or any(s.tp is None for s in shards):
        raise ScaleTableError("merge_tp needs tensor-parallel shards")
    size = shards[0].tp["size"]
    if sorted(s.tp["rank"] for s in shards) != list(range(size)):
        raise ScaleTableError(f"need every rank 0..{size - 1} exactly once")
    ident = shards[0].identity
    owner: dict[int, tuple[ScaleTable, int]] = {}
    for s in sorted(shards, key=lambda s: s.tp["rank"]):
        if s.identity != ident:
            raise ScaleTableError("shards come from different models")
        for j, h in enumerate(s.tp["kv_heads"]):
            owner.setdefault(h, (s, j))
    H = ident.num_kv_heads
    if sorted(owner) != list(range(H)):
        raise ScaleTableError("shards do not cover every KV head")
    layers, tables = [], []
    for li in range(len(shards[0].format.layers)):
        src = [owner[h] for h in range(H)]
        lf0 = src[0][0].format.layers[li].to_dict()
        for name in _PER_HEAD:
            lf0[name] = [getattr(s.format.layers[li], name)[j] for s, j in src]
        layers.append(LayerFormat.from_dict(lf0))
        pick = lambda name: np.stack([getattr(s.tables[li], name)[j] for s, j in src])  # noqa: E731
        tables.append(LayerTables(pick("k_mean"), pick("k_smooth"), pick("v_mean"),
                                  pick("v_smooth"), pick("k_clip"), pick("v_clip"),
                                  src[0][0].tables[li].signs))
    return ScaleTable(ident, ModelFormat(tuple(layers)), tables, dict(shards[0].calibration),
                      None)
