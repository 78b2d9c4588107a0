"""GGUF linears kept in their quantized values (``build.py --gguf_file F
--keep_gguf_quantization``): Q4_0 and Q4_1 blocks become our group-32 int4 with zeros exactly,
instead of being dequantized and quantized again onto another grid.

Block formats, from ggml's published definitions (``ggml-common.h``: block_q4_0, block_q4_1,
block_q8_0; the GGUF spec in ggml's docs/gguf.md), 32 weights along the input dim per block:

* Q4_0: fp16 d, 16 bytes qs; weight j (j < 16) is the low nibble of qs[j], weight j + 16 its
  high nibble; w = d * (nibble - 8).
* Q4_1: fp16 d, fp16 m, 16 bytes qs (same nibble order); w = d * nibble + m.
* Q8_0: fp16 d, 32 int8 qs; w = d * q.

Ours: q = nibble - 8, s = d, z = m + 8 d (Q4_0: z = 0), in the model dtype: in float32 the
dequantized weight equals the file's to one float32 rounding. Q8_0 has no group-wise int8 linear
here: a Q8_0 *linear* is refused (one line naming it); the Q8_0 token embedding (SmolLM2's) is
a table, read exactly (d * q is exact in float32) by transformers' GGUF reader.

llama.cpp stores q_proj / k_proj rows permuted for its RoPE; the rows are put back (blocks run
along the input dim, so a row permutation moves whole blocks). Every linear is checked against
transformers' dequantized copy of the same file: a mismatch is an error, not a silent guess.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..config import W4A16_AWQ, ConfigError, ModelArgs, QuantConfig
from .common import assemble

BLOCK = 32
KEPT = ("Q4_0", "Q4_1")
GGUF_OF_HF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs uint8 [..., 16] -> the block's 32 4-bit values in weight order."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def decode_blocks(raw: np.ndarray, kind: str, n: int, k: int):
    """Raw GGUF rows (uint8 [N, bytes]) of a Q4_0 / Q4_1 tensor [N, K] -> (u uint8 [N, K],
    d float32 [N, K/32], m float32 [N, K/32] or None)."""
    size = {"Q4_0": 18, "Q4_1": 20}[kind]
    b = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(n, k // BLOCK, size)
    d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    m = None
    off = 2
    if kind == "Q4_1":
        m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        off = 4
    u = _nibbles(b[..., off:off + 16]).reshape(n, k)
    return u, d, m


def encode_blocks(u: torch.Tensor, d: torch.Tensor, m: Optional[torch.Tensor]) -> np.ndarray:
    """Inverse of ``decode_blocks`` (used by the tests to write GGUF blocks)."""
    n, k = u.shape
    ub = u.to(torch.uint8).reshape(n, k // BLOCK, BLOCK)
    qs = ub[..., :16] | (ub[..., 16:] << 4)
    parts = [d.to(torch.float16).reshape(n, -1, 1).view(torch.uint8)]
    if m is not None:
        parts.append(m.to(torch.float16).reshape(n, -1, 1).view(torch.uint8))
    parts.append(qs)
    return torch.cat(parts, dim=-1).reshape(n, -1).numpy()


def _rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row index of llama.cpp's permuted q/k weight for each HF row."""
    d = n_rows // n_head
    return torch.arange(n_rows).reshape(n_head, d // 2, 2).transpose(1, 2).reshape(-1)


def load_gguf_linears(path: str, args: ModelArgs, hf_sd: dict, dtype: torch.dtype
                      ) -> tuple[QuantConfig, dict]:
    """-> (QuantConfig W4A16_AWQ group 32 with zeros, unified tensors) with every layer linear
    kept from the file's Q4_0 / Q4_1 blocks; the other tensors come from ``hf_sd`` (the same
    file dequantized by transformers). Any other linear type: a one-line error naming it."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    linears = set(GGUF_OF_HF.values())
    for t in reader.tensors:  # every type checked before any work
        if t.name.startswith("blk.") and t.name.split(".")[2] in linears \
                and t.tensor_type.name not in KEPT:
            raise ConfigError(f"{path}: {t.name} is {t.tensor_type.name}; "
                              f"--keep_gguf_quantization keeps {' / '.join(KEPT)} linears "
                              "only (drop the flag to dequantize)")

    def get(mod: str):
        i = int(mod.split(".")[2])
        short = ".".join(mod.split(".")[3:])
        name = f"blk.{i}.{GGUF_OF_HF[short]}.weight"
        if name not in by_name:
            raise ConfigError(f"{path}: no tensor {name}")
        t = by_name[name]
        kind = t.tensor_type.name
        if kind not in KEPT:
            raise ConfigError(f"{path}: {name} is {kind}; --keep_gguf_quantization keeps "
                              f"{' / '.join(KEPT)} linears only (drop the flag to dequantize)")
        k, n = (int(x) for x in t.shape)
        u, d, m = decode_blocks(t.data, kind, n, k)
        ref = hf_sd.get(mod + ".weight")
        if short in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = args.num_attention_heads if short.endswith("q_proj") else \
                args.num_key_value_heads
            rows = _rope_rows(n, heads)
            u, d = u[rows], d[rows]
            m = None if m is None else m[rows]
        d_full = d.repeat_interleave(BLOCK, dim=1)
        w = d_full * (u.float() - (8 if m is None else 0))
        if m is not None:
            w = w + m.repeat_interleave(BLOCK, dim=1)
        if ref is None or tuple(ref.shape) != (n, k) or not torch.equal(w, ref.float()):
            raise ConfigError(f"{path}: {name} decoded from its {kind} blocks does not match "
                              "transformers' dequantized copy; this file is not read correctly")
        q = (u.to(torch.int16) - 8).to(torch.int8)
        s = d.t().contiguous()
        z = torch.zeros_like(s) if m is None else (m + 8 * d).t().contiguous()
        return q, s, z

    tensors = assemble(args, get, hf_sd, dtype)
    for name in [n for n, t in tensors.items() if n.endswith(".weight") and t.dtype == torch.int8]:
        tensors[name[:-len("weight")] + "prequant_scaling_factor"] = torch.ones(
            2 * tensors[name].shape[1], dtype=dtype)
    return QuantConfig(quant_algo=W4A16_AWQ, group_size=BLOCK, has_zero_point=True), tensors
