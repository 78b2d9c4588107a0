"""GPTQ: int4 with zeros whose rounding compensates its own error (Frantar et al. 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323), written into our zero-point int4 format (TensorRT-LLM's W4A16_GPTQ, or
W4A16_AWQ with zeros when it runs after AWQ's scaling).

For one linear y = x W^T with calibration inputs X [T, K], GPTQ quantizes W column by column
(input channel by input channel) and, after each column, spreads that column's rounding error
over the columns not yet quantized so as to minimise || X W^T - X Q^T ||^2: the update is
-err * H^-1[i, i:] / H^-1[i, i] with H = X^T X (the paper's Eq. 3, in its Cholesky form,
Sec. 4 "Step 3"). What is implemented:

* the Cholesky form of the inverse Hessian, dampened by ``damp`` x mean(diag H) (1% as in the
  paper), with input channels that never fire (diag 0) pinned to 1 and their weights zeroed;
* lazy batch updates over blocks of ``block`` columns (the paper's "Step 2"), a multiple of the
  group size so that a group never spans two blocks;
* group-wise scales and zeros computed when the pass reaches a group's first column, from that
  group's weights as already updated (the paper's group-wise variant, static groups: the
  ``desc_act=False`` checkpoints our loader reads; activation order is not implemented);
* an optional AWQ clip factor per (row, group) shrinking the group's range first.

Not implemented: activation order (desc_act / g_idx), the sequential pass that feeds each
block the outputs of the already quantized blocks (the inputs are captured from one float
forward pass, as ``awq.capture_inputs`` does for AWQ).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import ConfigError


def gram(x: torch.Tensor) -> torch.Tensor:
    """X [T, K] -> H = X^T X / T in float64: GPTQ's Hessian (its scale does not change the
    result), and what AWQ's searches score candidates with: the output error of a weight error
    E [N, K] on these inputs is trace(E H E^T) / N, a [K, K] product instead of a [T, K] one."""
    x = x.double()
    return (x.t() @ x) / max(1, x.shape[0])


def _group_grid(wg: torch.Tensor, clip: Optional[torch.Tensor], dtype: torch.dtype,
                work: torch.dtype, bits: int):
    """Our zero-point grid for the group columns wg [N, G] (quantize_int4_zp's rule and
    arithmetic for 4 bits, quantize_int8_group's for 8: range in ``work`` precision, scale and
    zero rounded to ``dtype``) -> (s [N], z [N]) in float64."""
    wg = wg.to(work)
    clip = None if clip is None else clip.to(wg.device, work)
    hi = wg.amax(dim=1).clamp_min(0)
    lo = wg.amin(dim=1).clamp_max(0)
    if clip is not None:
        hi, lo = hi * clip, lo * clip
    s = (hi - lo) / (2 ** bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s)).to(dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = (lo + 2 ** (bits - 1) * s.to(lo.dtype)).to(dtype)
    return s.double(), z.double()


def gptq_zp(w: torch.Tensor, h: torch.Tensor, group_size: int,
            scale_dtype: torch.dtype = torch.float16, clip: Optional[torch.Tensor] = None,
            damp: float = 0.01, block: int = 128, bits: int = 4, act_order: bool = False):
    """GPTQ of w [N, K] against the Hessian h [K, K] -> (codes int8 [N, K], scales [K/G, N],
    zeros [K/G, N] in ``scale_dtype``), w ~ q * s + z: ``bits`` 4 is quant_int4's zero-point
    format (codes in [-8, 7], to pack), 8 its group-wise int8 (W8A16_GPTQ, [-128, 127]).
    ``group_size`` 0: one group per row; a G not dividing K leaves a narrower last group.
    ``clip`` [N, ceil(K/G)]: AWQ's range factors. ``act_order``: the columns are rounded in
    decreasing order of the Hessian's diagonal (the paper's activation order), each group's
    scale and zero fixed beforehand from the original weights ("static groups"), so that the
    groups stay contiguous in K and the checkpoint needs no ``g_idx``."""
    n, k = w.shape
    g = int(group_size) or k
    if h.shape != (k, k):
        raise ConfigError(f"GPTQ: Hessian {tuple(h.shape)} does not match the weight's K={k}")
    dev = w.device
    W = w.double().clone()
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    H = h.to(dev, torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ng = -(-k // g)   # a G not dividing K: a narrower last group, as quantize_int4_zp
    S = torch.empty(ng, n, dtype=torch.float64, device=dev)
    Z = torch.empty(ng, n, dtype=torch.float64, device=dev)
    perm = None
    if act_order:
        for gi in range(ng):
            S[gi], Z[gi] = _group_grid(W[:, gi * g:(gi + 1) * g],
                                       None if clip is None else clip[:, gi], scale_dtype, work,
                                       bits)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        col_group = (perm // g).tolist()
    H += torch.eye(k, dtype=H.dtype, device=dev) * (damp * torch.diag(H).mean())
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # not positive definite even dampened
        raise ConfigError(f"GPTQ: the calibration Hessian is singular ({e}); give more "
                          "calibration prompts or a larger damp") from None
    if bits not in (4, 8):
        raise ConfigError(f"GPTQ: {bits}-bit codes are not a format here (4 or 8)")
    lo_code, hi_code = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    blk = max(g, (block // g) * g) if g < k else k
    Q = torch.zeros(n, k, dtype=torch.int8, device=dev)
    for i1 in range(0, k, blk):
        i2 = min(i1 + blk, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hi = Hinv[i1:i2, i1:i2]
        s = z = None
        for i in range(i2 - i1):
            col = i1 + i
            if perm is not None:
                s, z = S[col_group[col]], Z[col_group[col]]
            elif col % g == 0:
                gi = col // g
                s, z = _group_grid(W1[:, i:i + g], None if clip is None else clip[:, gi],
                                   scale_dtype, work, bits)
                S[gi], Z[gi] = s, z
            wc = W1[:, i]
            q = torch.round((wc - z) / s).clamp_(lo_code, hi_code)
            Q[:, col] = q.to(torch.int8)
            err = (wc - (q * s + z)) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, S.to(scale_dtype), Z.to(scale_dtype)


def dequantize_codes(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int):
    """codes [N, K], scales / zeros [K/G, N] -> float32 [N, K]."""
    k = q.shape[1]
    g = int(group_size) or k
    rep = lambda t: t.float().t().repeat_interleave(g, dim=1)[:, :k]  # noqa: E731
    return q.float() * rep(s) + rep(z)
