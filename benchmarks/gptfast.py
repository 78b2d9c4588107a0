"""gpt-fast as a baseline, in the same process and on the same weights as our engine.

gpt-fast (PyTorch team, https://github.com/pytorch-labs/gpt-fast, read at commit 32971d3:
model.py, generate.py, quantize.py) is a LLaMA written as plain PyTorch modules and made fast
by ``torch.compile``. This module is our own implementation of that design, not its code:

- the network: RMSNorm computed in fp32, one fused QKV linear, RoPE on interleaved pairs
  (Meta's layout; our checkpoint's rotate-half rows are permuted into it, as gpt-fast's
  converter does), grouped-query heads repeated and ``F.scaled_dot_product_attention`` with a
  boolean causal mask, SwiGLU feed-forward;
- a static KV cache of the maximum length, ``[B, Hkv, S, D]`` per layer, written by position;
- greedy generation split into a prefill (eager, as gpt-fast runs it unless asked to
  ``compile_prefill``, then ``torch.compile(dynamic=True)``) and a one-token decode step under
  ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs), decoded with the
  math attention backend so that inductor generates the attention;
- weight-only int8: int8 weights with one symmetric scale per output channel (absolute max
  over 127.5), ``F.linear(x, w.to(x.dtype)) * scales``;
- weight-only int4: asymmetric groups of 32/64/128/256 (``(q - 8) * scale + zero``, zero =
  group min + 8 * scale), packed by ``torch.ops.aten._convert_weight_to_int4pack`` into
  tinygemm's tensor-core layout and run by ``_weight_int4pack_mm``, whose CUDA kernel takes
  bfloat16 only: the whole int4 model is bfloat16, as gpt-fast's. Inputs whose width the
  kernel cannot tile are zero-padded to a multiple of 1024, as gpt-fast pads them. On the CPU
  (tests) the ``*_for_cpu`` twins of both ops run instead.

Every linear, the output projection included, is quantized, as gpt-fast's handlers do.
Timing follows gpt-fast's report: one generate call (prefill + decode) timed end to end after
warm-up, compile time reported apart. ``run_section`` times it and our engine's same mode
back to back on the same random weights and prompts (benchmark.py --gptfast).
"""
from __future__ import annotations

import functools
import itertools
import statistics
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llama_engine.config import ConfigError, ModelArgs
from llama_engine.model import rope_inv_freq
from llama_engine.names import layer_prefix

from .device import free_memory, peak_gib, random_prompts, reset_peak, sync
from .latency import time_engine
from .weights import Weights

MODES = ("fp16", "int8", "int4")
INT4_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8       # gpt-fast's default for the int4 layout
PAD_MULTIPLE = 1024     # gpt-fast pads an untileable input width up to this multiple


# -- quantization -----------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: -> (int8 [N, K], scales [N] in ``w``'s dtype)."""
    wf = w.float()
    scales = (wf.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(wf / scales[:, None]), -128, 127).to(torch.int8)
    return q, scales.to(w.dtype)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    """Asymmetric int4 per group of ``group`` inputs: -> (q int32 [N, K] in 0..15, scales,
    zeros [N, K/group] bfloat16) with w ~ (q - 8) * scale + zero."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scales = ((hi - lo).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (lo + scales.float() * 8).to(torch.bfloat16)
    base = zeros.float() - 8 * scales.float()
    q = ((g - base[..., None]) / scales.float()[..., None]).round().clamp(0, 15)
    return q.to(torch.int32).reshape(n, k), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group: int) -> torch.Tensor:
    """The float32 weights an int4 (q, scales, zeros) triple stands for."""
    n, k = q.shape
    g = (q.float().reshape(n, k // group, group) - 8) * scales.float()[..., None]
    return (g + zeros.float()[..., None]).reshape(n, k)


def _nibbles(q: torch.Tensor, high_first: bool) -> torch.Tensor:
    """int32 [N, K] in 0..15 -> uint8 [N, K/2], two values a byte (the CUDA packer's input)."""
    a, b = q[:, 0::2], q[:, 1::2]
    return ((a << 4 | b) if high_first else (b << 4 | a)).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _cuda_high_nibble_first(device: str) -> bool:
    """Which nibble the CUDA packer reads as the even column, found once per device by packing
    a small known matrix both ways (the byte order is not part of the op's documentation)."""
    n, k, g = 8, 16 * INNER_K_TILES, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
    sz = torch.stack([torch.ones(k // g, n), torch.full((k // g, n), 8.0)], dim=2)
    sz = sz.to(device=device, dtype=torch.bfloat16)        # w = (q - 8) * 1 + 8 = q
    eye = torch.eye(k, device=device, dtype=torch.bfloat16)
    for high_first in (True, False):
        packed = torch.ops.aten._convert_weight_to_int4pack(_nibbles(q, high_first),
                                                            INNER_K_TILES)
        got = torch.ops.aten._weight_int4pack_mm(eye, packed, g, sz)   # [k, n] = W^T
        if torch.equal(got.float().t(), q.float()):
            return high_first
    raise RuntimeError("torch's _convert_weight_to_int4pack + _weight_int4pack_mm did not give "
                       "back a known int4 matrix with either nibble order (scale 1, zero 8)")


def pack_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scales, zeros) -> (the kernel's packed weight, scales_and_zeros [K/g, N, 2])."""
    sz = torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous()
    if q.is_cuda:
        nib = _nibbles(q, _cuda_high_nibble_first(str(q.device)))
        return torch.ops.aten._convert_weight_to_int4pack(nib, INNER_K_TILES), sz
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), INNER_K_TILES), sz


# -- linears ----------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        q, s = quantize_int8(w)
        self.register_buffer("weight", q)
        self.register_buffer("scales", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


class Int4Linear(nn.Module):
    """tinygemm's int4 GEMM on gpt-fast's packed layout; the input is zero-padded where its
    width does not tile (K % group or K % (16 * inner k-tiles))."""

    def __init__(self, w: torch.Tensor, group: int, compute_dtype: torch.dtype):
        super().__init__()
        n, k = w.shape
        if n % 8:
            raise ConfigError(f"int4 needs out_features % 8 == 0, got {n}")
        self.in_features = k
        if k % group or k % (16 * INNER_K_TILES):
            k = -(-k // PAD_MULTIPLE) * PAD_MULTIPLE
            w = F.pad(w, (0, k - self.in_features))
        self.padded, self.out_features, self.group = k, n, group
        self.dtype = compute_dtype
        q, s, z = quantize_int4(w, group)
        packed, sz = pack_int4(q, s.to(compute_dtype), z.to(compute_dtype))
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", sz)
        self.mm = (torch.ops.aten._weight_int4pack_mm if w.is_cuda
                   else torch.ops.aten._weight_int4pack_mm_for_cpu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.dtype)
        if self.padded != self.in_features:
            x = F.pad(x, (0, self.padded - self.in_features))
        y = self.mm(x, self.weight, self.group, self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features)


def make_linear(w: torch.Tensor, mode: str, group: int, dtype: torch.dtype) -> nn.Module:
    if mode == "int8":
        return Int8Linear(w)
    if mode == "int4":
        return Int4Linear(w, group, dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


# -- the network ------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight, requires_grad=False), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_pairs(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, D] by table [S, D/2, 2]."""
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, xp.size(1), 1, xp.size(3), 2)
    cos, sin = t[..., 0], t[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin,
                       xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class StaticKV(nn.Module):
    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[:, :, pos] = k
        self.v[:, :, pos] = v
        return self.k, self.v


class Block(nn.Module):
    def __init__(self, args: ModelArgs, lin: dict, norms: tuple):
        super().__init__()
        self.wqkv, self.wo = lin["qkv"], lin["wo"]
        self.w1, self.w3, self.w2 = lin["w1"], lin["w3"], lin["w2"]
        self.attn_norm, self.ffn_norm = norms
        self.h, self.hkv, self.d = (args.num_attention_heads, args.num_key_value_heads,
                                    args.head_dim)
        self.kv: Optional[StaticKV] = None

    def attention(self, x, table, mask, pos):
        b, s, _ = x.shape
        q, k, v = self.wqkv(x).split([self.h * self.d, self.hkv * self.d,
                                      self.hkv * self.d], dim=-1)
        q = rope_pairs(q.view(b, s, self.h, self.d), table).transpose(1, 2)
        k = rope_pairs(k.view(b, s, self.hkv, self.d), table).transpose(1, 2)
        v = v.view(b, s, self.hkv, self.d).transpose(1, 2)
        k, v = self.kv.update(pos, k, v)
        rep = self.h // self.hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, s, self.h * self.d))

    def forward(self, x, table, mask, pos):
        x = x + self.attention(self.attn_norm(x), table, mask, pos)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class GPTFastLlama(nn.Module):
    """The network on a static cache: ``forward(tokens [B, S], pos [S]) -> logits [B, S, V]``
    in the model dtype."""

    def __init__(self, args: ModelArgs, embed, layers, norm, output, dtype):
        super().__init__()
        self.args, self.dtype = args, dtype
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers, self.norm, self.output = nn.ModuleList(layers), norm, output
        self.max_seq = 0

    def setup_caches(self, batch: int, max_seq: int) -> None:
        a, dev = self.args, self.embed.weight.device
        self.max_seq = -(-max_seq // 8) * 8
        for layer in self.layers:
            layer.kv = StaticKV(batch, a.num_key_value_heads, self.max_seq, a.head_dim,
                                self.dtype, dev)
        freqs = torch.outer(torch.arange(self.max_seq, dtype=torch.float32),
                            rope_inv_freq(a)).to(dev)
        self.table = torch.stack([freqs.cos(), freqs.sin()], dim=-1).to(self.dtype)
        self.causal = torch.tril(torch.ones(self.max_seq, self.max_seq, dtype=torch.bool,
                                            device=dev))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        mask, table = self.causal[None, None, pos], self.table[pos]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, table, mask, pos)
        return self.output(self.norm(x))


def interleave_rope_rows(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection from the rotate-half layout (HF, our checkpoint) to
    interleaved pairs (Meta, gpt-fast): per head, row i and row i + D/2 become 2i and 2i+1."""
    return w.view(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(heads * head_dim, -1)


def from_unified(tensors: dict, args: ModelArgs, mode: str = "fp16", group: int = 128,
                 dtype: Optional[torch.dtype] = None) -> GPTFastLlama:
    """Our unified checkpoint's float tensors -> the network in gpt-fast's layout, quantized
    as ``mode`` says. ``dtype``: the model's (default: the tensors'; int4 on CUDA forces
    bfloat16, the only dtype its kernel takes)."""
    if mode not in MODES:
        raise ConfigError(f"gpt-fast baseline mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "int4" and group not in INT4_GROUPS:
        raise ConfigError(f"gpt-fast int4 group size {group}: one of {INT4_GROUPS}")
    embed = tensors["transformer.vocab_embedding.weight"]
    dtype = dtype or embed.dtype
    if mode == "int4" and embed.is_cuda:
        dtype = torch.bfloat16
    cast = functools.partial(torch.Tensor.to, dtype=dtype)
    lin = functools.partial(make_linear, mode=mode, group=group, dtype=dtype)
    h, hkv, d, eps = (args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                      args.norm_epsilon)
    layers = []
    for i in range(args.num_hidden_layers):
        p = layer_prefix(i)
        q, k, v = cast(tensors[p + "attention.qkv.weight"]).split(
            [args.q_size, args.kv_size, args.kv_size])
        qkv = torch.cat([interleave_rope_rows(q, h, d), interleave_rope_rows(k, hkv, d), v])
        mods = {"qkv": lin(qkv), "wo": lin(cast(tensors[p + "attention.dense.weight"])),
                "w1": lin(cast(tensors[p + "mlp.fc.weight"])),      # gate (activated)
                "w3": lin(cast(tensors[p + "mlp.gate.weight"])),    # up
                "w2": lin(cast(tensors[p + "mlp.proj.weight"]))}
        norms = (RMSNorm(cast(tensors[p + "input_layernorm.weight"]), eps),
                 RMSNorm(cast(tensors[p + "post_layernorm.weight"]), eps))
        layers.append(Block(args, mods, norms))
    out_w = tensors.get("lm_head.weight", embed)
    return GPTFastLlama(args, cast(embed), layers,
                        RMSNorm(cast(tensors["transformer.ln_f.weight"]), eps),
                        lin(cast(out_w)), dtype).eval()


# -- generation -------------------------------------------------------------------------------

def _prefill(model: GPTFastLlama, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model(tokens, pos)[:, -1].argmax(-1, keepdim=True)


def _decode_one(model: GPTFastLlama, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model(token, pos)[:, -1].argmax(-1, keepdim=True)


class Generator:
    """Greedy generation the way gpt-fast runs it. ``compile``: the decode step under
    ``torch.compile(mode="reduce-overhead", fullgraph=True)``; ``compile_prefill``: the
    prefill too (``dynamic=True``), gpt-fast's optional flag (off by default there)."""

    def __init__(self, model: GPTFastLlama, compile: bool = True, compile_prefill: bool = False):
        self.model = model
        self.prefill, self.decode = _prefill, _decode_one
        if compile:
            torch._inductor.config.coordinate_descent_tuning = True   # as gpt-fast sets it
            self.decode = torch.compile(_decode_one, mode="reduce-overhead", fullgraph=True)
            if compile_prefill:
                self.prefill = torch.compile(_prefill, fullgraph=True, dynamic=True)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
        """prompt [B, T] -> (tokens [B, new_tokens], prefill seconds)."""
        dev = prompt.device
        b, t = prompt.shape
        kv = self.model.layers[0].kv
        if kv is None or kv.k.shape[0] != b or self.model.max_seq < t + new_tokens:
            self.model.setup_caches(b, t + new_tokens)
        t0 = time.perf_counter()
        tok = self.prefill(self.model, prompt, torch.arange(t, device=dev)).clone()
        sync(dev)
        prefill_s = time.perf_counter() - t0
        out = [tok]
        pos = torch.tensor([t], device=dev, dtype=torch.int64)
        with sdpa_kernel(SDPBackend.MATH):
            for _ in range(new_tokens - 1):
                tok = self.decode(self.model, tok, pos).clone()
                pos += 1
                out.append(tok)
        return torch.cat(out, dim=1), prefill_s


def time_generator(gen: Generator, prompts: list, output_len: int, reps: int = 3) -> dict:
    """gpt-fast's measurement: generate calls after warm-up (the first, compiling, is
    ``compile_s``; a second records the CUDA graphs); median latency of ``reps`` calls."""
    dev = gen.model.embed.weight.device
    x = torch.tensor(prompts, device=dev)
    t0 = time.perf_counter()
    tokens, _ = gen.generate(x, output_len)
    sync(dev)
    compile_s = time.perf_counter() - t0
    gen.generate(x, output_len)
    reset_peak(dev)
    lat, pre = [], []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        tokens, p = gen.generate(x, output_len)
        sync(dev)
        lat.append(time.perf_counter() - t0)
        pre.append(p)
    latency, prefill = statistics.median(lat), statistics.median(pre)
    batch = len(prompts)
    return {"latency_s": latency, "prefill_s": prefill,
            "decode_tok_s": batch * (output_len - 1) / max(latency - prefill, 1e-9),
            "e2e_tok_s": batch * output_len / latency, "compile_s": compile_s,
            "peak_mem_gib": peak_gib(dev), "dtype": str(gen.model.dtype).split(".")[-1],
            "tokens": tokens.tolist()}


def agreement(a: list, b: list) -> dict:
    """Greedy tokens of two systems: the share of equal positions, and the first position
    where any row differs (the length of the common prefix)."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(min(len(ra), len(rb)) for ra, rb in zip(a, b))
    prefix = min(next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y),
                      min(len(ra), len(rb))) for ra, rb in zip(a, b))
    return {"token_agreement": same / max(total, 1), "common_prefix": prefix}


def _time_gptfast(weights: Weights, mode: str, prompts: list, output_len: int, group: int,
                  compile_prefill: bool) -> dict:
    """gpt-fast's side of a row; a failure (a compile error, a kernel refusing a shape) is
    reported in the row, not fatal, so that the other rows and our side still run."""
    dev = weights.device
    try:
        model = from_unified(weights.tensors, weights.args, mode, group)
        gen = Generator(model, compile=torch.device(dev).type == "cuda",
                        compile_prefill=compile_prefill)
        r = time_generator(gen, prompts, output_len)
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else ""
        r = {"error": f"{type(e).__name__}: {first}"[:300]}
        print(f"gpt-fast {mode} failed: {r['error']}", flush=True)
    model = gen = None
    torch._dynamo.reset()
    free_memory(dev)
    r["label"] = f"gpt-fast {mode}" + (f" g{group}" if mode == "int4" else "")
    return r


def measure_row(weights: Weights, mode: str, batch: int, input_len: int, output_len: int,
                group: int, compile_prefill: bool) -> dict:
    """gpt-fast's harness, then our engine's same mode, on the same weights and prompts."""
    prompts = random_prompts(batch, input_len, weights.args.vocab_size)
    g = _time_gptfast(weights, mode, prompts, output_len, group, compile_prefill)
    eng = weights.engine(mode, batch, max(input_len, 8), max(output_len, 8), group_size=group)
    eng.enable_cuda_graphs()
    ours = time_engine(eng, batch, input_len, output_len)
    ours_tokens = eng.generate(prompts, output_len).output_ids
    del eng
    free_memory(weights.device)
    row = {"gptfast": g, "ours": ours}
    if "error" not in g:
        row["ours_speedup"] = g["latency_s"] / ours["latency_s"]
        row.update(agreement(ours_tokens, g.pop("tokens")))
    return row


def run_section(weights: Weights, modes: list, batches: list, input_lens: list,
                output_lens: list, group: int = 128, compile_prefill: bool = False,
                save=lambda rows: None) -> dict:
    """``measure_row`` for every (mode, batch, input, output); ``group`` is both sides' int4
    group size. -> {row key: {"gptfast", "ours", "ours_speedup", "token_agreement",
    "common_prefix"}}; each row is passed to ``save`` as it is measured."""
    rows = {}
    for mode, B, I, O in itertools.product(modes, batches, input_lens, output_lens):
        key = f"{mode} b{B} i{I} o{O}"
        if weights.name != "llama-7b":
            key = f"{weights.name} {key}"
        row = measure_row(weights, mode, B, I, O, group, compile_prefill)
        g, o = row["gptfast"], row["ours"]
        print(key, f"gpt-fast {g.get('latency_s', float('nan')):.4f} s, ours "
              f"{o['latency_s']:.4f} s,", {k: v for k, v in row.items()
                                          if k not in ("gptfast", "ours")}, flush=True)
        rows[key] = row
        save({key: row})
    return rows
