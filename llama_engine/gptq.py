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
  group's weights as already updated (the paper's group-wise variant, left to right);
* activation order with static groups: columns in decreasing order of diag H, each group's
  grid fixed beforehand, so that the groups stay contiguous (no ``g_idx``);
* an optional AWQ clip factor per (row, group) shrinking the group's range first;
* our addition, on by default in conversions (``gptq_rounding``): the static grids are fitted
  by least squares to the output error before the pass (``fit_grid``: with the codes fixed,
  each group's best scale and zero under its block of H solve a 2 x 2 system; round again;
  repeat), and after the pass each row's scales and zeros are refitted to GPTQ's final codes
  under the whole of H (``refit_scales``). Any grid (s, z) is a valid point of the format,
  so the checkpoint is unchanged in layout.

Not implemented: dynamic-group activation order (desc_act / g_idx), the sequential pass that
feeds each block the outputs of the already quantized blocks (the inputs are captured from one
float forward pass, as ``awq.capture_inputs`` does for AWQ).
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


def fit_grid(w: torch.Tensor, h: torch.Tensor, group_size: int, s: torch.Tensor,
             z: torch.Tensor, bits: int = 4, iters: int = 4):
    """Refine the affine grids (s, z) [ceil(K/G), N] of w [N, K] (w ~ q * s + z) for the output
    error on inputs whose gram matrix is h [K, K]: with the codes q fixed, the (s, z) that
    minimise each group's e H_gg e^T (H_gg its diagonal block, e = q s + z - w) solve a 2 x 2
    linear system; then the codes are rounded again on the new grid; ``iters`` rounds, and
    a group keeps its old grid wherever the new one scores worse. -> (s, z) float64."""
    n, k = w.shape
    g = int(group_size) or k
    ng = -(-k // g)
    pad = ng * g - k
    W = w.double()
    Hd = h.to(w.device, torch.float64)
    if pad:  # a narrower last group: zero-weight padding columns
        W = torch.cat([W, W.new_zeros(n, pad)], dim=1)
        Hd = torch.nn.functional.pad(Hd, (0, pad, 0, pad))
    Wg = W.reshape(n, ng, g)
    hb = torch.stack([Hd[j:j + g, j:j + g] for j in range(0, ng * g, g)])   # [ng, G, G]
    lo_code, hi_code = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    S, Z = s.double().t().clone(), z.double().t().clone()                  # [N, ng]

    def codes_err(S, Z):
        q = torch.round((Wg - Z[..., None]) / S[..., None]).clamp_(lo_code, hi_code)
        e = q * S[..., None] + Z[..., None] - Wg
        return q, torch.einsum("ngi,gij,ngj->ng", e, hb, e)

    q, err = codes_err(S, Z)
    one = torch.ones_like(Wg)
    for _ in range(iters):
        hq = torch.einsum("gij,ngj->ngi", hb, q)
        h1 = torch.einsum("gij,ngj->ngi", hb, one)
        a11, a12 = (q * hq).sum(-1), (one * hq).sum(-1)
        a22 = (one * h1).sum(-1)
        b1, b2 = (Wg * hq).sum(-1), (Wg * h1).sum(-1)
        det = a11 * a22 - a12 * a12
        ok = det.abs() > 1e-12 * (a11 * a22).abs().clamp_min(1e-300)
        Sn = torch.where(ok, (b1 * a22 - a12 * b2) / torch.where(ok, det, 1.0), S)
        Zn = torch.where(ok, (a11 * b2 - a12 * b1) / torch.where(ok, det, 1.0), Z)
        ok &= Sn > 0
        Sn, Zn = torch.where(ok, Sn, S), torch.where(ok, Zn, Z)
        qn, errn = codes_err(Sn, Zn)
        better = errn < err
        S, Z = torch.where(better, Sn, S), torch.where(better, Zn, Z)
        q = torch.where(better[..., None], qn, q)
        err = torch.where(better, errn, err)
    return S.t().contiguous(), Z.t().contiguous()


def refit_scales(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor, group_size: int,
                 s: torch.Tensor, z: torch.Tensor, budget: int = 1 << 25):
    """With the codes q [N, K] fixed, the scales and zeros [ceil(K/G), N] (w ~ q * s + z) that
    minimise each row's output error (q s + z - w) H (q s + z - w)^T on inputs whose gram matrix
    is h [K, K], over the whole row at once (the groups' errors interact through H's
    off-diagonal blocks): a linear least-squares problem of 2 ceil(K/G) unknowns a row. For
    GPTQ's codes, whose grid was fixed before its pass. A row keeps its (s, z) (same shape and
    dtype, returned in that dtype) wherever the new ones, rounded to that dtype, are not finite,
    not positive or not better. Rows are solved in chunks of about ``budget`` float64 elements
    of [rows, groups, K] work (LLaMA-7B's down_proj would need 31 GB at once)."""
    n, k = q.shape
    g = int(group_size) or k
    ng = -(-k // g)
    dev = q.device
    H = h.to(dev, torch.float64)
    mask = torch.zeros(ng, k, dtype=torch.float64, device=dev)
    for gi in range(ng):
        mask[gi, gi * g:(gi + 1) * g] = 1.0
    mh = mask @ H                                                  # [ng, K]
    a_zz = mh @ mask.t()                                           # [ng, ng]
    eye = torch.eye(2 * ng, dtype=torch.float64, device=dev)
    s_out, z_out = s.clone(), z.clone()
    rows = max(1, budget // (ng * k))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        qc, wd = q[r0:r1].double(), w[r0:r1].to(dev, torch.float64)
        qm = qc[:, None, :] * mask[None]                           # [R, ng, K]
        qh = qm @ H                                                # [R, ng, K]
        a_ss = qh @ qm.transpose(1, 2)                             # [R, ng, ng]
        a_sz = qh @ mask.t()                                       # [R, ng, ng]
        A = torch.cat([torch.cat([a_ss, a_sz], 2),
                       torch.cat([a_sz.transpose(1, 2), a_zz.expand(r1 - r0, ng, ng)], 2)], 1)
        b = torch.cat([qh @ wd[:, :, None], (mh @ wd.t()).t()[:, :, None]], 1)   # [R, 2ng, 1]
        ridge = 1e-10 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        x = torch.linalg.solve(A + ridge[:, None, None] * eye, b)[..., 0]
        s_old, z_old = s[:, r0:r1], z[:, r0:r1]
        s_new, z_new = x[:, :ng].t().to(s.dtype), x[:, ng:].t().to(z.dtype)

        def row_err(ss, zz):
            e = dequantize_codes(q[r0:r1], ss, zz, g).double() - wd
            return ((e @ H) * e).sum(1)

        ok = torch.isfinite(s_new).all(0) & torch.isfinite(z_new).all(0) & (s_new > 0).all(0)
        s_new, z_new = s_new.where(ok[None], s_old), z_new.where(ok[None], z_old)
        ok &= row_err(s_new, z_new) < row_err(s_old, z_old)
        s_out[:, r0:r1] = s_new.where(ok[None], s_old)
        z_out[:, r0:r1] = z_new.where(ok[None], z_old)
    return s_out, z_out


def gptq_zp(w: torch.Tensor, h: torch.Tensor, group_size: int,
            scale_dtype: torch.dtype = torch.float16, clip: Optional[torch.Tensor] = None,
            damp: float = 0.01, block: int = 128, bits: int = 4, act_order: bool = False,
            grid: Optional[tuple] = None):
    """GPTQ of w [N, K] against the Hessian h [K, K] -> (codes int8 [N, K], scales [K/G, N],
    zeros [K/G, N] in ``scale_dtype``), w ~ q * s + z: ``bits`` 4 is quant_int4's zero-point
    format (codes in [-8, 7], to pack), 8 its group-wise int8 (W8A16_GPTQ, [-128, 127]).
    ``group_size`` 0: one group per row; a G not dividing K leaves a narrower last group.
    ``clip`` [N, ceil(K/G)]: AWQ's range factors. ``act_order``: the columns are rounded in
    decreasing order of the Hessian's diagonal (the paper's activation order), each group's
    scale and zero fixed beforehand from the original weights ("static groups"), so that the
    groups stay contiguous in K and the checkpoint needs no ``g_idx``. ``grid`` = (s, z)
    [ceil(K/G), N]: static grids given by the caller (``fit_grid``'s), rounded to
    ``scale_dtype`` and used in either order instead of min/max grids (``clip`` is then
    already in them)."""
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
    if grid is not None:  # given static grids (fit_grid's): act order's path, any order
        S.copy_(grid[0].to(dev, scale_dtype).double())
        Z.copy_(grid[1].to(dev, scale_dtype).double())
        perm = torch.arange(k, device=dev)
        col_group = (perm // g).tolist()
    if act_order:
        for gi in range(ng if grid is None else 0):
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


def gptq_rounding(w: torch.Tensor, h: torch.Tensor, group_size: int, scale_dtype: torch.dtype,
                  grid: tuple, clip: Optional[torch.Tensor] = None, damp: float = 0.01,
                  act_order: bool = True, fit: bool = True, bits: int = 4):
    """The conversion's GPTQ: ``grid`` = (s, z) [ceil(K/G), N], round to nearest's grid (with
    AWQ's ``clip`` already in it); with ``fit`` it is fitted to the output error first
    (``fit_grid``), GPTQ rounds onto it (activation order with static groups, or left to
    right with ``act_order`` False: then without ``fit`` each group's grid is taken from the
    updated weights as the pass reaches it, the paper's rule), and the scales and zeros are
    refitted to GPTQ's codes (``refit_scales``). -> (codes int8 [N, K], s, z in
    ``scale_dtype``)."""
    if not fit:
        return gptq_zp(w, h, group_size, scale_dtype, clip, damp, bits=bits, act_order=act_order)
    s, z = fit_grid(w, h, group_size, grid[0], grid[1], bits=bits)
    q, s, z = gptq_zp(w, h, group_size, scale_dtype, clip, damp, bits=bits, act_order=act_order,
                      grid=(s, z))
    s, z = refit_scales(w, h, q, group_size, s, z)
    return q, s, z


def dequantize_codes(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int):
    """codes [N, K], scales / zeros [K/G, N] -> float32 [N, K]."""
    k = q.shape[1]
    g = int(group_size) or k
    rep = lambda t: t.float().t().repeat_interleave(g, dim=1)[:, :k]  # noqa: E731
    return q.float() * rep(s) + rep(z)
