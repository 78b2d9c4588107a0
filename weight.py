"""Checkpoint loaders: every source of LLaMA weights becomes ONE representation.

Whatever people hold - a Hugging Face model directory (safetensors or ``pytorch_model*.bin``,
single file or sharded with an index), a Meta checkpoint (``params.json`` +
``consolidated.NN.pth`` tensor-parallel shards, LLaMA 1/2/3), a GGUF file (llama.cpp's format,
read through transformers, dequantized to float) or nothing at all (random weights for a named
preset, as TensorRT-LLM's builder does without a checkpoint) - comes out as

    (ModelArgs, state_dict)

where ``state_dict`` uses Hugging Face ``LlamaForCausalLM`` names
(``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.layers.{i}.input_layernorm.weight``,
``model.layers.{i}.post_attention_layernorm.weight``, ``model.norm.weight``, ``lm_head.weight``
(absent when the embeddings are tied)), holds floating-point tensors, and stores q/k
projections in HF's rotate-half RoPE layout. ``llama_engine/checkpoint.py`` takes it from there.

Every loader checks the result against its config (``validate_state_dict``); every bad input is
a one-line ``ConfigError``.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Iterable, Optional, Union

import torch

from llama_engine.config import DTYPES, ConfigError, ModelArgs

DTypeLike = Union[None, str, torch.dtype]

# Loads at least this large get a progress bar (when stderr is a terminal).
_PROGRESS_MIN_BYTES = 1 << 30

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------------
# Names and shapes
# ---------------------------------------------------------------------------------------------
def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a LLaMA with ``args`` has, in HF's order."""
    d, f, v = args.hidden_size, args.intermediate_size, args.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (args.q_size, d)
        shapes[p + "self_attn.k_proj.weight"] = (args.kv_size, d)
        shapes[p + "self_attn.v_proj.weight"] = (args.kv_size, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, args.q_size)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def validate_state_dict(args: ModelArgs, sd: dict[str, torch.Tensor]) -> None:
    """Every expected tensor present, float, with the right shape, and nothing else.

    Raises ``ConfigError`` naming the first offending tensor ("checkpoint disagrees with its
    config: ...").
    """
    expected = expected_shapes(args)
    prefix = "checkpoint disagrees with its config:"
    for name, shape in expected.items():
        t = sd.get(name)
        if t is None:
            raise ConfigError(f"{prefix} missing tensor {name} (expected shape "
                              f"{_shape_str(shape)})")
        if tuple(t.shape) != shape:
            raise ConfigError(f"{prefix} {name} has shape {_shape_str(t.shape)}, expected "
                              f"{_shape_str(shape)}")
        if not t.is_floating_point():
            raise ConfigError(f"{prefix} {name} has dtype {t.dtype}, expected a float tensor")
    for name, t in sd.items():
        if name not in expected:
            raise ConfigError(f"{prefix} unexpected tensor {name} with shape "
                              f"{_shape_str(t.shape)} (a LLaMA with this config has none)")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def resolve_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    """``None`` (keep the checkpoint's), a ``torch.dtype`` or one of ``config.DTYPES``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    return getattr(torch, dtype)


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    # Same dtype: `.to` returns the tensor itself, so mmap'd storage stays lazy.
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _progress(total: int, nbytes: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", leave=False,
                disable=nbytes < _PROGRESS_MIN_BYTES or not sys.stderr.isatty())


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        kind = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"{what} {path} {kind}")
    return path


def _torch_load(path: str) -> dict[str, torch.Tensor]:
    """``torch.load`` a state dict safely (``weights_only``), mmap'd where the format allows."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            # Files from torch < 1.6 (legacy, non-zip format) cannot be mmap'd.
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/EOF errors all mean the same thing to the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read this checkpoint file ({msg[:200]})") from None
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ConfigError(f"{path}: not a dict of tensors (a state dict was expected)")
    return obj


def _find_tokenizer(*dirs: str) -> Optional[str]:
    for d in dirs:
        if any(os.path.isfile(os.path.join(d, n)) for n in _TOKENIZER_FILES):
            return d
    return None


# ---------------------------------------------------------------------------------------------
# Hugging Face directories
# ---------------------------------------------------------------------------------------------
def _hf_weight_files(model_dir: str) -> tuple[str, list[str]]:
    """('safetensors' | 'bin', files) in the order HF's own loader prefers."""
    def from_index(index_name: str) -> Optional[list[str]]:
        index = os.path.join(model_dir, index_name)
        if not os.path.isfile(index):
            return None
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{index}: no weight_map")
        files = [os.path.join(model_dir, f) for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not os.path.isfile(f):
                raise ConfigError(f"{index} names {os.path.basename(f)}, which is missing")
        return files

    files = from_index("model.safetensors.index.json")
    if files:
        return "safetensors", files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if files:
        return "safetensors", files
    files = from_index("pytorch_model.bin.index.json")
    if files:
        return "bin", files
    files = sorted(glob.glob(os.path.join(model_dir, "pytorch_model*.bin")))
    if files:
        return "bin", files
    raise ConfigError(f"{model_dir}: no weights found (expected model*.safetensors or "
                      "pytorch_model*.bin)")


def _iter_safetensors(path: str):
    """(name, tensor) of one safetensors file; library errors become ConfigError."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except ConfigError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot read this safetensors file ({msg[:200]})") from None


def _hf_name(key: str) -> str:
    """Accept keys saved from ``LlamaModel`` (no ``model.`` prefix) as well."""
    return key if key.startswith("model.") or key == "lm_head.weight" else "model." + key


def load_hf(model_dir: str, dtype: DTypeLike = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """A Hugging Face LLaMA directory (``config.json`` + weights) -> (ModelArgs, HF state dict).

    Reads ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
    ``pytorch_model.bin`` or sharded ``.bin`` with its index (``torch.load(weights_only=True)``).
    ``dtype`` None keeps the checkpoint's dtype.
    """
    _require_dir(model_dir, "HF model directory")
    target = resolve_dtype(dtype)
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    args = ModelArgs.from_hf_config(_read_json(cfg_path))
    kind, files = _hf_weight_files(model_dir)

    sd: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}  # canonical name -> key as stored, to spot ambiguity
    n_expected = len(expected_shapes(args))
    with _progress(n_expected, sum(os.path.getsize(f) for f in files),
                   f"loading {os.path.basename(model_dir.rstrip('/'))}") as bar:
        for path in files:
            items = _iter_safetensors(path) if kind == "safetensors" else \
                _torch_load(path).items()
            for key, t in items:
                if key.endswith("rotary_emb.inv_freq"):  # a buffer recomputed from rope_theta
                    continue
                name = _hf_name(key)
                if name in sd:
                    raise ConfigError(f"{path}: tensor {name} stored twice (as "
                                      f"{source_of[name]} and {key}); ambiguous checkpoint")
                source_of[name] = key
                sd[name] = _cast(t, target)
                bar.update(1)
    if args.tie_word_embeddings:
        # Some tied checkpoints also store lm_head; HF ignores it and so do we.
        sd.pop("lm_head.weight", None)
    validate_state_dict(args, sd)
    return args, sd


# ---------------------------------------------------------------------------------------------
# Meta checkpoints
# ---------------------------------------------------------------------------------------------
# RoPE layouts of the q/k projection rows inside one head of size D:
#   * Meta (interleaved): rows (2i, 2i+1) form the pair rotated by frequency i, i < D/2
#     (Meta's code views them as one complex number).
#   * HF (rotate-half, also TensorRT-LLM's "rope_gpt_neox" and our engine's): rows (i, i+D/2)
#     form that pair.
# So Meta row 2i+j (j in {0,1}) is HF row j*D/2 + i.
def permute_rope_interleaved_to_half(w: torch.Tensor, n_heads: int,
                                     head_dim: int) -> torch.Tensor:
    """Meta's interleaved q/k rows -> HF's rotate-half rows. ``w``: [n_heads*head_dim, K]."""
    _check_rope_shape(w, n_heads, head_dim)
    k = w.shape[1]
    # [H, D/2, 2, K] (pair index i, member j) -> [H, 2, D/2, K] -> row j*D/2 + i
    return w.reshape(n_heads, head_dim // 2, 2, k).transpose(1, 2).reshape(n_heads * head_dim, k)


def permute_rope_half_to_interleaved(w: torch.Tensor, n_heads: int,
                                     head_dim: int) -> torch.Tensor:
    """The inverse: HF's rotate-half q/k rows -> Meta's interleaved rows."""
    _check_rope_shape(w, n_heads, head_dim)
    k = w.shape[1]
    # [H, 2, D/2, K] (member j, pair index i) -> [H, D/2, 2, K] -> row 2i + j
    return w.reshape(n_heads, 2, head_dim // 2, k).transpose(1, 2).reshape(n_heads * head_dim, k)


def _check_rope_shape(w: torch.Tensor, n_heads: int, head_dim: int) -> None:
    if w.dim() != 2 or w.shape[0] != n_heads * head_dim or head_dim % 2:
        raise ConfigError(f"cannot permute RoPE rows of a {_shape_str(w.shape)} tensor as "
                          f"{n_heads} heads of size {head_dim}")


# Meta name (within a layer, or global) -> HF name; how tensor-parallel shards are merged.
_META_LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),   # None: replicated
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_META_GLOBAL_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "embedding"),  # dim decided by shape
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


def _meta_to_hf(key: str) -> tuple[str, object]:
    if key in _META_GLOBAL_NAMES:
        return _META_GLOBAL_NAMES[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() \
            and parts[2] in _META_LAYER_NAMES:
        hf, dim = _META_LAYER_NAMES[parts[2]]
        return f"model.layers.{parts[1]}.{hf}", dim
    raise ConfigError(f"unknown tensor {key} in a Meta checkpoint")


def _embedding_cat_dim(shapes: list[tuple[int, ...]], dim: int) -> int:
    """Which dim the tok_embeddings shards concatenate on: LLaMA-1/2 shard it by columns
    (dim 1), LLaMA-3 by rows (dim 0). Shapes decide: with several shards only one of the two
    can give [vocab, dim] (dim 0 needs every shard [*, dim], dim 1 needs columns summing to dim).
    """
    if len(shapes) == 1 or all(len(s) == 2 and s[1] == dim for s in shapes):
        return 0
    if all(len(s) == 2 and s[0] == shapes[0][0] for s in shapes) and \
            sum(s[1] for s in shapes) == dim:
        return 1
    raise ConfigError("checkpoint disagrees with its config: tok_embeddings shards "
                      f"{[_shape_str(s) for s in shapes]} do not merge to [vocab, {dim}]")


def _sentencepiece_vocab(*dirs: str) -> Optional[int]:
    for d in dirs:
        path = os.path.join(d, "tokenizer.model")
        if os.path.isfile(path):
            try:
                import sentencepiece as spm
                return spm.SentencePieceProcessor(model_file=path).get_piece_size()
            except Exception:  # LLaMA-3's tokenizer.model is tiktoken, not SentencePiece
                return None
    return None


def load_meta(ckpt_dir: str, dtype: DTypeLike = None,
              vocab_size: Optional[int] = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """A Meta checkpoint (``params.json`` + ``consolidated.NN.pth``) -> (ModelArgs, HF state dict).

    Tensor-parallel shards are merged (dim 0 for wq/wk/wv/w1/w3/output, dim 1 for wo/w2,
    tok_embeddings by shape), replicated norms checked equal, names mapped to HF's and wq/wk
    permuted from Meta's interleaved RoPE layout to rotate-half. ``vocab_size`` overrides a
    ``-1`` in params.json; otherwise a SentencePiece ``tokenizer.model`` in the directory or
    its parent supplies it, else the embedding's shape.
    """
    _require_dir(ckpt_dir, "Meta checkpoint directory")
    target = resolve_dtype(dtype)
    params_path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isfile(params_path):
        raise ConfigError(f"{ckpt_dir}: no params.json; is this a Meta checkpoint directory?")
    params = _read_json(params_path)
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(params.get(key), int):
            raise ConfigError(f"{params_path}: missing or non-integer {key!r}")
    shard_paths = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    if not shard_paths:
        raise ConfigError(f"{ckpt_dir}: no weights found (expected consolidated.NN.pth)")
    shards = [_torch_load(p) for p in shard_paths]
    for p, s in zip(shard_paths[1:], shards[1:]):
        if s.keys() != shards[0].keys():
            diff = sorted(set(s) ^ set(shards[0]))[0]
            raise ConfigError(f"{p}: its tensors differ from {os.path.basename(shard_paths[0])}'s "
                              f"(e.g. {diff})")

    if params.get("vocab_size") in (None, -1) and vocab_size is None:
        parent = os.path.dirname(os.path.abspath(ckpt_dir))
        vocab_size = _sentencepiece_vocab(ckpt_dir, parent)
        if vocab_size is None and "tok_embeddings.weight" in shards[0]:
            shapes = [tuple(s["tok_embeddings.weight"].shape) for s in shards]
            cat_dim = _embedding_cat_dim(shapes, params["dim"])
            vocab_size = sum(s[0] for s in shapes) if cat_dim == 0 else shapes[0][0]
    args = ModelArgs.from_meta_params(params, vocab_size=vocab_size)

    sd: dict[str, torch.Tensor] = {}
    nbytes = sum(os.path.getsize(p) for p in shard_paths)
    with _progress(len(shards[0]), nbytes, f"merging {len(shards)} Meta shard(s)") as bar:
        for key in shards[0]:
            bar.update(1)
            if key == "rope.freqs":  # LLaMA-1's precomputed frequencies; derived from rope_theta
                continue
            name, dim = _meta_to_hf(key)
            parts = [s[key] for s in shards]
            if dim is None:
                for p, t in zip(shard_paths[1:], parts[1:]):
                    if not torch.equal(t, parts[0]):
                        raise ConfigError(f"{p}: replicated tensor {key} differs from shard 0's")
                t = parts[0]
            else:
                if dim == "embedding":
                    dim = _embedding_cat_dim([tuple(p.shape) for p in parts], args.hidden_size)
                t = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
            if name.endswith("q_proj.weight"):
                t = _permute_checked(t, args.num_attention_heads, args.head_dim, name)
            elif name.endswith("k_proj.weight"):
                t = _permute_checked(t, args.num_key_value_heads, args.head_dim, name)
            sd[name] = _cast(t, target)
    validate_state_dict(args, sd)
    return args, sd


def _permute_checked(t: torch.Tensor, n_heads: int, head_dim: int, name: str) -> torch.Tensor:
    if t.dim() != 2 or t.shape[0] != n_heads * head_dim:
        raise ConfigError(f"checkpoint disagrees with its config: {name} has shape "
                          f"{_shape_str(t.shape)}, expected [{n_heads * head_dim}, ...]")
    return permute_rope_interleaved_to_half(t, n_heads, head_dim)


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------
def load_gguf(path: str, dtype: DTypeLike = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """A GGUF file (llama.cpp) -> (ModelArgs, HF state dict), through transformers.

    transformers dequantizes every tensor (Q4_1, Q8_0, ... -> float32) and undoes llama.cpp's
    q/k permutation, so the result is rotate-half like any HF checkpoint. A quantized GGUF
    stays as lossy as it was: these are the quantized values, in float. ``dtype`` None keeps
    float32. Needs the ``gguf`` and ``accelerate`` packages.
    """
    if not os.path.isfile(path):
        kind = "is not a file" if os.path.exists(path) else "does not exist"
        raise ConfigError(f"GGUF file {path} {kind}")
    target = resolve_dtype(dtype)
    from transformers import AutoModelForCausalLM
    path = os.path.abspath(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot load this GGUF file ({msg[:200]})") from None
    cfg = model.config.to_dict()
    # The GGUF-derived config has architectures None, rope_theta under rope_parameters, and a
    # non-JSON quantization_config; from_hf_config reads only the architecture fields.
    args = ModelArgs.from_hf_config(cfg)
    sd = {k: _cast(v.detach(), target) for k, v in model.state_dict().items()
          if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # state_dict() lists the tied embedding twice
    validate_state_dict(args, sd)
    return args, sd


# ---------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------
def random_weights(args: ModelArgs, dtype: DTypeLike, seed: int = 0,
                   device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """Random weights for ``args``, as TensorRT-LLM's builder makes without a checkpoint.

    Linear and embedding weights ~ N(0, 0.02) (HF's ``initializer_range``), norms ones: with
    these, activations stay O(1-10) through 32+ layers, so an fp16 forward pass is finite and
    numerically sane. Each tensor is generated directly in ``dtype`` on ``device`` (LLaMA-7B
    in fp16 is 13.5 GB; there is never an fp32 copy). Deterministic for a (seed, dtype, device).
    """
    target = resolve_dtype(dtype) or torch.float32
    if not target.is_floating_point:
        raise ConfigError(f"random weights need a float dtype, got {target}")
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = expected_shapes(args)
    nbytes = args.num_params() * torch.finfo(target).bits // 8
    sd: dict[str, torch.Tensor] = {}
    with _progress(len(shapes), nbytes, "random weights") as bar:
        for name, shape in shapes.items():
            t = torch.empty(shape, dtype=target, device=device)
            if len(shape) == 1:  # RMSNorm gains
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            sd[name] = t
            bar.update(1)
    return sd


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def load_source(model_dir: Optional[str] = None, meta_ckpt_dir: Optional[str] = None,
                gguf_file: Optional[str] = None, model_config: Optional[str] = None,
                dtype: DTypeLike = None, seed: int = 0,
                device: Union[str, torch.device] = "cpu"
                ) -> tuple[ModelArgs, dict[str, torch.Tensor], dict]:
    """Load exactly one source (build.py's ``--model_dir | --meta_ckpt_dir | --gguf_file``), or
    random weights for ``model_config`` (a preset name or a config.json / params.json path).

    Returns (ModelArgs, HF state dict, info) with info = {"kind": "hf" | "meta" | "gguf" |
    "random", "path": ..., "tokenizer_dir": a directory with tokenizer files, the .gguf file
    itself (it embeds its tokenizer), or None}. ``dtype`` None keeps the checkpoint's dtype
    (float32 for GGUF and random weights). ``seed``/``device`` apply to random weights only.
    """
    given = {k: v for k, v in (("model_dir", model_dir), ("meta_ckpt_dir", meta_ckpt_dir),
                               ("gguf_file", gguf_file)) if v}
    if len(given) > 1:
        raise ConfigError(f"give only one weight source, got {' and '.join(given)}")
    if given and model_config:
        raise ConfigError("model_config is only for random weights; a checkpoint brings its "
                          "own config")
    if model_dir:
        args, sd = load_hf(model_dir, dtype)
        info = {"kind": "hf", "path": os.path.abspath(model_dir),
                "tokenizer_dir": _find_tokenizer(model_dir)}
    elif meta_ckpt_dir:
        args, sd = load_meta(meta_ckpt_dir, dtype)
        parent = os.path.dirname(os.path.abspath(meta_ckpt_dir))
        info = {"kind": "meta", "path": os.path.abspath(meta_ckpt_dir),
                "tokenizer_dir": _find_tokenizer(meta_ckpt_dir, parent)}
    elif gguf_file:
        args, sd = load_gguf(gguf_file, dtype)
        info = {"kind": "gguf", "path": os.path.abspath(gguf_file),
                "tokenizer_dir": os.path.abspath(gguf_file)}
    elif model_config:
        args = ModelArgs.from_preset_or_file(model_config)
        sd = random_weights(args, dtype, seed=seed, device=device)
        info = {"kind": "random", "path": model_config, "tokenizer_dir": None}
    else:
        raise ConfigError("no weights given: pass model_dir, meta_ckpt_dir or gguf_file, or "
                          "model_config (a preset or config.json) for random weights")
    return args, sd, info
