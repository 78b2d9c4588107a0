"""Sweep the decode-attention launch settings (the ``decode_attention`` entries of this GPU's
kernels/configs/<GPU>.json, kernels/tuning.py) for int8 and fp16 KV caches on a GPU, at the
INT8 KV target's shape (batch 32, context 2,048, LLaMA-7B heads).

    python3 tools/gpu_attn_sweep.py [--batch 32 --ctx 2048] [--write]

Prints, per setting, the device time of one layer's attention and the bandwidth of the K/V
bytes it must move, best first, plus each setting's error against the torch reference.
``--write`` saves the best int8 setting into this GPU's tuning file (created if absent).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--write", action="store_true",
                   help="save the best int8 setting into this GPU's tuning file")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU")
        return 2
    from gpu_kernel_check import make_paged_cache, random_kv_scales, rel_err, time_ms
    from llama_engine.kernels import attn, tuning
    B, H, D, bs = a.batch, 32, 128, 64
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(B, H, D, dtype=torch.float16, device=dev)
    flush = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
    card = torch.cuda.get_device_name()
    table = tuning.table_for(dev)
    print(f"{card}: tuning table {table.source}")
    base = dict(table.decode)
    rows = []
    for kv in ("int8", "fp16"):
        dtype = torch.int8 if kv == "int8" else torch.float16
        kc, vc, bt, cl = make_paged_cache(B, a.ctx, H, D, bs, dtype, dev)
        scale = random_kv_scales(H, D, 0.02, dev) if kv == "int8" else None
        ref = attn.decode_attention(q, kc, vc, bt, cl, 0.088, scale, impl="torch")
        nbytes = 2 * kc.element_size() * B * a.ctx * H * D
        sfx = "_int8" if kv == "int8" else ""
        grid = (itertools.product((32, 64, 128), (2, 3, 4), (4, 8), (512, 1024, 2048))
                if kv == "int8" else itertools.product((64, 128), (3, 4), (4, 8), (2048,)))
        for bn, st, nw, part in grid:
            cfg = dict(base, **{"block_n" + sfx: bn, "num_stages" + sfx: st,
                                "num_warps" + sfx: nw, "max_partition" + sfx: part})
            try:
                fn = lambda: attn.decode_attention(q, kc, vc, bt, cl, 0.088, scale,  # noqa: E731
                                                   _cfg=cfg)
                err = rel_err(fn(), ref)
                ms = time_ms(fn, reps=15, flush=flush)
            except Exception as e:  # noqa: BLE001 - a setting that does not compile
                print(f"{kv} bn{bn} st{st} w{nw} part{part}: {type(e).__name__}", flush=True)
                continue
            rows.append((kv, ms, nbytes / ms / 1e6, err, bn, st, nw, part))
    for kv in ("int8", "fp16"):
        # settings whose output is off (tolerance of the attention self-check) do not count
        mine = sorted((r for r in rows if r[0] == kv and r[3] < 2e-2), key=lambda r: r[1])
        cur = [r for r in mine if (r[4], r[5], r[6], r[7]) == (
            base["block_n_int8" if kv == "int8" else "block_n"],
            base["num_stages_int8" if kv == "int8" else "num_stages"],
            base["num_warps_int8" if kv == "int8" else "num_warps"],
            base["max_partition_int8" if kv == "int8" else "max_partition"])]
        print(f"== {kv} KV, batch {B}, context {a.ctx}: current setting "
              + (f"{cur[0][1] * 1e3:.1f} us ({cur[0][2]:.0f} GB/s)" if cur else "?"))
        if kv == "int8" and a.write and mine:
            best = mine[0]
            path = tuning.save_table(card, decode={
                "block_n_int8": best[4], "num_stages_int8": best[5], "num_warps_int8": best[6],
                "max_partition_int8": best[7]})
            print(f"wrote the best int8 setting into {path}")
        for r in mine[:8]:
            print(f"  {r[1] * 1e3:8.1f} us {r[2]:6.0f} GB/s err {r[3]:.1e}  block_n {r[4]} "
                  f"stages {r[5]} warps {r[6]} max_partition {r[7]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
