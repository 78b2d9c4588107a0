#!/usr/bin/env python3
"""GPU timing of the group-wise int8 linear (W8A16_GPTQ, issue 18) against the per-channel
int8 (W8A16) and fp16 linears on LLaMA-7B's shapes: GB/s of weight bytes (codes + scales +
zeros) per shape and summed, at M = 1, 4, 16, 64, each output checked against the fp32
reference first.

    python tools/gpu_int8_group_bench.py [--M 1,16] [--group_size 128] [--json out.json]
    python tools/gpu_int8_group_bench.py --sweep          # also try every candidate config

Timing: ``gpu_kernel_check.time_graph`` (a CUDA graph over weight copies that do not fit in
L2). What to look at: the ``grp`` column against ``pc`` (per-channel int8: groups add 4 bytes
per group and output, +3% at g128, and one FMA per group) and the summed GB/s at M = 1. The
launch configs are ``kernels/int8_group.SKINNY_CONFIGS`` (the int4 zero-point kernel's,
untuned); ``--sweep`` prints the best candidate per shape.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import torch  # noqa: E402

from gpu_kernel_check import LLAMA7B_SHAPES, rel_err, time_graph  # noqa: E402
from llama_engine.kernels import linear as L  # noqa: E402
from llama_engine.kernels.int8_group import linear_w8a16_group, linear_w8a16_group_ref  # noqa: E402,E501
from llama_engine.kernels.tuning import SkinnyCfg  # noqa: E402


def candidates() -> list:
    return [SkinnyCfg(k, bn, bk, sk, nw, 3) for k in ("fma", "dot") for bn in (32, 64, 128)
            for bk in (64, 128) for sk in (1, 2, 4) for nw in (4, 8)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--M", default="1,4,16,64")
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, G = "cuda", a.group_size
    results = []
    for M in (int(m) for m in a.M.split(",")):
        tot = {"fp16": [0, 0.0], "pc": [0, 0.0], "grp": [0, 0.0]}
        for name, N, K in LLAMA7B_SHAPES:
            if name == "lm_head":
                continue
            copies = max(2, int(2 * 50e6 // (N * K)) + 1)     # > 50 MB L2 in total
            x = torch.randn(M, K, device=dev, dtype=torch.float16)
            q = [torch.randint(-128, 127, (N, K), device=dev, dtype=torch.int8)
                 for _ in range(copies)]
            spc = [torch.rand(N, device=dev, dtype=torch.float16) * 0.01 + 0.001
                   for _ in range(copies)]
            s = [torch.rand(K // G, N, device=dev, dtype=torch.float16) * 0.01 + 0.001
                 for _ in range(copies)]
            z = [torch.randn(K // G, N, device=dev, dtype=torch.float16) * 0.01
                 for _ in range(copies)]
            w16 = [torch.randn(N, K, device=dev, dtype=torch.float16) for _ in range(copies)]
            ref = linear_w8a16_group_ref(x.float().cpu(), q[0].cpu(), s[0].cpu().float(),
                                         z[0].cpu().float(), G).to(dev)
            err = rel_err(linear_w8a16_group(x, q[0], s[0], z[0], G), ref)
            nbytes = {"fp16": 2 * N * K, "pc": N * K + 2 * N, "grp": N * K + 4 * N * K // G}
            ms = {"fp16": time_graph(lambda i: torch.nn.functional.linear(x, w16[i]), copies),
                  "pc": time_graph(lambda i: L.linear_w8a16(x, q[i], spc[i]), copies),
                  "grp": time_graph(lambda i: linear_w8a16_group(x, q[i], s[i], z[i], G),
                                    copies)}
            row = {"M": M, "shape": name, "N": N, "K": K, "grp_rel_err": err}
            for k in ms:
                row[k + "_gbps"] = nbytes[k] / ms[k] / 1e6
                tot[k][0] += nbytes[k]
                tot[k][1] += ms[k]
            if a.sweep:
                best = None
                for cfg in candidates():
                    try:
                        t = time_graph(lambda i: linear_w8a16_group(x, q[i], s[i], z[i], G,
                                                                    _cfg=cfg), copies)
                    except Exception:  # a config the shape cannot take
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                row["best_cfg"], row["best_gbps"] = str(best[1]), nbytes["grp"] / best[0] / 1e6
            results.append(row)
            print(json.dumps(row))
        summary = {"M": M, **{k + "_summed_gbps": v[0] / v[1] / 1e6 for k, v in tot.items()}}
        results.append(summary)
        print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
