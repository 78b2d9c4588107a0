#!/usr/bin/env python3
"""Tune the skinny fp16 GEMV configs of this GPU (kernels/configs/<GPU>.json, kernels/tuning.py)
for shapes its table lacks.

    python tools/gpu_linear_sweep.py [--shapes 7680x5120,5120x2560] [--M 1,16] [--write]

For each weight shape N x K and batch M: every candidate ``SkinnyCfg`` (dot and fma kernels),
its output checked against the fp32 reference, timed in a CUDA graph over weight copies that
do not fit in L2 (``gpu_kernel_check.time_graph``), against the config the table picks now.
Prints GB/s per candidate; ``--write`` puts each winner that beats the current pick by more
than 3% into this GPU's file (created if absent) with its GB/s and the GPU's name; ``--json``
saves everything. Default shapes: LLaMA-13B's linears on one GPU and at TP=2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import torch  # noqa: E402

from gpu_kernel_check import rel_err, time_graph  # noqa: E402
from llama_engine.kernels import linear as L  # noqa: E402
from llama_engine.kernels import tuning  # noqa: E402
from llama_engine.kernels.reference import linear_fp_ref  # noqa: E402

LLAMA13B = "15360x5120,5120x5120,27648x5120,5120x13824"          # qkv, o, gate_up, down
LLAMA13B_TP2 = "7680x5120,5120x2560,13824x5120,5120x6912"


def candidates() -> list:
    out = []
    for bn in (16, 32, 64, 128):
        for bk in (128, 256):
            for sk in (1, 2, 4):
                for st in (3, 5):
                    out.append(tuning.SkinnyCfg("dot", bn, bk, sk, 4, st))
    for bn in (2, 4, 8):
        for bk in (512, 1024, 2048):
            for sk in (1, 2):
                for st in (1, 3):
                    out.append(tuning.SkinnyCfg("fma", bn, bk, sk, 4, st))
    return out


def fmt(cfg) -> str:
    return (f'{cfg.kernel}(block_n={cfg.block_n}, block_k={cfg.block_k}, '
            f'split_k={cfg.split_k}, warps={cfg.num_warps}, stages={cfg.num_stages})')


def write_table(entries: dict, card: str) -> Path:
    """The winners into this GPU's tuning file (each replaces the row of its key)."""
    rows = [tuning.row_of(tuning.FP, M, N, K, cfg, GBps=round(gbs), measured_on=card)
            for (M, N, K), (cfg, gbs) in entries.items()]
    return tuning.save_table(card, skinny_rows=rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=f"{LLAMA13B},{LLAMA13B_TP2}", help="NxK,NxK,...")
    p.add_argument("--M", default="1")
    p.add_argument("--write", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    table = tuning.table_for(torch.device("cuda"))
    print(f"{card}: tuning table {table.source}")
    dev, dt = "cuda", torch.float16
    results, winners = {}, {}
    for shape in a.shapes.split(","):
        N, K = map(int, shape.split("x"))
        nbytes = N * K * 2
        n_copies = max(2, math.ceil(256e6 / nbytes))
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(n_copies)]
        for M in map(int, a.M.split(",")):
            x = torch.randn(M, K, device=dev, dtype=dt)
            ref = linear_fp_ref(x.float(), ws[0].float())
            now = tuning.pick_skinny(table, tuning.FP, M, N, K)
            base_ms = time_graph(lambda i: L.linear_fp(x, ws[i]), n_copies)
            rows = [{"cfg": "current " + fmt(now), "gbs": nbytes / base_ms / 1e6}]
            best = (None, 0.0)
            for cfg in candidates():
                try:
                    out = L.linear_fp(x, ws[0], _cfg=cfg)
                    err = rel_err(out, ref)
                    if err > 1e-2:
                        rows.append({"cfg": fmt(cfg), "error": f"rel err {err:.2e}"})
                        continue
                    ms = time_graph(lambda i, c=cfg: L.linear_fp(x, ws[i], _cfg=c), n_copies)
                except Exception as e:  # noqa: BLE001 - a config that does not fit the shape
                    rows.append({"cfg": fmt(cfg), "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                gbs = nbytes / ms / 1e6
                rows.append({"cfg": fmt(cfg), "gbs": gbs})
                if gbs > best[1]:
                    best = (cfg, gbs)
            results[f"M{M} {N}x{K}"] = rows
            print(f"M={M} N={N} K={K}: current {fmt(now)} {rows[0]['gbs']:.0f} GB/s; best "
                  f"{fmt(best[0]) if best[0] else None} {best[1]:.0f} GB/s", flush=True)
            if best[0] is not None and best[1] > 1.03 * rows[0]["gbs"]:
                winners[(M, N, K)] = best
        del ws
        torch.cuda.empty_cache()
    if a.write and winners:
        path = write_table(winners, card)
        print(f"wrote {len(winners)} rows into {path}")
    if a.json:
        Path(a.json).write_text(json.dumps({"card": card, "results": results,
                                            "winners": {f"M{m} {n}x{k}": [fmt(c), g] for
                                                        (m, n, k), (c, g) in winners.items()}},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
