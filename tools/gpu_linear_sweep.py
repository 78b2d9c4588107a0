#!/usr/bin/env python3
"""Tune the skinny fp16 GEMV configs (kernels/linear.py ``_TUNED``) for shapes the table lacks.

    python tools/gpu_linear_sweep.py [--shapes 7680x5120,5120x2560] [--M 1,16] [--write]

For each weight shape N x K and batch M: every candidate ``SkinnyCfg`` (dot and fma kernels),
its output checked against the fp32 reference, timed in a CUDA graph over weight copies that
do not fit in L2 (``linear._time_graph``), against the config the table picks now. Prints
GB/s per candidate; ``--write`` puts each winner that beats the current pick by more than 3%
into the table (between its @@TUNED_TABLE markers) with its GB/s and the card's name; ``--json``
saves everything. Default shapes: LLaMA-13B's linears on one GPU and at TP=2.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama_engine.kernels import linear as L  # noqa: E402

LLAMA13B = "15360x5120,5120x5120,27648x5120,5120x13824"          # qkv, o, gate_up, down
LLAMA13B_TP2 = "7680x5120,5120x2560,13824x5120,5120x6912"


def candidates() -> list:
    out = []
    for bn in (16, 32, 64, 128):
        for bk in (128, 256):
            for sk in (1, 2, 4):
                for st in (3, 5):
                    out.append(L.SkinnyCfg("dot", bn, bk, sk, 4, st))
    for bn in (2, 4, 8):
        for bk in (512, 1024, 2048):
            for sk in (1, 2):
                for st in (1, 3):
                    out.append(L.SkinnyCfg("fma", bn, bk, sk, 4, st))
    return out


def fmt(cfg) -> str:
    return (f'_S("{cfg.kernel}", {cfg.block_n}, {cfg.block_k}, {cfg.split_k}, '
            f'{cfg.num_warps}, {cfg.num_stages})')


def write_table(entries: dict, card: str) -> None:
    path = REPO / "llama_engine" / "kernels" / "linear.py"
    src = path.read_text()
    begin, end = src.index("# @@TUNED_TABLE_BEGIN"), src.index("    # @@TUNED_TABLE_END")
    lines = src[begin:end].split("\n")
    for (M, N, K), (cfg, gbs) in entries.items():
        key = f"(_FP, {L._m_bucket(M)}, {N}, {K}):"
        line = f"    {key} {fmt(cfg)},  # {gbs:.0f} GB/s ({card})"
        lines = [ln for ln in lines if not ln.strip().startswith(key)]
        lines.insert(len(lines) - 1, line)
    path.write_text(src[:begin] + "\n".join(lines) + src[end:])


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
    card = re.sub(r"NVIDIA |80GB |HBM3", "", torch.cuda.get_device_name()).strip()
    dev, dt = "cuda", torch.float16
    results, winners = {}, {}
    for shape in a.shapes.split(","):
        N, K = map(int, shape.split("x"))
        nbytes = N * K * 2
        n_copies = max(2, math.ceil(256e6 / nbytes))
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(n_copies)]
        for M in map(int, a.M.split(",")):
            x = torch.randn(M, K, device=dev, dtype=dt)
            ref = L.linear_fp_ref(x.float(), ws[0].float())
            now = L._pick_skinny(L._FP, M, N, K)
            base_ms = L._time_graph(lambda i: L.linear_fp(x, ws[i]), n_copies)
            rows = [{"cfg": "current " + fmt(now), "gbs": nbytes / base_ms / 1e6}]
            best = (None, 0.0)
            for cfg in candidates():
                try:
                    out = L.linear_fp(x, ws[0], _cfg=cfg)
                    err = L._rel_err(out, ref)
                    if err > 1e-2:
                        rows.append({"cfg": fmt(cfg), "error": f"rel err {err:.2e}"})
                        continue
                    ms = L._time_graph(lambda i, c=cfg: L.linear_fp(x, ws[i], _cfg=c), n_copies)
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
        write_table(winners, card)
        print(f"wrote {len(winners)} entries into kernels/linear.py's table ({card})")
    if a.json:
        Path(a.json).write_text(json.dumps({"card": card, "results": results,
                                            "winners": {f"M{m} {n}x{k}": [fmt(c), g] for
                                                        (m, n, k), (c, g) in winners.items()}},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
