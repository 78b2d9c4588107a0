"""Attention over a paged KV cache for a flat batch of tokens from several sequences.

``AttentionMeta`` is the per-step batch description (an explicit object, no globals): which
sequence each token belongs to, where its K/V go in the cache, and how much context each
sequence has. Decode steps (one new token per sequence) use the ``decode_attention`` kernel;
prefill and chunked-prefill steps attend, per sequence, to the cached prefix and the new
tokens causally.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .kernels import ops


@dataclass
class AttentionMeta:
    positions: torch.Tensor        # int64[N] absolute position of each new token
    slot_mapping: torch.Tensor     # int64[N] cache slot of each new token (-1: do not store)
    block_tables: torch.Tensor     # int32[B, max_blocks]
    context_lens: torch.Tensor     # int32[B] tokens in the cache per sequence after this step
    query_lens: list               # python ints: new tokens per sequence in this step
    is_decode: bool                # every sequence has exactly one new token
    logits_indices: Optional[torch.Tensor] = None  # int64 rows projected to logits
    context_lens_host: Optional[list] = None       # python copy of context_lens (prefill)
    plan: Optional["PrefillPlan"] = None           # made once per step by prefill_plan()


def last_token_indices(query_lens: list, device) -> torch.Tensor:
    ends, total = [], 0
    for q in query_lens:
        total += q
        ends.append(total - 1)
    return torch.tensor(ends, dtype=torch.int64, device=device)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int,
                   scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """First ``length`` cached tokens of one sequence. -> [length, Hkv, D] in ``dtype``.

    ``scale``: an int8 / FP8 cache's dequantization scales, float32 [Hkv, D] (per KV head and
    channel; a float is accepted too), or None for a float cache."""
    return gather_context_batch(cache, block_table[None], length, scale, dtype)[0]


def gather_context_batch(cache: torch.Tensor, block_tables: torch.Tensor, length: int,
                         scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The first ``length`` cached tokens of B sequences at once (``gather_context`` of each):
    block_tables [B, >= blocks] -> [B, length, Hkv, D] in ``dtype``."""
    B = block_tables.shape[0]
    _, hkv, block_size, d = cache.shape
    n = (length + block_size - 1) // block_size
    blocks = cache[block_tables[:, :n].long()]             # [B, n, Hkv, bs, D]
    x = blocks.permute(0, 1, 3, 2, 4).reshape(B, n * block_size, hkv, d)[:, :length]
    if scale is None:
        return x.to(dtype)
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(hkv, d)
    return (x.float() * scale).to(dtype)


@dataclass
class PrefillPlan:
    """How a prefill / mixed step splits into attention calls (the same for every layer)."""
    ctx: list          # context length per sequence (host ints)
    num_decode: int    # leading sequences that decode (one new token over a cached context)
    starts: list       # first token row of each sequence after the decode rows
    groups: dict       # (new tokens, cached prefix) -> indices into starts of >= 2 prompts
                       # sharing one call
    tables: dict = field(default_factory=dict)   # group -> its block tables (made once a step)


def prefill_plan(meta: AttentionMeta) -> PrefillPlan:
    """Made on the first layer's call and kept on ``meta`` for the other layers."""
    if meta.plan is not None:
        return meta.plan
    ctx = meta.context_lens_host
    if ctx is None:
        ctx = meta.context_lens.tolist()
    # Inflight batching puts decoding sequences (one new token each) first in a mixed step:
    # they go through the decode kernel together instead of one prefill call each.
    nd = 0
    while nd < len(meta.query_lens) and meta.query_lens[nd] == 1 and ctx[nd] > 1:
        nd += 1
    # Prompts with the same number of new tokens over cached prefixes of the same length (none,
    # or a shared system prompt under prefix caching: inflight batching admits many at once)
    # share one attention call; the rest go one by one.
    starts, pos, groups = [], nd, {}
    for j, qlen in enumerate(meta.query_lens[nd:]):
        starts.append(pos)
        pos += qlen
        if qlen > 1:
            groups.setdefault((qlen, ctx[nd + j] - qlen), []).append(j)
    meta.plan = PrefillPlan(ctx, nd, starts, {g: m for g, m in groups.items() if len(m) > 1})
    return meta.plan


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scale,
                    softmax_scale: float) -> torch.Tensor:
    """q[N,H,D], k/v[N,Hkv,D] of the new tokens -> attention output [N,H,D].

    Writes the new K/V into the cache first (quantizing when the cache is int8 or FP8).
    ``kv_scale`` (int8 / FP8 caches): ``(k_scale, v_scale)`` float32 [Hkv, D] as ``KVCache.layer`` gives them
    (or one float for both), else None."""
    ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, kv_scale)
    if meta.is_decode:
        return ops.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                    softmax_scale, kv_scale)
    plan = prefill_plan(meta)
    ctx, nd, starts = plan.ctx, plan.num_decode, plan.starts
    outs = []
    ks = vs = None
    if ops.is_quant_kv(k_cache.dtype):
        ks, vs = ops.kv_scale_tensors(kv_scale, k_cache.shape[1], k_cache.shape[3],
                                      k_cache.device)
    if nd:
        outs.append(ops.decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                         meta.context_lens[:nd], softmax_scale, kv_scale))
    per_seq: list = [None] * len(starts)
    for (qlen, prefix), members in plan.groups.items():
        first = starts[members[0]]
        if all(starts[m] == first + n * qlen for n, m in enumerate(members)):
            sl = slice(first, first + len(members) * qlen)  # adjacent: views, no copies
            qb, kb, vb = (x[sl].unflatten(0, (len(members), qlen)) for x in (q, k, v))
        else:
            qb, kb, vb = (torch.stack([x[starts[m]:starts[m] + qlen] for m in members])
                          for x in (q, k, v))
        if prefix > 0:
            tables = plan.tables.get((qlen, prefix))
            if tables is None:
                rows = torch.tensor([nd + m for m in members], device=meta.block_tables.device)
                tables = plan.tables[(qlen, prefix)] = meta.block_tables.index_select(0, rows)
            kb = torch.cat([gather_context_batch(k_cache, tables, prefix, ks, q.dtype), kb], 1)
            vb = torch.cat([gather_context_batch(v_cache, tables, prefix, vs, q.dtype), vb], 1)
        ob = ops.prefill_attention_batch(qb, kb, vb, softmax_scale=softmax_scale)
        for n, m in enumerate(members):
            per_seq[m] = ob[n]
    for j, i in enumerate(range(nd, len(meta.query_lens))):
        if per_seq[j] is not None:
            outs.append(per_seq[j])
            continue
        qlen, start = meta.query_lens[i], starts[j]
        qi = q[start:start + qlen]
        ki, vi = k[start:start + qlen], v[start:start + qlen]
        prefix = ctx[i] - qlen
        if prefix > 0:
            # Chunked prefill / continuation: earlier tokens come from the cache.
            kp = gather_context(k_cache, meta.block_tables[i], prefix, ks, q.dtype)
            vp = gather_context(v_cache, meta.block_tables[i], prefix, vs, q.dtype)
            ki, vi = torch.cat([kp, ki]), torch.cat([vp, vi])
        outs.append(ops.prefill_attention(qi, ki, vi, prefix, softmax_scale=softmax_scale))
    return torch.cat(outs)
