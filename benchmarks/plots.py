"""The two figures made from the results JSON: assets/benchmark.png (the ablation: end-to-end
and decode tokens/s against the bandwidth floor) and assets/serving.png (throughput against
latency under Poisson arrivals). matplotlib is optional: without it there is no figure."""
from __future__ import annotations

from .modes import ABLATION, ABLATION_SHAPE

SHORT = {"hf_eager": "HF eager", "hf_compile": "HF compile", "fp16": "ours fp16",
         "int8": "int8 WO", "int4": "int4 WO g128", "int4_int8kv": "int4 + INT8 KV",
         "sq": "SmoothQuant\nW8A8"}


def pyplot():
    """matplotlib.pyplot on the file-only backend (no display needed), or None when matplotlib
    is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def ablation_plot(res: dict, path: str) -> bool:
    """Bars per ablation row; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
        return False
    rows = res.get("ablation", {})
    keys = [k for k in ABLATION if k in rows and "latency_s" in rows[k]]
    if not keys:
        return True
    output_len = ABLATION_SHAPE[2]
    e2e = [output_len / rows[k]["latency_s"] for k in keys]
    dec = [rows[k].get("decode_tok_s", 0.0) for k in keys]
    floor = [rows[k].get("floor_tok_s", 0.0) for k in keys]
    x = range(len(keys))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    b1 = ax.bar([i - 0.2 for i in x], e2e, 0.4, label="end to end (prefill included)",
                color="#4a7ab5")
    b2 = ax.bar([i + 0.2 for i in x], dec, 0.4, label="decode only", color="#e08a3c")
    ax.scatter([i + 0.2 for i in x if floor[i]], [f for f in floor if f], marker="_", s=400,
               color="black", label="bandwidth floor (bytes read per token)")
    ax.bar_label(b1, fmt="%.0f", fontsize=8)
    ax.bar_label(b2, labels=[f"{v:.0f}" if v > 0 else "n/a" for v in dec], fontsize=8)
    ax.set_xticks(list(x), [SHORT.get(k, k) for k in keys])
    ax.set_ylabel("tokens/s")
    meta = res.get("meta", {})
    ax.set_title(f"LLaMA-7B shapes, batch 1, input 8, output 50 - {meta.get('gpu', 'GPU')}, "
                 f"{meta.get('date', '')}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def serving_plot(res: dict, path: str) -> None:
    """Throughput vs latency under Poisson arrivals, when the results hold any."""
    pts = (res.get("serving") or {}).get("poisson") or {}
    plt = pyplot() if pts else None
    if plt is None:
        return
    rows = sorted(pts.values(), key=lambda r: r["rate_per_s"])
    tput = [r["tokens_per_s"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for key, lab in (("ttft_p50_s", "p50"), ("ttft_p99_s", "p99")):
        ax[0].plot(tput, [r[key] for r in rows], "o-", label=lab)
    for key, lab in (("tpot_p50_s", "p50"), ("tpot_p99_s", "p99")):
        ax[1].plot(tput, [1e3 * r[key] for r in rows], "o-", label=lab)
    for r, x in zip(rows, tput):
        ax[0].annotate(f"{r['rate_per_s']:g}/s", (x, r["ttft_p50_s"]), fontsize=7)
    ax[0].set(xlabel="output tokens/s", ylabel="time to first token (s)")
    ax[1].set(xlabel="output tokens/s", ylabel="time per output token (ms)")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(f"Inflight batching, Poisson arrivals, input 128 / output 128 - "
                 f"{res.get('meta', {}).get('gpu', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)

