#!/usr/bin/env python3
"""Fast proxy of accuracy_table.py's top-1 column for weight/activation quantization choices.

One HF forward per dev article (SmolLM2, fp32, teacher-forced over the reference highlights, as
accuracy_table.py's prompts), with each mode's effective arithmetic put into the HF linears:
weight-only modes as their dequantized weights (AWQ's scales folded back: Q(W s) / s, the same
function as folding them into norms / v_proj / up_proj), SmoothQuant as fake-quantized W8A8
(``smoothquant.w8a8_output``). No INT8 KV cache. Top-1 agreement with the float model at every
highlight-token position. Minutes on one CPU core where the engine's CPU reference path takes
an hour per quantized row; use it to choose, then measure the chosen rows with
accuracy_table.py.

    python tools/quant_proxy.py --num_articles 10 --modes int8_pc,int8_g64,sq0.5,sq_auto
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
from types import SimpleNamespace

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from llama_engine import awq, smoothquant as sq  # noqa: E402
from llama_engine.gptq import dequantize_codes, fit_grid, gptq_zp, gram, refit_scales  # noqa: E402
from llama_engine.quant_int4 import quantize_int4_zp  # noqa: E402

MODES = ("int8_pc", "int8_g128", "int8_g64", "int8_awq_pc", "int8_awq_g128", "sq0.5",
         "sq_auto", "int4_g64_rtn", "int4_awq_g64", "int4_awq_g64_v", "int4_awq_g128_v",
         "int8_g32", "int4_gptq_g64", "int4_gptqa_g64", "int4_awq_gptq_g64",
         "int4_awq_gptqa_g64", "int4_gptq_g128", "int4_awq_gptq_g128", "int4_awq_gptqa_g128", "int8_gptq_g64",
         "int8_gptqa_g64", "fp8_w", "fp8_w_pc", "fp8_a_pt", "fp8_static", "fp8_pt", "fp8_pcpt")
# FP8 E4M3 fake quantization (issue 19): weights per tensor or per channel ("_pc"), activations
# none ("fp8_w*"), static per tensor from the calibration maxima ("fp8_static") or per token
# ("fp8_pt": per-tensor weights; "fp8_pcpt": per-channel weights; "fp8_a_pt": activations only)
FP8_MODES = {"fp8_w": (False, None), "fp8_w_pc": (True, None), "fp8_a_pt": (None, "token"),
             "fp8_static": (False, "static"), "fp8_pt": (False, "token"),
             "fp8_pcpt": (True, "token")}
GROUPS = (  # (HF linears sharing one input, module captured, smoothquant group)
    (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.q_proj"),
    (("self_attn.o_proj",), "self_attn.o_proj"),
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_proj"),
    (("mlp.down_proj",), "mlp.down_proj"),
)


def _log(msg):
    print(f"[quant_proxy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def weight_only(model, mode, x_mean, x_rows, cfg, skip=(), cfg_damp=0.01):
    """Replace the linears' weights by the mode's effective weights; linears whose HF name
    matches one of the fnmatch patterns ``skip`` keep their float weights (the checkpoint's
    ``exclude_modules``)."""
    refit = mode.endswith("_refit")  # and refit_scales on the final codes
    mode = mode[:-6] + "_fit" if refit else mode
    fit = mode.endswith("_fit")   # fit_grid's least-squares grids (then GPTQ or plain rounding)
    mode = mode[:-4] if fit else mode
    bits = 8 if mode.startswith("int8") else 4
    g = {"g128": 128, "g64": 64, "g32": 32}.get(mode.rsplit("_", 1)[-1], 0)
    zero = bits == 4 or "gptq" in mode
    search = "awq" in mode
    tie_o = mode.endswith("_v")  # o_proj scale folded into v_proj (KV heads tied)
    if bits == 8:
        tie_o = search
    if mode.endswith("_v"):
        g = {"int4_awq_g64_v": 64, "int4_awq_g128_v": 128}[mode]
    n_kv = cfg.num_key_value_heads
    rep = cfg.num_attention_heads // n_kv
    for i, layer in enumerate(model.model.layers):
        for names, cap in GROUPS:
            mods = [layer.get_submodule(n) for n in names]
            ws = [m.weight.data.float() for m in mods]
            key = f"model.layers.{i}.{cap}"
            s = torch.ones(ws[0].shape[1])
            if search:
                tie = (n_kv, rep) if (cap == "self_attn.o_proj" and tie_o) else None
                s, _ = awq.search_scale(torch.cat(ws), x_rows[key], x_mean[key], g, zero,
                                        bits=bits, tie=tie)
            hs = gram(x_rows[key] / s)
            for name, m, w in zip(names, mods, ws):
                if any(fnmatch.fnmatch(f"model.layers.{i}.{name}", pat) for pat in skip):
                    continue
                clip = None
                if bits == 4 and search and w.shape[1] % g == 0:
                    clip = awq.search_clip(w * s, hs, g)
                grid = None
                if fit:
                    _, s0, z0, _ = quantize_int4_zp(w * s, g, torch.float32, clip)
                    grid = fit_grid(w * s, hs, g, s0, z0, bits=bits)
                if "gptq" in mode or fit:  # GPTQ's rounding (act order: "gptqa")
                    q, sc, z = gptq_zp(w * s, hs, g, torch.float32, clip, bits=bits,
                                       act_order="gptqa" in mode, grid=grid,
                                       damp=cfg_damp if "gptq" in mode else 1e9)
                    if refit:
                        sc, z = refit_scales(w * s, hs, q, g, sc, z)
                    wq = dequantize_codes(q, sc, z, g)
                else:
                    wq = awq._qdq(w * s, g, zero, clip, bits=bits)
                m.weight.data = (wq / s).to(m.weight.dtype)


def _e4m3(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def fp8(model, mode, act_max):
    """Fake-quantize the linears as FP8 W8A8 (see FP8_MODES)."""
    per_channel, act = FP8_MODES[mode]
    for i, layer in enumerate(model.model.layers):
        for names, cap in GROUPS:
            key = f"model.layers.{i}.{cap}"
            for n in names:
                m = layer.get_submodule(n)
                w = m.weight.data.float()
                if per_channel is not None:
                    ws = (w.abs().amax(dim=1, keepdim=True) if per_channel else
                          w.abs().amax()).clamp_min(1e-12) / 448
                    w = _e4m3(w, ws)

                def fwd(x, w=w, xm=act_max[key].max()):
                    shape = x.shape
                    x2 = x.reshape(-1, shape[-1]).float()
                    if act == "token":
                        x2 = _e4m3(x2, x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448)
                    elif act == "static":
                        x2 = _e4m3(x2, xm.clamp_min(1e-12) / 448)
                    return (x2 @ w.t()).reshape(*shape[:-1], -1).to(x.dtype)
                m.forward = fwd


def smoothquant(model, alphas, act_max, x_rows, search):
    chosen = {}
    for i, layer in enumerate(model.model.layers):
        for names, cap in GROUPS:
            key = f"model.layers.{i}.{cap}"
            mods = [layer.get_submodule(n) for n in names]
            ws = [m.weight.data.float() for m in mods]
            a = alphas
            if search:
                a, _ = sq.search_alpha(x_rows[key], act_max[key], ws)
            chosen[key] = a
            s = sq.smoothing_factors(act_max[key], ws, a)
            for m, w in zip(mods, ws):
                def fwd(x, w=w, s=s, xm=act_max[key]):
                    shape = x.shape
                    y = sq.w8a8_output(x.reshape(-1, shape[-1]).float(), w, s, True, True, xm)
                    return y.reshape(*shape[:-1], -1).to(x.dtype)
                m.forward = fwd
    return chosen


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=os.path.expanduser(
        "~/.cache/llama_engine/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--dataset_path", default=os.path.join(
        os.path.dirname(REPO), "shared", "data", "cnn_dailymail", "test_dev.jsonl"))
    p.add_argument("--calib_dataset", default=os.path.join(
        os.path.dirname(REPO), "shared", "data", "cnn_dailymail", "train_calib.jsonl"))
    p.add_argument("--num_articles", type=int, default=10)
    p.add_argument("--calib_size", type=int, default=16)
    p.add_argument("--tokens_per_prompt", type=int, default=64)
    p.add_argument("--max_input_length", type=int, default=923)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gptq_damp", type=float, default=0.01,
                   help="GPTQ's dampening for the gptq modes (hf_llama_convert's default)")
    p.add_argument("--skip", action="append", default=[],
                   help="comma-separated fnmatch patterns of HF linears left in float for the "
                        "weight-only modes (repeatable: each value is one more run of every "
                        "mode), e.g. '*.down_proj' or 'model.layers.0.*'")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import accuracy_table as at
    from run_hf import load_hf_model
    from llama_engine.tokenizer import load_tokenizer
    ns = SimpleNamespace(gguf=a.gguf, dataset_path=a.dataset_path,
                         num_articles=a.num_articles, max_input_length=a.max_input_length)
    prompts, targets = at.teacher_forced_inputs(ns)
    model = load_hf_model(a.gguf, "float32", "cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = [at.hf_logprobs(model, pr, t) for pr, t in zip(prompts, targets)]
    tok = load_tokenizer(a.gguf)
    cal = sq.calibration_prompts(tok, a.calib_dataset, a.calib_size, 512, True)
    act_max: dict = {}
    x_mean, x_rows = awq.capture_inputs(model, cal, a.tokens_per_prompt, progress=False,
                                        maxima=act_max)
    _log(f"{len(prompts)} articles, {sum(len(t) for t in targets)} positions; calibration "
         f"{len(cal)} prompts x {a.tokens_per_prompt} rows")
    runs = [(m, tuple(sk.split(",")) if sk else ()) for sk in (a.skip or [""])
            for m in a.modes.split(",")]
    known = set(MODES) | {m + suf for m in MODES if m.startswith("int4")
                              for suf in ("_fit", "_refit")}
    bad = [m for m, _ in runs if m not in known]
    if bad:
        p.error(f"unknown modes {bad}")
    for mode, skip in runs:
        model.load_state_dict(state)
        for m in model.modules():
            m.__dict__.pop("forward", None)
        t0 = time.time()
        extra = ""
        if mode.startswith("sq"):
            chosen = smoothquant(model, 0.5, act_max, x_rows, mode == "sq_auto")
            if mode == "sq_auto":
                vals = sorted(chosen.values())
                extra = f" alpha median {vals[len(vals) // 2]} range {vals[0]}..{vals[-1]}"
        elif mode in FP8_MODES:
            fp8(model, mode, act_max)
        else:
            weight_only(model, mode, x_mean, x_rows, model.config, skip, a.gptq_damp)
            if skip:
                extra = f" (float: {','.join(skip)})"
        agree = n = 0
        for pr, t, r in zip(prompts, targets, ref):
            g, _, m = at.compare(r, at.hf_logprobs(model, pr, t))
            agree, n = agree + g, n + m
        print(f"{mode:18s} top-1 {100 * agree / n:6.2f}%  ({time.time() - t0:.0f} s){extra}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
