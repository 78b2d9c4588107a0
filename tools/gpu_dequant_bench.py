"""H100 check of the long-prefill path (kernels/dequant.py): for LLaMA-7B's linears, the fused
weight-only GEMM against dequantize + cuBLAS and fp16 cuBLAS, at M = 256 ... 8192 rows, to
place DEQUANT_MIN_M. Prints one JSON line per (format, M) and writes them to --json.

    python tools/gpu_dequant_bench.py --M 256,512,1024,2048,8192 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_engine.kernels import dequant as D  # noqa: E402
from llama_engine.kernels import linear as L  # noqa: E402

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096),
          "down": (4096, 11008)}


def ms(fn, reps=10) -> float:
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--M", default="256,512,1024,2048,8192")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    for M in (int(m) for m in a.M.split(",")):
        tot = {"fp16": 0.0, "int4_fused": 0.0, "int4_dequant": 0.0, "int8_fused": 0.0,
               "int8_dequant": 0.0, "dequant_only_int4": 0.0}
        for name, (N, K) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            w = torch.randn(N, K, device="cuda", dtype=torch.float16)
            q4 = torch.randint(-128, 128, (N, K // 2), device="cuda").to(torch.int8)
            s4 = torch.rand(K // 128, N, device="cuda").half() * 0.01
            q8 = torch.randint(-128, 128, (N, K), device="cuda").to(torch.int8)
            s8 = torch.rand(N, device="cuda").half() * 0.01
            old = D.DEQUANT_MIN_M
            D.DEQUANT_MIN_M = 1 << 30                       # the fused kernels
            t4f = ms(lambda: L.linear_w4a16(x, q4, s4, 128))
            t8f = ms(lambda: L.linear_w8a16(x, q8, s8))
            D.DEQUANT_MIN_M = 1                             # dequantize + cuBLAS
            t4d = ms(lambda: L.linear_w4a16(x, q4, s4, 128))
            t8d = ms(lambda: L.linear_w8a16(x, q8, s8))
            D.DEQUANT_MIN_M = old
            t16 = ms(lambda: torch.nn.functional.linear(x, w))
            tdq = ms(lambda: D.dequantize(q4, s4, None, 128, 4, torch.float16))
            for k, v in (("fp16", t16), ("int4_fused", t4f), ("int4_dequant", t4d),
                         ("int8_fused", t8f), ("int8_dequant", t8d), ("dequant_only_int4", tdq)):
                tot[k] += v
            row = {"M": M, "shape": name, "fp16_ms": t16, "int4_fused_ms": t4f,
                   "int4_dequant_ms": t4d, "int8_fused_ms": t8f, "int8_dequant_ms": t8d,
                   "dequant_int4_ms": tdq,
                   "dequant_int4_gbps": (N * K // 2 + 2 * N * K) / tdq / 1e6}
            rows.append(row)
            print(json.dumps(row), flush=True)
        row = {"M": M, "shape": "summed", **{f"{k}_ms": v for k, v in tot.items()},
               "int4_dequant_vs_fp16": tot["int4_dequant"] / tot["fp16"],
               "int8_dequant_vs_fp16": tot["int8_dequant"] / tot["fp16"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
