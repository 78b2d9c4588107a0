"""AWQ calibration: activation-aware per-channel scales for int4 and int8 weight-only (Lin et al.
2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
arXiv:2306.00978), in TensorRT-LLM's W4A16_AWQ layout (int4) or folded into W8A16 /
W8A16_GPTQ weights (int8).

What is implemented (and what is not):

* The scale search of the paper (its Sec. 3.2): for every group of linears that share one
  input (q/k/v; gate/up; o_proj; down_proj) the input channels are scaled by
  s = s_x ** alpha, s_x the mean |x| per channel over the calibration tokens, normalised to
  a geometric mean of 1; alpha is searched on a grid of ``n_grid`` points in [0, 1) minimising
  the group's output error || X W^T - (X / s) Q(W s)^T ||^2 on the calibration tokens
  (alpha = 0 is plain round to nearest, so the search never does worse than RTN on them).
  The same grid is also searched for s = s_x ** alpha / s_w ** (1 - alpha), s_w the mean
  |w| per input channel of the row-normalised weight (the weight-aware form later AWQ
  releases offer); the better form and alpha win.
* Folding: into the preceding RMSNorm gain where there is one (q/k/v, gate/up: gain / s,
  weights * s). o_proj and down_proj: either TensorRT-LLM's ``prequant_scaling_factor`` = 1 / s
  multiplied into the input at run time (int4 W4A16_AWQ, the default there), or the paper's
  folding into the output rows of v_proj and up_proj (``fold_prev``; the default for int8,
  whose formats have no pre-quant scale): exact, because attention is linear in V per channel
  and SwiGLU in up's output; under grouped-query attention o_proj's scale is tied over the q
  heads that share one KV head.
* The clipping search (the paper's auto-clip), for zero-point int4 formats whose group size
  divides the input width: per weight group a shrink factor of the [min, max] range on a grid,
  minimising that group's contribution to the output error on the calibration tokens.
* Not implemented: the block-by-block pass with quantized earlier blocks (all inputs are
  captured from one float forward pass), the loss on the whole attention / MLP block output
  (ours is each linear group's output), and AWQ's own kernels/packing (the result is our
  int4 format, or AutoAWQ's through ``formats/awq.py``).

Calibration inputs come from the float model through forward hooks, on the summarize prompt
builder's prompts (``smoothquant.calibration_prompts``).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from .config import ConfigError, ModelArgs, QuantConfig
from .gptq import gram
from .quant import (dequantize_int4, dequantize_int8_per_channel, quantize_int4,
                    quantize_int8_per_channel)
from .quant_int4 import quantize_int4_zp
from .quant_int8 import quantize_int8_group
from .kernels.int4_zp import dequantize_w4_zp
from .kernels.int8_group import dequantize_w8_group

# (unified linears sharing one input, HF module whose input is captured, norm to fold into)
AWQ_GROUPS = (
    (("attention.qkv",), "self_attn.q_proj", "input_layernorm"),
    (("attention.dense",), "self_attn.o_proj", None),
    (("mlp.fc", "mlp.gate"), "mlp.gate_proj", "post_layernorm"),
    (("mlp.proj",), "mlp.down_proj", None),
)
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))   # 1.0 .. 0.55


def capture_inputs(model, prompts: Iterable[list[int]], tokens_per_prompt: int = 64,
                   progress: bool = True, seed: int = 0, maxima: Optional[dict] = None
                   ) -> tuple[dict, dict]:
    """Run the float HF model on ``prompts``; -> ({hf module: mean |x| per channel [K]},
    {hf module: sampled input rows [T, K] float32}), ``tokens_per_prompt`` rows a prompt.
    ``maxima``: a dict to fill with {hf module: max |x| per channel [K]} (SmoothQuant's
    statistic, for its alpha search)."""
    names = [f"model.layers.{i}.{m}" for i in range(len(model.model.layers))
             for _, m, _ in AWQ_GROUPS]
    mods = dict(model.named_modules())
    sums: dict = {}
    counts: dict = {}
    samples: dict = {n: [] for n in names}
    gen = torch.Generator().manual_seed(seed)

    def hook(module, inputs, output, key):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        sums[key] = sums.get(key, 0) + x.abs().sum(0).cpu()
        counts[key] = counts.get(key, 0) + x.shape[0]
        if maxima is not None:
            m = x.abs().amax(0).cpu()
            maxima[key] = m if key not in maxima else torch.maximum(maxima[key], m)
        take = torch.randperm(x.shape[0], generator=gen)[:tokens_per_prompt]
        samples[key].append(x[take.to(x.device)].cpu())

    handles = [mods[n].register_forward_hook(lambda m, i, o, k=n: hook(m, i, o, k))
               for n in names]
    prompts = list(prompts)
    it = prompts
    if progress:
        from tqdm import tqdm
        it = tqdm(prompts, desc="AWQ calibration", unit="prompt")
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for p in it:
                model(torch.tensor([p], device=dev))
    finally:
        for h in handles:
            h.remove()
    mean = {n: sums[n] / counts[n] for n in names}
    return mean, {n: torch.cat(samples[n]) for n in names}


def _qdq(w: torch.Tensor, group: int, zero: bool, clip: Optional[torch.Tensor] = None,
         bits: int = 4):
    """Quantize then dequantize w [N, K] (float32) in the target format (``bits`` 8: per-channel
    symmetric int8 for group 0, group-wise int8 with zeros otherwise)."""
    if bits == 8:
        if group:
            q, s, z, _ = quantize_int8_group(w, group, torch.float32)
            return dequantize_w8_group(q, s, z, group)
        q, s, _ = quantize_int8_per_channel(w, torch.float32)
        return dequantize_int8_per_channel(q, s)
    if zero:
        p, s, z, _ = quantize_int4_zp(w, group, torch.float32, clip)
        return dequantize_w4_zp(p, s, z, group)
    p, s, _ = quantize_int4(w, group or None, torch.float32)
    return dequantize_int4(p, s, group or None)


def _out_err(e: torch.Tensor, h: torch.Tensor) -> float:
    """mean over inputs and rows of (x . e_n)^2 for weight error e [N, K] and h = gram(x)."""
    e = e.double()
    return ((e @ h) * e).sum().item() / max(1, e.shape[0])


def search_scale(w: torch.Tensor, x: Optional[torch.Tensor], x_mean: torch.Tensor, group: int,
                 zero: bool, n_grid: int = 20, bits: int = 4,
                 tie: Optional[tuple] = None, duo: bool = True,
                 h: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
    """-> (s [K], {"alpha", "form", "rtn_err", "awq_err"}) for weight w [N, K] (all linears
    sharing the input, stacked) and calibration inputs x [T, K]: the paper's grid search over
    alpha of s = mean|x|^alpha and, with ``duo``, also of s = mean|x|^alpha / mean|w|^(1-alpha)
    (mean|w| per input channel of the row-normalised weight), keeping whichever form and alpha
    give the lowest output error. ``tie`` = (kv heads, q heads per kv head): s equal over the q
    heads sharing one KV head (o_proj's scale folded into v_proj's rows under GQA).
    ``h``: gram(x) when the caller has it (x is then not read)."""
    w = w.float()
    h = gram(x) if h is None else h
    xm = x_mean.float().clamp_min(1e-8)
    wm = (w.abs() / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).mean(0).clamp_min(1e-8)
    best = None
    rtn_err = None
    forms = ("x", "xw") if duo else ("x",)
    for form in forms:
        for i in range(n_grid):
            alpha = i / n_grid
            if form == "xw" and i == 0:
                continue  # 1 / mean|w|: no activation awareness
            s = xm ** alpha if form == "x" else xm ** alpha / wm ** (1 - alpha)
            if tie is not None:
                s = _tie(s, *tie)
            s = s / (s.max() * s.min()).sqrt()
            wq = _qdq(w * s, group, zero, bits=bits) / s
            err = _out_err(wq - w, h)
            if rtn_err is None:
                rtn_err = err
            if best is None or err < best[0]:
                best = (err, alpha, s, form)
    return best[2], {"alpha": best[1], "form": best[3], "rtn_err": rtn_err, "awq_err": best[0]}


def _tie(s: torch.Tensor, n_kv: int, rep: int) -> torch.Tensor:
    """s [Hq*D] -> geometric mean over the ``rep`` q heads of each KV head, expanded back."""
    d = s.numel() // (n_kv * rep)
    g = s.reshape(n_kv, rep, d).log().mean(1, keepdim=True).exp()
    return g.expand(n_kv, rep, d).reshape(-1)


def input_grams(args: ModelArgs, x_rows: dict) -> dict:
    """{linear prefix: gram of its captured inputs [K, K]} for every quantized linear (one
    matrix shared by the linears of a group): GPTQ's Hessians without AWQ's scaling."""
    out = {}
    for i in range(args.num_hidden_layers):
        for linears, hf_mod, _ in AWQ_GROUPS:
            h = gram(x_rows[f"model.layers.{i}.{hf_mod}"])
            for n in linears:
                out[f"transformer.layers.{i}.{n}"] = h
    return out


def search_clip(w: torch.Tensor, h: torch.Tensor, group: int) -> torch.Tensor:
    """Per (row, group) shrink factor of the range [N, K/G] minimising that group's output
    error on the inputs whose gram matrix is h [K, K] (zero-point formats; the paper's
    auto-clip): a group's error is e H_gg e^T with H_gg its diagonal block of h."""
    n, k = w.shape
    g = group or k
    hb = torch.stack([h[j:j + g, j:j + g] for j in range(0, k, g)])    # [K/G, G, G]
    best_err = best = None
    for r in CLIP_RATIOS:
        clip = torch.full((n, k // g), r)
        e = (_qdq(w, g, True, clip) - w).double().reshape(n, k // g, g)
        err = torch.einsum("ngi,gij,ngj->ng", e, hb, e)                    # [N, K/G]
        if best is None:
            best_err, best = err, clip
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, clip, best)
    return best


# scale without a norm in front -> (linear whose output rows it folds into, first row there)
_FOLD_INTO = {"attention.dense": "attention.qkv", "mlp.proj": "mlp.gate"}


def apply_awq(tensors: dict, args: ModelArgs, quant: QuantConfig, x_mean: dict, x_rows: dict,
              n_grid: int = 20, clip: bool = True, progress: bool = True,
              fold_prev: Optional[bool] = None, hessians: Optional[dict] = None
              ) -> tuple[dict, dict, dict, dict]:
    """Scale unified float ``tensors`` as AWQ's search says; -> (tensors, pre_quant_scales
    {linear prefix: 1/s} for ``quantize_checkpoint``, clip factors {prefix: [N, K/G]},
    report {prefix: {"alpha", "form", "rtn_err", "awq_err"}}). The input dict is not modified.

    ``fold_prev``: fold the scales of o_proj and down_proj into the output rows of v_proj and
    up_proj (the paper's way: exact, since attention is linear in V per channel and SwiGLU in
    up's output; o_proj's scale is tied over the q heads sharing a KV head) instead of
    TensorRT-LLM's ``prequant_scaling_factor``. Default: only for formats without that tensor
    (int8 weight-only); the rows' scaling does not change their round to nearest (each row's
    scales scale with it).

    ``hessians``: a dict to fill with {linear prefix: gram of its scaled inputs [K, K]}, the
    Hessian GPTQ's rounding needs afterwards (``gptq.py``; AWQ scales + GPTQ rounding)."""
    wo = quant.weight_only
    if wo not in ("int4", "int8"):
        raise ConfigError("AWQ applies to int4 / int8 weight-only")
    bits = 8 if wo == "int8" else 4
    g, zero = quant.group_size if quant.quant_algo != "W8A16" else 0, quant.int4_zero_point
    if fold_prev is None:
        fold_prev = bits == 8
    n_kv = args.num_key_value_heads
    rep_q = args.num_attention_heads // n_kv
    out = dict(tensors)
    pqs, clips, report = {}, {}, {}
    layers = range(args.num_hidden_layers)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="AWQ scale search", unit="layer")
    for i in layers:
        for linears, hf_mod, norm in AWQ_GROUPS:
            key = f"model.layers.{i}.{hf_mod}"
            if key not in x_rows:
                raise ConfigError(f"AWQ calibration has no inputs for {key}")
            prefixes = [f"transformer.layers.{i}.{n}" for n in linears]
            ws = [out[p + ".weight"] for p in prefixes]
            dtype = ws[0].dtype
            tie = (n_kv, rep_q) if fold_prev and linears == ("attention.dense",) else None
            h = gram(x_rows[key])
            s, rep = search_scale(torch.cat([w.float() for w in ws]), None, x_mean[key],
                                  g, zero, n_grid, bits=bits, tie=tie, h=h)
            hs = h / (s.double()[:, None] * s.double()[None, :])   # the inputs x / s
            for p, w in zip(prefixes, ws):
                scaled = w.float() * s
                out[p + ".weight"] = scaled.to(dtype)
                if clip and zero and w.shape[1] % (g or w.shape[1]) == 0:
                    clips[p] = search_clip(scaled, hs, g)
                if hessians is not None:
                    hessians[p] = hs
                report[p] = rep
            if norm is not None:
                nk = f"transformer.layers.{i}.{norm}.weight"
                out[nk] = (out[nk].float() / s).to(out[nk].dtype)
            elif fold_prev:
                _fold_rows(out, f"transformer.layers.{i}.{_FOLD_INTO[linears[0]]}", s, args,
                           rep_q)
            else:
                for p in prefixes:
                    pqs[p] = (1.0 / s)
    return out, pqs, clips, report


def _fold_rows(out: dict, prefix: str, s: torch.Tensor, args: ModelArgs, rep_q: int) -> None:
    """Divide the output rows of ``prefix`` that produce the scaled input by s: v_proj's rows
    of the fused qkv (s taken at one q head per KV head: it is tied), or up_proj's rows."""
    w = out[prefix + ".weight"]
    wf = w.float().clone()
    if prefix.endswith("attention.qkv"):
        d = args.head_dim
        sv = s.reshape(args.num_key_value_heads, rep_q, d)[:, 0, :].reshape(-1)
        v0 = args.q_size + args.kv_size
        wf[v0:] = wf[v0:] / sv[:, None]
    else:
        wf = wf / s[:, None]
    out[prefix + ".weight"] = wf.to(w.dtype)
