"""Configuration records shared by every script: architecture, quantization, build limits.

Three dataclasses, each built from one source of truth and saved with the engine:

* ``ModelArgs``   - the LLaMA architecture. Built only from a HF ``config.json``, a Meta
  ``params.json``, a TensorRT-LLM checkpoint ``config.json`` or a named preset; never from
  command-line flags.
* ``QuantConfig`` - the quantization mode, named as TensorRT-LLM's unified checkpoint names it
  (``quant_algo`` / ``kv_cache_quant_algo``).
* ``BuildConfig`` - limits and kernel choices of one engine.

``EngineConfig`` bundles the three with the backend and a format version; it is the engine
directory's ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

ENGINE_FORMAT_VERSION = 1
ENGINE_BACKEND = "pytorch"

DTYPES = ("float16", "bfloat16", "float32", "float64")


class ConfigError(ValueError):
    """A configuration file or flag combination that cannot be used; the message is one line."""


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """LLaMA-family architecture. ``head_dim`` and ``intermediate_size`` are derived if unset."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-6
    rope_theta: float = 10000.0
    # LLaMA-3.1 style: {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}; or {"rope_type":
    # "linear", "factor": f}. None for plain RoPE.
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    multiple_of: int = 256  # Meta's rounding of the FFN width, used only when deriving it

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            # Meta's rule: 2/3 * 4d, rounded up to a multiple of `multiple_of`.
            hidden = int(2 * 4 * self.hidden_size / 3)
            self.intermediate_size = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r} (LLaMA uses silu)")

    # -- sizes -----------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self, include_embeddings: bool = True) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = d * (self.q_size + 2 * self.kv_size) + self.q_size * d + 3 * d * f + 2 * d
        n = L * per_layer + d
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """From a Hugging Face ``LlamaConfig`` dict (``config.json``)."""
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if cfg.get("model_type", "llama") not in ("llama", "mistral") and "Llama" not in arch:
            raise ConfigError(f"not a LLaMA-family config (model_type={cfg.get('model_type')!r})")
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise ConfigError(f"HF config.json has no {', '.join(missing)}; not a complete "
                              "LLaMA config")
        eos = cfg.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads"),
            intermediate_size=cfg.get("intermediate_size"),
            head_dim=cfg.get("head_dim"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get(
                "rope_theta", 10000.0))),
            rope_scaling=_normalize_rope_scaling(cfg.get("rope_scaling")
                                                 or cfg.get("rope_parameters")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=eos,
        )

    def to_hf_config(self) -> dict:
        """A ``LlamaConfig``-compatible dict (used to build HF baselines of random models)."""
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_epsilon,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        return cfg

    @classmethod
    def from_meta_params(cls, params: dict, vocab_size: Optional[int] = None) -> "ModelArgs":
        """From Meta's ``params.json`` (LLaMA 1/2/3). ``vocab_size`` -1 needs the tokenizer's."""
        dim, n_heads = params["dim"], params["n_heads"]
        vs = params.get("vocab_size", -1)
        if vs is None or vs <= 0:
            if vocab_size is None:
                raise ConfigError("params.json has vocab_size -1; the tokenizer must supply it")
            vs = vocab_size
        multiple_of = params.get("multiple_of", 256)
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(params["ffn_dim_multiplier"] * hidden)
        ffn = multiple_of * math.ceil(hidden / multiple_of)
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        return cls(
            vocab_size=vs,
            hidden_size=dim,
            num_hidden_layers=params["n_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=params.get("n_kv_heads") or n_heads,
            intermediate_size=ffn,
            max_position_embeddings=params.get("max_seq_len", 2048),
            norm_epsilon=params.get("norm_eps", 1e-6),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            multiple_of=multiple_of,
        )

    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} "
                              "or give a config.json path")
        return cls(**PRESETS[name])

    @classmethod
    def from_preset_or_file(cls, name_or_path: str) -> "ModelArgs":
        if os.path.isfile(name_or_path):
            with open(name_or_path) as f:
                cfg = _load_json(f, name_or_path)
            if "dim" in cfg and "n_layers" in cfg:
                return cls.from_meta_params(cfg)
            if "architecture" in cfg and "mapping" in cfg:
                return cls.from_checkpoint_config(cfg)
            return cls.from_hf_config(cfg)
        return cls.from_preset(name_or_path)

    # -- TensorRT-LLM unified checkpoint config -------------------------------------------
    def to_checkpoint_config(self, dtype: str, quant: "QuantConfig",
                             world_size: int = 1, tp_size: int = 1) -> dict:
        """The architecture part of a TensorRT-LLM unified-checkpoint ``config.json``."""
        rotary_scaling = None
        if self.rope_scaling:
            rotary_scaling = dict(self.rope_scaling)
            rotary_scaling.setdefault("type", rotary_scaling.get("rope_type"))
        return {
            "architecture": "LlamaForCausalLM",
            "dtype": dtype,
            "logits_dtype": "float32",
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_size": self.head_dim,
            "hidden_act": self.hidden_act,
            "intermediate_size": self.intermediate_size,
            "norm_epsilon": self.norm_epsilon,
            "position_embedding_type": "rope_gpt_neox",
            "rotary_base": self.rope_theta,
            "rotary_scaling": rotary_scaling,
            "share_embedding_table": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "mapping": {"world_size": world_size, "tp_size": tp_size, "pp_size": 1},
            "quantization": quant.to_checkpoint_dict(),
        }

    @classmethod
    def from_checkpoint_config(cls, cfg: dict) -> "ModelArgs":
        arch = cfg.get("architecture", "")
        if arch not in ("LlamaForCausalLM", "MistralForCausalLM"):
            raise ConfigError(f"checkpoint architecture {arch!r} is not LlamaForCausalLM")
        pe = cfg.get("position_embedding_type", "rope_gpt_neox")
        if pe != "rope_gpt_neox":
            raise ConfigError(f"unsupported position_embedding_type {pe!r}")
        scaling = cfg.get("rotary_scaling")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads"),
            intermediate_size=cfg.get("intermediate_size"),
            head_dim=cfg.get("head_size"),
            max_position_embeddings=cfg.get("max_position_embeddings") or 2048,
            norm_epsilon=cfg.get("norm_epsilon", 1e-5),
            rope_theta=float(cfg.get("rotary_base", 10000.0)),
            rope_scaling=_normalize_rope_scaling(scaling),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings",
                                             cfg.get("share_embedding_table", False))),
            hidden_act=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=cfg.get("eos_token_id", 2),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _normalize_rope_scaling(s: Optional[dict]) -> Optional[dict]:
    """Keep only scaling kinds that change the frequencies; reject ones we do not implement."""
    if not s:
        return None
    s = dict(s)
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear"):
        raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3, linear)")
    s["rope_type"] = kind
    s.pop("type", None)
    s.pop("rope_theta", None)
    return s


PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA-1 7B / 13B shapes (the original work's model); random weights at build time.
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                     num_attention_heads=32, intermediate_size=11008,
                     max_position_embeddings=2048, norm_epsilon=1e-6),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, num_hidden_layers=40,
                      num_attention_heads=40, intermediate_size=13824,
                      max_position_embeddings=2048, norm_epsilon=1e-6),
    # Small enough for CPU tests: GQA (4 query heads share 2 KV heads), untied embeddings.
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=160, max_position_embeddings=512,
                 norm_epsilon=1e-6),
}


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------
# quant_algo values, as TensorRT-LLM's unified checkpoint spells them.
W8A16 = "W8A16"                 # int8 weight-only, per output channel
W4A16 = "W4A16"                 # int4 weight-only, per output channel
W4A16_GROUPWISE = "W4A16_AWQ"   # int4 weight-only, group-wise scales (RTN, pre-quant scale 1)
W4A16_AWQ = W4A16_GROUPWISE     # the same name; with has_zero_point: asymmetric (zeros)
W4A16_GPTQ = "W4A16_GPTQ"       # int4 weight-only, group-wise scales and zeros (GPTQ's)
W8A16_GPTQ = "W8A16_GPTQ"       # int8 weight-only, group-wise scales and zeros (quant_int8.py)
# int4 with zero points (asymmetric): w = q * scale + zero, q in [-8, 7]; group_size 0 there
# means one scale and zero per output channel.
ZERO_POINT_ALGOS = (W4A16_AWQ, W4A16_GPTQ)
SQ_ALGOS = {
    # (per_channel weight scales, per_token activation scales) -> quant_algo
    (True, True): "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    (True, False): "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    (False, True): "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
    (False, False): "W8A8_SQ_PER_TENSOR_PLUGIN",
}
KV_INT8 = "INT8"
KV_FP8 = "FP8"                  # FP8 E4M3 KV cache (TensorRT-LLM's kv_cache_quant_algo FP8)
# kv_cache_quant_algo -> the cache's storage name (torch dtype: kv_cache.QUANT_CACHE_DTYPES)
KV_CACHE_DTYPES = {KV_INT8: "int8", KV_FP8: "fp8"}
# FP8 E4M3 weights and activations (quant_fp8.py). TensorRT-LLM's two names: FP8 = one weight
# scale per tensor, static per-tensor activations; FP8_PER_CHANNEL_PER_TOKEN = per output
# channel weight scales, dynamic per-token activations. QuantConfig.fp8_per_channel /
# fp8_dynamic_act choose the other two combinations (ours; stored with quant_algo FP8).
FP8 = "FP8"
FP8_PCPT = "FP8_PER_CHANNEL_PER_TOKEN"
FP8_ALGOS = (FP8, FP8_PCPT)


@dataclass
class QuantConfig:
    """Quantization of one checkpoint/engine, in TensorRT-LLM's vocabulary."""

    quant_algo: Optional[str] = None
    kv_cache_quant_algo: Optional[str] = None
    group_size: int = 128
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    smoothquant_val: Optional[float] = None  # the alpha used, for the record
    exclude_modules: list = field(default_factory=lambda: ["lm_head"])
    # FP8 (quant_algo FP8 / FP8_PER_CHANNEL_PER_TOKEN) only: weight scale per output channel
    # instead of per tensor; activation scale per token at run time instead of calibrated.
    fp8_per_channel: bool = False
    fp8_dynamic_act: bool = False

    @property
    def is_fp8(self) -> bool:
        return self.quant_algo in FP8_ALGOS

    @property
    def weight_only(self) -> Optional[str]:
        """'int8', 'int4' or None."""
        if self.quant_algo in (W8A16, W8A16_GPTQ):
            return "int8"
        if self.quant_algo in (W4A16, W4A16_GROUPWISE, W4A16_GPTQ):
            return "int4"
        return None

    @property
    def int4_zero_point(self) -> bool:
        """int4 with zero points (asymmetric): W4A16_GPTQ, or W4A16_AWQ with has_zero_point."""
        return self.quant_algo in ZERO_POINT_ALGOS and (
            self.has_zero_point or self.quant_algo == W4A16_GPTQ)

    @property
    def is_smooth_quant(self) -> bool:
        return bool(self.quant_algo) and self.quant_algo.startswith("W8A8_SQ")

    @property
    def sq_per_token(self) -> bool:
        return self.is_smooth_quant and "PER_TOKEN" in self.quant_algo

    @property
    def sq_per_channel(self) -> bool:
        return self.is_smooth_quant and "PER_CHANNEL" in self.quant_algo

    @property
    def int8_kv_cache(self) -> bool:
        return self.kv_cache_quant_algo == KV_INT8

    @property
    def fp8_kv_cache(self) -> bool:
        return self.kv_cache_quant_algo == KV_FP8

    @property
    def kv_cache_dtype(self) -> Optional[str]:
        """'int8', 'fp8' (a quantized cache with calibrated scales) or None (model dtype)."""
        return KV_CACHE_DTYPES.get(self.kv_cache_quant_algo)

    @property
    def int4_group_size(self) -> Optional[int]:
        """Group size of int4 weights; None when per-channel."""
        if self.quant_algo in ZERO_POINT_ALGOS:
            return self.group_size or None
        return None

    def describe(self) -> str:
        parts = [self.quant_algo or "no weight quantization"]
        if self.quant_algo in ZERO_POINT_ALGOS:
            kind = {W4A16_GPTQ: "GPTQ "}.get(self.quant_algo, "")
            g = f"group {self.group_size}" if self.group_size else "per channel"
            parts[0] = f"W4A16 {kind}{g}" + (" with zeros" if self.int4_zero_point else "")
        if self.quant_algo == W8A16_GPTQ:
            parts[0] = f"W8A16 group {self.group_size} with zeros"
        if self.is_fp8:
            parts[0] = (f"FP8 W8A8 (weights per {'channel' if self.fp8_per_channel else 'tensor'}"
                        f", activations {'per token' if self.fp8_dynamic_act else 'static'})")
        if self.kv_cache_dtype:
            parts.append(f"{self.kv_cache_quant_algo} KV cache")
        return ", ".join(parts)

    def to_checkpoint_dict(self) -> dict:
        d = {
            "quant_algo": self.quant_algo,
            "kv_cache_quant_algo": self.kv_cache_quant_algo,
            "group_size": self.group_size,
            "has_zero_point": self.has_zero_point,
            "pre_quant_scale": self.pre_quant_scale,
            "exclude_modules": list(self.exclude_modules) if self.quant_algo else None,
        }
        if self.smoothquant_val is not None:
            d["smoothquant_val"] = self.smoothquant_val
        if self.is_fp8:
            d["fp8_per_channel"], d["fp8_dynamic_act"] = self.fp8_per_channel, self.fp8_dynamic_act
        return d

    @classmethod
    def from_checkpoint_dict(cls, d: Optional[dict]) -> "QuantConfig":
        d = d or {}
        algo = d.get("quant_algo")
        known = {None, W8A16, W4A16, W4A16_GROUPWISE, W4A16_GPTQ, W8A16_GPTQ,
                 *SQ_ALGOS.values(), *FP8_ALGOS}
        if algo not in known:
            raise ConfigError(f"unsupported quant_algo {algo!r}; supported: "
                              f"{sorted(a for a in known if a)}")
        kv = d.get("kv_cache_quant_algo")
        if kv is not None and kv not in KV_CACHE_DTYPES:
            raise ConfigError(f"unsupported kv_cache_quant_algo {kv!r} (supported: "
                              f"{', '.join(KV_CACHE_DTYPES)})")
        zp = bool(d.get("has_zero_point", False)) or algo in (W4A16_GPTQ, W8A16_GPTQ)
        g = d.get("group_size")
        # Zero-point int4 may be per channel (0; GPTQ writes -1); everything else groups by 128.
        g = (0 if g in (0, -1) else int(g or 128)) if algo in ZERO_POINT_ALGOS and zp \
            else int(g or 128)
        if algo in ZERO_POINT_ALGOS and g not in (0, 32, 64, 128):
            raise ConfigError(f"{algo}: group_size {g} is not supported (32, 64, 128, or "
                              "0 = per channel)")
        if algo == W8A16_GPTQ and g not in (32, 64, 128):
            raise ConfigError(f"{algo}: group_size {g} is not supported (32, 64, 128)")
        return cls(
            quant_algo=algo,
            kv_cache_quant_algo=kv,
            group_size=g,
            has_zero_point=zp,
            pre_quant_scale=bool(d.get("pre_quant_scale", False)),
            smoothquant_val=d.get("smoothquant_val"),
            exclude_modules=list(d.get("exclude_modules") or ["lm_head"]),
            fp8_per_channel=bool(d.get("fp8_per_channel", algo == FP8_PCPT)),
            fp8_dynamic_act=bool(d.get("fp8_dynamic_act", algo == FP8_PCPT)),
        )


# ---------------------------------------------------------------------------------------------
# Build limits and kernel choices
# ---------------------------------------------------------------------------------------------
_RETIRED_BUILD_KEYS = ("max_beam_width", "gemm_plugin", "gpt_attention_plugin")


@dataclass
class BuildConfig:
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_output_len: int = 1024
    # Tensor parallelism: keep the embedding split by vocabulary (TensorRT-LLM's
    # --use_parallel_embedding) instead of gathering the whole table on every rank.
    use_parallel_embedding: bool = False
    # Inflight batching / paged KV cache.
    use_inflight_batching: bool = False
    paged_kv_cache: bool = False
    tokens_per_block: int = 64
    max_num_tokens: Optional[int] = None

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len

    def validate(self) -> None:
        for name in ("max_batch_size", "max_input_len", "max_output_len", "tokens_per_block"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")


@dataclass
class EngineConfig:
    """The engine directory's ``config.json``."""

    model: ModelArgs
    quant: QuantConfig
    build: BuildConfig
    dtype: str = "float16"
    backend: str = ENGINE_BACKEND
    format_version: int = ENGINE_FORMAT_VERSION
    world_size: int = 1
    source: dict = field(default_factory=dict)  # where the weights came from (for the record)

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "format_version": self.format_version,
            "dtype": self.dtype,
            "world_size": self.world_size,
            "pretrained_config": self.model.to_checkpoint_config(self.dtype, self.quant,
                                                                 self.world_size,
                                                                 self.world_size),
            "model": self.model.to_dict(),
            "quantization": self.quant.to_checkpoint_dict(),
            "build_config": dataclasses.asdict(self.build),
            "source": self.source,
        }

    def save(self, engine_dir: str) -> None:
        path = os.path.join(engine_dir, "config.json")
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def load(cls, engine_dir: str) -> "EngineConfig":
        path = os.path.join(engine_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{engine_dir}: no config.json; is this an engine directory "
                              "written by build.py?")
        with open(path) as f:
            d = _load_json(f, path)
        backend = d.get("backend")
        if backend != ENGINE_BACKEND:
            raise ConfigError(f"{path}: backend {backend!r} is not this engine's "
                              f"({ENGINE_BACKEND!r})")
        version = _format_version(d.get("format_version"), path)
        _require(d, ENGINE_REQUIRED, path, "")
        _require(d["model"], MODEL_REQUIRED, path, "model.")
        _require(d["build_config"], BUILD_REQUIRED, path, "build_config.")
        try:
            model = ModelArgs(**d["model"])
            quant = QuantConfig.from_checkpoint_dict(d["quantization"])
            # Engines built before these were dropped (never read by this engine) still load.
            build = BuildConfig(**{k: v for k, v in d["build_config"].items()
                                   if k not in _RETIRED_BUILD_KEYS})
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path}: malformed engine config ({e})") from None
        if d.get("dtype") not in DTYPES:
            raise ConfigError(f"{path}: unknown dtype {d.get('dtype')!r}")
        return cls(model=model, quant=quant, build=build, dtype=d["dtype"], backend=backend,
                   format_version=version, world_size=d["world_size"],
                   source=d.get("source", {}))


# Fields an engine's config.json must carry (build.py writes them all): a missing one is an
# error, never a default (a default max_input_len or vocab_size would misdescribe the engine).
# Each maps to the type it must have.
ENGINE_REQUIRED = {"dtype": str, "world_size": int, "model": dict, "quantization": dict,
                   "build_config": dict}
MODEL_REQUIRED = {"vocab_size": int, "hidden_size": int, "num_hidden_layers": int,
                  "num_attention_heads": int, "num_key_value_heads": int,
                  "intermediate_size": int, "head_dim": int, "max_position_embeddings": int,
                  "norm_epsilon": (int, float), "rope_theta": (int, float),
                  "tie_word_embeddings": bool}
BUILD_REQUIRED = {"max_batch_size": int, "max_input_len": int, "max_output_len": int,
                  "tokens_per_block": int}


def _format_version(version, path: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise ConfigError(f"{path}: format_version must be an integer (this code reads "
                          f"{ENGINE_FORMAT_VERSION}), got {version!r}; rebuild the engine")
    if version > ENGINE_FORMAT_VERSION:
        raise ConfigError(f"{path}: engine format version {version} is newer than this "
                          f"code reads ({ENGINE_FORMAT_VERSION}); rebuild the engine or "
                          "update the code")
    if version < 1:
        raise ConfigError(f"{path}: unknown engine format version {version}; rebuild the engine")
    return version


def _require(d: dict, fields: dict, path: str, prefix: str) -> None:
    """One-line error for the first missing or mistyped field (bools are not ints)."""
    for name, kind in fields.items():
        if name not in d:
            raise ConfigError(f"{path}: required field {prefix}{name} is missing; rebuild the "
                              "engine")
        v = d[name]
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            raise ConfigError(f"{path}: {prefix}{name} must be "
                              f"{getattr(kind, '__name__', 'a number')}, got {v!r}")


def _load_json(f, path: str) -> dict:
    try:
        d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d
