"""SmoothQuant calibration and smoothing for LLaMA (Xiao et al. 2022, arXiv:2211.10438).

Two steps, as in TensorRT-LLM's ``examples/llama/smoothquant.py`` (our own code):

1. **Calibration** (``capture_stats``): run a Hugging Face ``LlamaForCausalLM`` over
   calibration prompts (the summarize prompt builder over cnn_dailymail's train split, or
   synthetic token ids for speed-only engines on random weights) and record, with forward
   hooks, the per-channel max |x| of the input of every linear. Statistics are keyed by
   unified-checkpoint prefix:

   ==================================  =====================================
   ``transformer.layers.{i}.attention.qkv``     input of q_proj (= of k_proj, v_proj)
   ``transformer.layers.{i}.attention.dense``   input of o_proj
   ``transformer.layers.{i}.mlp.fc``            input of gate_proj
   ``transformer.layers.{i}.mlp.gate``          input of up_proj (same tensor as fc)
   ``transformer.layers.{i}.mlp.proj``          input of down_proj
   ==================================  =====================================

   For the INT8 KV cache it also records, per layer, max |k| and max |v| of every (KV head,
   channel) over all calibration tokens (``transformer.layers.{i}.attention`` -> tensor
   [2, Hkv*D], row 0 K, row 1 V, channel h*D + d). K is measured *after* RoPE, read from the
   model's KV cache, because that is exactly what our cache stores: RoPE mixes channels d and
   d + D/2 differently at every position, so the maximum over positions of the rotated K is
   the statistic a per-channel scale needs (TensorRT-LLM measures the k_proj output before
   RoPE, per layer; a rotation can raise one component by up to sqrt(2)). V usually spans far
   less than K, and K has outlier channels: separate per-channel scales keep most channels'
   int8 grid fine where one per-layer scale would be set by the largest K outlier.

2. **Smoothing** (``smooth_unified``) on unified float tensors: per input channel j,
   s_j = max|X_j|^alpha / max|W_j|^(1-alpha), with max|W_j| over all rows that read the
   activation (q, k and v together; gate and up together). Then X/s times s*W is the same
   product with activations that are easier to quantize. 1/s is folded into the RMSNorm gain
   before qkv (``input_layernorm``) and before gate/up (``post_layernorm``); the inputs of
   ``attention.dense`` and ``mlp.proj`` have no norm to fold into, so they keep ``s`` as a
   ``smoother`` tensor that the W8A8 layer divides its input by.
"""
from __future__ import annotations

import functools
import os
from typing import Iterable, Optional

import torch

from .checkpoint import unified_to_hf
from .config import ConfigError, ModelArgs
from .prompts import build_summarize_prompt, load_cnn_dailymail

SYNTHETIC = "synthetic"
SYNTHETIC_LABEL = "synthetic (speed-only)"
DEFAULT_CALIB_SIZE = 512
DEFAULT_CALIB_LENGTH = 512          # TensorRT-LLM's calibration seq_len
# No dataset default here: the scripts decide where calibration data come from (the
# repository-relative ../shared copy when present) and pass the path; None = the hub.
DEFAULT_CALIB_DATASET: Optional[str] = None
_SCALE_MIN = 1e-5                   # floor on smoothing factors and weight maxima

# HF module (inside model.layers.{i}) whose *input* is recorded -> unified linear suffix.
_INPUT_HOOKS = {
    "self_attn.q_proj": "attention.qkv",
    "self_attn.o_proj": "attention.dense",
    "mlp.gate_proj": "mlp.fc",
    "mlp.up_proj": "mlp.gate",
    "mlp.down_proj": "mlp.proj",
}


# ---------------------------------------------------------------------------------------------
# Calibration prompts
# ---------------------------------------------------------------------------------------------
def synthetic_calibration_prompts(vocab_size: int, n: int = 8, length: int = 128,
                                  seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` uniform random token ids, for speed-only engines.

    Random weights have no meaningful activations to calibrate; these prompts only give the
    quantized engine plausible scale magnitudes. Label the result speed-only."""
    if n <= 0 or length <= 0:
        raise ConfigError(f"synthetic calibration needs n > 0 and length > 0 (got {n}, {length})")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, length), generator=gen).tolist()


def calibration_prompts(tokenizer, calib_dataset: Optional[str] = DEFAULT_CALIB_DATASET,
                        calib_size: int = DEFAULT_CALIB_SIZE,
                        max_input_length: int = DEFAULT_CALIB_LENGTH,
                        use_chat_template: bool = False) -> list[list[int]]:
    """Summarize prompts (``prompts.build_summarize_prompt``) of cnn_dailymail train articles.

    ``calib_dataset``: a .jsonl/.json/.parquet file or dataset folder (train split), or None
    for the hub's train split. Uses ``calib_size`` articles, or all there are when fewer."""
    if calib_size <= 0:
        raise ConfigError(f"--calib_size must be positive, got {calib_size}")
    records = load_cnn_dailymail(calib_dataset, split="train", limit=calib_size)
    return [build_summarize_prompt(r["article"], tokenizer, max_input_length, use_chat_template)
            for r in records]


# ---------------------------------------------------------------------------------------------
# Calibration: activation and KV maxima with forward hooks
# ---------------------------------------------------------------------------------------------
def hf_model_from_state_dict(args: ModelArgs, hf_sd: dict, device="cpu",
                             dtype: torch.dtype = torch.float32):
    """A transformers ``LlamaForCausalLM`` holding ``hf_sd`` (HF names), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**args.to_hf_config())
    # Built on the meta device and given our tensors (assign=True): no random init and no
    # second copy of the weights (LLaMA-7B calibrates on one GPU).
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in hf_sd.items()}
    if args.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError(f"state dict does not fit LlamaForCausalLM: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    # The RoPE tables are computed buffers, not weights: recompute them on the real device.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:
        raise ConfigError(f"calibration model has uninitialised tensors: {leftover[:3]}")
    return model.eval()


def _running_max(store: dict, key: str, x: torch.Tensor) -> None:
    """store[key] = elementwise max(store[key], max |x| over all but the last dim) in fp32."""
    m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
    store[key] = m if key not in store else torch.maximum(store[key], m)


@torch.no_grad()
def capture_stats(model, prompts: Iterable[list[int]], kv: bool = True, progress: bool = True
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``model`` (HF LlamaForCausalLM) over ``prompts`` one at a time (no padding to skew
    the maxima) -> (act_stats, kv_stats) keyed by unified prefix (module docstring)."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    act: dict[str, torch.Tensor] = {}
    kvmax: dict[str, torch.Tensor] = {}
    hooks = []

    def record_input(module, inputs, output, key):
        _running_max(act, key, inputs[0])

    for i, layer in enumerate(model.model.layers):
        for hf_name, suffix in _INPUT_HOOKS.items():
            mod = layer.get_submodule(hf_name)
            key = f"transformer.layers.{i}.{suffix}"
            hooks.append(mod.register_forward_hook(functools.partial(record_input, key=key)))
    prompts = list(prompts)
    it = prompts
    if progress:
        from tqdm import tqdm
        it = tqdm(prompts, desc="calibrating", unit="prompt")
    try:
        for ids in it:
            if not ids:
                continue
            x = torch.tensor([ids], dtype=torch.long, device=device)
            cache = DynamicCache(config=model.config) if kv else None
            model(input_ids=x, past_key_values=cache, use_cache=kv, logits_to_keep=1)
            if kv:
                for i, (k, v) in enumerate(_cache_layers(cache)):
                    # k, v: [1, Hkv, T, D]; k is post-RoPE, as our cache holds it. Max over the
                    # tokens per (head, channel) -> [Hkv*D], channel h*D + d as in our cache.
                    # K: RoPE turns each channel pair (d, d + D/2) by a position-dependent
                    # angle, so a channel can later reach its pair's norm, which rotation
                    # never changes: both channels of a pair get that norm's maximum, a bound
                    # that holds at positions calibration never saw.
                    kf = k.detach().float()
                    half = kf.shape[-1] // 2
                    pair = torch.sqrt(kf[..., :half] ** 2 + kf[..., half:] ** 2).amax(dim=2)
                    mk = torch.cat([pair, pair], dim=-1).reshape(-1).cpu()  # [Hkv*D]
                    mv = v.detach().abs().amax(dim=2).float().reshape(-1).cpu()
                    key = f"transformer.layers.{i}.attention"
                    new = torch.stack([mk, mv])  # [2, Hkv*D]
                    kvmax[key] = new if key not in kvmax else torch.maximum(kvmax[key], new)
    finally:
        for h in hooks:
            h.remove()
    if not act:
        raise ConfigError("calibration saw no tokens (all prompts empty)")
    for name, t in list(act.items()) + list(kvmax.items()):
        if not torch.isfinite(t).all():
            raise ConfigError(f"calibration produced non-finite maxima for {name}; calibrate "
                              "in float32 (--device cpu) or check the weights")
    return act, kvmax


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers DynamicCache, across versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def calibrate(args: ModelArgs, hf_sd: dict, prompts: list[list[int]], device="cpu",
              dtype: torch.dtype = torch.float32, kv: bool = True, progress: bool = True):
    """(act_stats, kv_stats) of the weights ``hf_sd`` (HF names) over ``prompts``."""
    model = hf_model_from_state_dict(args, hf_sd, device, dtype)
    try:
        return capture_stats(model, prompts, kv=kv, progress=progress)
    finally:
        del model


# ---------------------------------------------------------------------------------------------
# Smoothing on unified tensors
# ---------------------------------------------------------------------------------------------
def smoothing_factors(x_max: torch.Tensor, weights: list[torch.Tensor],
                      alpha: float) -> torch.Tensor:
    """s[K] = max|X_j|^alpha / max|W_j|^(1-alpha); W_j's max over the rows of all ``weights``."""
    w_max = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # [K]
    w_max = w_max.clamp(min=_SCALE_MIN)
    x = x_max.to(w_max.device).float()
    s = (x.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=_SCALE_MIN)
    if not torch.isfinite(s).all():
        raise ConfigError("smoothing factors are not finite; check the calibration statistics")
    return s


def smooth_unified(tensors: dict, args: ModelArgs, act_stats: dict, alpha):
    """Smooth unified float tensors -> (tensors, smoothed act_stats, smoothers).

    ``alpha``: one float for every layer, or {group prefix: alpha} as ``search_alphas`` returns
    (prefixes ``transformer.layers.{i}.`` + attention.qkv, mlp.fc (gate and up),
    attention.dense, mlp.proj).

    Returns new dicts (the inputs are not modified): weights and norm gains rescaled, the
    statistics of the smoothed activations (x_max / s, what static activation scales need),
    and ``smoothers`` {prefix of attention.dense / mlp.proj: s [K]}. With quantization off
    the network computes the same function (up to rounding)."""
    def alpha_of(prefix: str) -> float:
        a = alpha.get(prefix) if isinstance(alpha, dict) else alpha
        if a is None:
            raise ConfigError(f"SmoothQuant: no alpha for {prefix}")
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"SmoothQuant alpha must be in [0, 1], got {a} ({prefix})")
        return float(a)

    out = dict(tensors)
    stats = dict(act_stats)
    smoothers: dict[str, torch.Tensor] = {}

    def need(prefix: str) -> torch.Tensor:
        if prefix not in act_stats:
            raise ConfigError(f"no calibration statistics for {prefix}")
        return act_stats[prefix]

    for i in range(args.num_hidden_layers):
        p = f"transformer.layers.{i}."
        # q, k, v read the output of input_layernorm: fold 1/s into its gain.
        _fold_into_norm(out, stats, p + "input_layernorm.weight", [p + "attention.qkv"],
                        need(p + "attention.qkv"), alpha_of(p + "attention.qkv"))
        # gate (fc) and up (gate) read the output of post_layernorm.
        x = need(p + "mlp.fc")
        _fold_into_norm(out, stats, p + "post_layernorm.weight", [p + "mlp.fc", p + "mlp.gate"],
                        x, alpha_of(p + "mlp.fc"))
        # o_proj and down_proj: no norm in front; keep the smoother.
        for name in ("attention.dense", "mlp.proj"):
            prefix = p + name
            w = out[prefix + ".weight"]
            s = smoothing_factors(need(prefix), [w], alpha_of(prefix))
            out[prefix + ".weight"] = (w.float() * s[None, :]).to(w.dtype)
            smoothers[prefix] = s
            stats[prefix] = act_stats[prefix].float() / s.cpu()
    return out, stats, smoothers


def _fold_into_norm(out: dict, stats: dict, norm_name: str, prefixes: list[str],
                    x_max: torch.Tensor, alpha: float) -> None:
    ws = [out[p + ".weight"] for p in prefixes]
    s = smoothing_factors(x_max, ws, alpha)  # [K]
    g = out[norm_name]
    out[norm_name] = (g.float() / s).to(g.dtype)
    for p, w in zip(prefixes, ws):
        out[p + ".weight"] = (w.float() * s[None, :]).to(w.dtype)
        stats[p] = x_max.float() / s.cpu()


# ---------------------------------------------------------------------------------------------
# Per-layer alpha search (SmoothQuant's authors and TensorRT-LLM's ModelOpt search alpha too)
# ---------------------------------------------------------------------------------------------
SQ_SEARCH_ROWS = 4096      # calibration rows per linear kept for the search (prompts x tokens)
SQ_ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(2, 20))     # 0.10 .. 0.95
# smoothed group -> (unified linears reading one input, HF module whose input was captured)
SQ_GROUPS = (
    ("attention.qkv", ("attention.qkv",), "self_attn.q_proj"),
    ("mlp.fc", ("mlp.fc", "mlp.gate"), "mlp.gate_proj"),
    ("attention.dense", ("attention.dense",), "self_attn.o_proj"),
    ("mlp.proj", ("mlp.proj",), "mlp.down_proj"),
)


def _fake_int8(t: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    scale = (amax / 127.0).clamp_min(1e-12)
    return torch.round(t / scale).clamp_(-127, 127) * scale


def w8a8_output(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, per_token: bool,
                per_channel: bool, x_max: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What the W8A8 linear computes on float32 inputs x [T, K] after smoothing by s [K]:
    Q_act(x / s) @ Q_w(w * s)^T, with our SmoothQuantLinear's rounding (symmetric, +-127;
    dynamic per-token scales, or the static per-tensor one from calibrated ``x_max``)."""
    ws = w * s
    wq = _fake_int8(ws, ws.abs().amax(1, keepdim=True) if per_channel else ws.abs().amax())
    xs = x / s
    if per_token:
        xq = _fake_int8(xs, xs.abs().amax(1, keepdim=True))
    else:
        xq = _fake_int8(xs, (x_max.float() / s).amax())
    return xq @ wq.t()


def search_alpha(x: torch.Tensor, x_max: torch.Tensor, weights: list, per_token: bool = True,
                 per_channel: bool = True, grid=SQ_ALPHA_GRID) -> tuple[float, dict]:
    """The alpha of ``grid`` whose smoothing gives the lowest output error of the quantized
    layer, mean((x W^T - W8A8(x))^2), on calibration rows x [T, K] of the linears ``weights``
    (sharing that input; stacked) -> (alpha, {alpha: error})."""
    w = torch.cat([t.float() for t in weights])
    x = x.float()
    y = x @ w.t()
    errs = {}
    for a in grid:
        s = smoothing_factors(x_max, [w], a).to(x.device)
        errs[float(a)] = ((w8a8_output(x, w, s, per_token, per_channel, x_max) - y) ** 2
                          ).mean().item()
    best = min(errs, key=errs.get)
    return best, errs


def search_alphas(tensors: dict, args: ModelArgs, act_stats: dict, x_rows: dict,
                  per_token: bool = True, per_channel: bool = True, grid=SQ_ALPHA_GRID,
                  progress: bool = True) -> tuple[dict, dict]:
    """Per layer and smoothed group, the alpha minimising that group's quantized output error
    on calibration rows -> ({group prefix: alpha} for ``smooth_unified``, report {prefix:
    {alpha: error}}). ``x_rows``: {HF module name: input rows [T, K]} (``awq.capture_inputs``);
    ``act_stats``: the max |x| per channel that the smoothing itself uses."""
    alphas, report = {}, {}
    layers = range(args.num_hidden_layers)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="SmoothQuant alpha search", unit="layer")
    for i in layers:
        for group, linears, hf_mod in SQ_GROUPS:
            prefix = f"transformer.layers.{i}.{group}"
            rows = x_rows.get(f"model.layers.{i}.{hf_mod}")
            if rows is None or prefix not in act_stats:
                raise ConfigError(f"SmoothQuant alpha search has no calibration inputs for "
                                  f"{prefix}")
            ws = [tensors[f"transformer.layers.{i}.{n}.weight"] for n in linears]
            alphas[prefix], report[prefix] = search_alpha(rows, act_stats[prefix], ws,
                                                          per_token, per_channel, grid)
    return alphas, report


# ---------------------------------------------------------------------------------------------
# Convenience for build.py: calibrate a loaded checkpoint in one call
# ---------------------------------------------------------------------------------------------
def calibrate_source(args: ModelArgs, hf_sd: dict, tokenizer=None,
                     calib_dataset: Optional[str] = DEFAULT_CALIB_DATASET,
                     calib_size: int = DEFAULT_CALIB_SIZE,
                     max_input_length: int = DEFAULT_CALIB_LENGTH,
                     use_chat_template: bool = False, device=None,
                     dtype: Optional[torch.dtype] = None, kv: bool = True,
                     progress: bool = True, seed: int = 0):
    """-> (act_stats, kv_stats, info). ``calib_dataset == 'synthetic'`` (or no tokenizer) uses
    synthetic prompts and labels the result speed-only in ``info['source']``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.float32 if str(device).startswith("cpu") else torch.float16
    if calib_dataset == SYNTHETIC or tokenizer is None:
        n = min(calib_size, 16)
        prompts = synthetic_calibration_prompts(args.vocab_size, n, min(max_input_length, 256),
                                                seed)
        info = {"source": SYNTHETIC_LABEL, "speed_only": True}
    else:
        prompts = calibration_prompts(tokenizer, calib_dataset, calib_size, max_input_length,
                                      use_chat_template)
        where = calib_dataset or "cnn_dailymail 3.0.0 train (hub)"
        info = {"source": os.fspath(where), "speed_only": False,
                "use_chat_template": bool(use_chat_template)}
    info.update(num_prompts=len(prompts), max_input_length=max_input_length,
                num_tokens=sum(len(p) for p in prompts), dtype=str(dtype).replace("torch.", ""))
    act, kvs = calibrate(args, hf_sd, prompts, device, dtype, kv=kv, progress=progress)
    return act, kvs, info


def synthetic_calibration(args: ModelArgs, tensors: dict, device=None, n: int = 8,
                          length: int = 128, seed: int = 0, kv: bool = True,
                          progress: bool = True) -> dict:
    """Calibrate unified float ``tensors`` (random weights) on synthetic prompts.

    Returns ``{"act_stats": ..., "kv_stats": ...}`` to pass to ``quant.quantize_checkpoint``.
    The scales only have plausible magnitudes: engines made from them are speed-only."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if str(device).startswith("cpu") else torch.float16
    prompts = synthetic_calibration_prompts(args.vocab_size, n, length, seed)
    act, kvs = calibrate(args, unified_to_hf(tensors, args), prompts, device, dtype, kv=kv,
                         progress=progress)
    return {"act_stats": act, "kv_stats": kvs if kv else None}
