"""The LLaMA network of our PyTorch engine (LLaMA 1/2/3, SmolLM2, Mistral-style GQA).

Pre-norm decoder (Touvron et al. 2023): RMSNorm -> attention with rotary position embeddings
(RoPE, rotate-half layout as in Hugging Face; ``rope_theta`` and LLaMA-3 ``rope_scaling``) ->
residual -> RMSNorm -> SwiGLU MLP -> residual. Multi-head, grouped-query and multi-query
attention share one code path (``num_key_value_heads`` <= ``num_attention_heads``).

The network runs on a *flat* batch: ``tokens[N]`` from several sequences with an
``AttentionMeta`` saying where each belongs, and an explicit ``KVCache``. Linear layers are
whatever ``llama_engine.quant.make_linear`` builds from the checkpoint tensors (float,
weight-only int8/int4, SmoothQuant W8A8): the network never branches on quantization.

o_proj, gate_up and down_proj are called with ``partials=True``: their output may be a sum not
yet taken (``ops.PartialSum``: split-K slices, or under tensor parallelism a pending
all-reduce), which the next op, ``add_rms_norm`` / ``silu_mul``, takes while loading instead
of a separate launch. The network hands it on and never looks inside.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from . import names
from . import parallel
from .attention import AttentionMeta, paged_attention
from .config import ConfigError, ModelArgs, QuantConfig
from .kernels import ops
from .kv_cache import KVCache
from .quant import make_linear as default_make_linear


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, as Hugging Face computes them (incl. llama3 scaling)."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = args.rope_scaling
    if not s:
        return inv
    if s["rope_type"] == "linear":
        return inv / float(s["factor"])
    # LLaMA 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(args: ModelArgs, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, D/2] in fp32."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), rope_inv_freq(args))
    return freqs.cos(), freqs.sin()


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, qkv_proj: nn.Module, o_proj: nn.Module):
        super().__init__()
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        self.split = [args.q_size, args.kv_size, args.kv_size]
        self.softmax_scale = 1.0 / math.sqrt(args.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMeta, cache_layer, rope):
        """-> o_proj output [n, hidden], a tensor or PartialSum (for add_rms_norm)."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(n, self.n_heads, self.head_dim)
        k = k.view(n, self.n_kv_heads, self.head_dim)
        v = v.view(n, self.n_kv_heads, self.head_dim)
        k_cache, v_cache, kv_scale = cache_layer
        if meta.is_decode:
            # Decode reads every K from the cache: RoPE of q and k, the cache write and the
            # attention in one kernel on CUDA (two launches a layer less than apply_rope,
            # write_kv, decode_attention).
            out = ops.rope_decode_attention(q, k, v, meta.positions, *rope, k_cache, v_cache,
                                            meta.slot_mapping, meta.block_tables,
                                            meta.context_lens, self.softmax_scale, kv_scale)
        else:
            q, k = ops.apply_rope(q, k, meta.positions, *rope)
            out = paged_attention(q, k, v, meta, k_cache, v_cache, kv_scale, self.softmax_scale)
        return self.o_proj(out.reshape(n, self.n_heads * self.head_dim), partials=True)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    ``gate_up_proj`` computes [gate; up] in one GEMM (one launch, one pass over x) when the
    two linears' tensors can be stacked (``fuse_gate_up``); otherwise ``gate_up_proj`` is a
    pair (gate_proj, up_proj). ``width`` is gate's output width. With the stacked GEMM,
    ``silu_mul`` sums gate_up's split-K partials as it loads them. The output (down_proj's)
    is a tensor or a PartialSum, for the next ``add_rms_norm``."""

    def __init__(self, gate_up_proj, width: int, down_proj: nn.Module):
        super().__init__()
        if isinstance(gate_up_proj, tuple):
            self.gate_proj, self.up_proj = gate_up_proj
            self.gate_up_proj = None
        else:
            self.gate_up_proj = gate_up_proj
        self.width, self.down_proj = width, down_proj

    def forward(self, x: torch.Tensor):
        if self.gate_up_proj is not None:
            h = ops.silu_mul(self.gate_up_proj(x, partials=True))
            return self.down_proj(h, partials=True)
        h = nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h, partials=True)


def fuse_gate_up(gate: dict[str, torch.Tensor], up: dict[str, torch.Tensor]
                 ) -> Optional[dict[str, torch.Tensor]]:
    """Checkpoint tensors of one linear computing [gate; up] (output rows stacked), or None
    when the two cannot share one module (e.g. different per-tensor scales)."""
    if gate.keys() != up.keys():
        return None
    out = {}
    for name, g in gate.items():
        u = up[name]
        if g.shape != u.shape or g.dtype != u.dtype:
            return None
        if name == "weight" or (name == "per_channel_scale" and g.dim() == 1):
            out[name] = torch.cat([g, u], dim=0)            # [N, ...] rows
        elif name in ("weights_scaling_factor", "zero") or (name == "per_channel_scale"
                                                   and g.shape[-1] > 1):
            out[name] = torch.cat([g, u], dim=-1)           # [.., N] columns
        elif torch.equal(g, u):                             # same input: shared scales
            out[name] = g
        else:
            return None
    return out


class TransformerBlock(nn.Module):
    """Pre-norm block. The residual stream travels beside the hidden state so that each
    residual add is fused into the following RMSNorm (``ops.add_rms_norm``)."""

    def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(self, x, residual, meta, cache_layer, rope):
        """-> (this block's output, residual stream before it); their sum is the new stream."""
        if residual is None:
            residual, h = x, self.attn_norm(x)
        else:
            h, residual = ops.add_rms_norm(x, residual, self.attn_norm.weight, self.attn_norm.eps)
        h = self.attn(h, meta, cache_layer, rope)
        h, residual = ops.add_rms_norm(h, residual, self.mlp_norm.weight, self.mlp_norm.eps)
        return self.mlp(h), residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, embed: torch.Tensor, layers: list[TransformerBlock],
                 norm: RMSNorm, lm_head: nn.Module, max_positions: int):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        cos, sin = rope_tables(args, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def max_positions(self) -> int:
        return self.rope_cos.shape[0]

    def forward(self, tokens: torch.Tensor, meta: AttentionMeta, cache: KVCache,
                all_logits: bool = False) -> torch.Tensor:
        """tokens int64[N] -> fp32 logits [len(logits_indices), V] (or [N, V] with all_logits)."""
        x, residual = self.embed(tokens), None
        rope = (self.rope_cos, self.rope_sin)
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, meta, cache.layer(i), rope)
        if not all_logits and meta.logits_indices is not None:
            idx = meta.logits_indices
            x = x[idx]                      # a PartialSum selects its rows unsummed
            residual = residual[idx]
        x, _ = ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        return self.lm_head(x).float()

    # -- construction from checkpoint tensors --------------------------------------------------
    @classmethod
    def from_checkpoint(cls, args: ModelArgs, quant: QuantConfig,
                        tensors: dict[str, torch.Tensor], max_positions: int,
                        make_linear: Optional[Callable] = None, tp_rank: int = 0,
                        tp_size: int = 1, parallel_embedding: bool = False) -> "Transformer":
        """Build the network from canonical unified-checkpoint tensors (docs/design.md).

        With ``tp_size`` > 1 the tensors are rank ``tp_rank``'s shards
        (``llama_engine.parallel.shard_checkpoint``) and ``args`` the full architecture: the
        network gets the rank's heads, an all-reduce after each row-parallel linear and a
        vocabulary-parallel lm_head; the embedding is gathered whole, or kept
        vocabulary-parallel with ``parallel_embedding`` (llama_engine/parallel.py).

        ``make_linear(prefix, tensors, quant)`` (default ``llama_engine.quant.make_linear``)
        returns modules whose ``forward(x, partials=False)`` may hand back a sum not yet taken
        (``ops.PartialSum``) when asked; a custom factory must accept the
        keyword (and may ignore it)."""
        make_linear = make_linear or default_make_linear
        full_args = args
        if tp_size > 1:
            args = parallel.local_args(args, tp_size)
        groups = names.group_by_prefix(tensors)

        def group(prefix: str) -> dict[str, torch.Tensor]:
            if prefix not in groups:
                raise ConfigError(f"checkpoint disagrees with its config: no tensors for {prefix}")
            return groups[prefix]

        def norm(prefix: str) -> RMSNorm:
            return RMSNorm(group(prefix)["weight"], args.norm_epsilon)

        def linear(prefix: str, row_parallel: bool = False) -> nn.Module:
            m = make_linear(prefix, group(prefix), quant)
            return parallel.RowParallelLinear(m) if row_parallel and tp_size > 1 else m

        layers = []
        for i in range(args.num_hidden_layers):
            p = names.layer_prefix(i)
            attn = Attention(args, linear(p + "attention.qkv"),
                             linear(p + "attention.dense", row_parallel=True))
            fused = fuse_gate_up(group(p + "mlp.fc"), group(p + "mlp.gate"))
            gate_up = (make_linear(p + "mlp.fc", fused, quant) if fused is not None
                       else (linear(p + "mlp.fc"), linear(p + "mlp.gate")))
            mlp = MLP(gate_up, args.intermediate_size, linear(p + "mlp.proj", row_parallel=True))
            layers.append(TransformerBlock(norm(p + "input_layernorm"), attn,
                                           norm(p + "post_layernorm"), mlp))
        embed = group("transformer.vocab_embedding")["weight"]
        if args.tie_word_embeddings:
            lm_head = make_linear("lm_head", {"weight": embed}, quant)
        else:
            lm_head = linear("lm_head")
        model = cls(args, embed, layers, norm("transformer.ln_f"), lm_head, max_positions)
        if tp_size > 1:
            parallel.make_vocab_parallel(model, full_args.vocab_size, tp_rank,
                                         parallel_embedding)
        return model


def kv_scales_from_checkpoint(args: ModelArgs, quant: QuantConfig,
                              tensors: dict[str, torch.Tensor]
                              ) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
    """INT8 / FP8 KV scales per layer: (k_scale, v_scale) float32 [Hkv, D] on the tensors'
    device, or None for a float cache. Never invents a scale.

    Uses our per-(KV head, channel) ``attention.k_cache_scale`` / ``v_cache_scale`` when the
    checkpoint has them, else TensorRT-LLM's per-layer ``kv_cache_scaling_factor`` for every
    channel of K and V (older checkpoints, TensorRT-LLM's own). ``args`` is the architecture
    the tensors are for (a rank's local one under tensor parallelism)."""
    if not quant.kv_cache_dtype:
        return None
    kind = quant.kv_cache_quant_algo  # INT8 or FP8: the same scale tensors
    hkv, d = args.num_key_value_heads, args.head_dim
    scales = []
    for i in range(args.num_hidden_layers):
        p = names.layer_prefix(i) + "attention."
        kn, vn = (p + s for s in names.KV_CHANNEL_SCALES)
        if kn in tensors or vn in tensors:
            if kn not in tensors or vn not in tensors:
                raise ConfigError(f"checkpoint has only one of {kn} and {vn}; per-channel {kind} "
                                  "KV scales come in pairs (re-run hf_llama_convert.py "
                                  "--calibrate-kv-cache)")
            pair = []
            for n in (kn, vn):
                t = tensors[n].float()
                if t.numel() != hkv * d:
                    raise ConfigError(f"{n} has {t.numel()} values; expected Hkv*D = "
                                      f"{hkv}*{d} = {hkv * d}")
                pair.append(t.reshape(hkv, d).contiguous())
        else:
            name = p + names.KV_SCALE
            if name not in tensors:
                raise ConfigError(f"{kind} KV cache needs calibrated scales but {name} is "
                                  "missing; run hf_llama_convert.py --calibrate-kv-cache")
            s = tensors[name].float().reshape(-1)[:1].reshape(1, 1).expand(hkv, d)
            pair = [s.contiguous(), s.contiguous()]  # TensorRT-LLM's: one scale for K and V
            kn = vn = name
        for n, t in zip((kn, vn), pair):
            # one host check at load time (a zero scale would divide by zero when quantizing)
            if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
                raise ConfigError(f"{n} holds a zero, negative or non-finite {kind} KV scale; "
                                  "re-calibrate (hf_llama_convert.py --calibrate-kv-cache)")
        scales.append((pair[0], pair[1]))
    return scales
