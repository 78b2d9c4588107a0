#!/usr/bin/env bash
# The ablation rows of two trees on one GPU in one call, alternated (A B B A), then a table of
# B / A per row: how a refactor is checked to leave speed alone.
# Usage on the GPU machine: bash tools/gpu_ab_ablation.sh A_DIR OUT_DIR [ROWS] [ORDER]
#   A_DIR: a checkout of the older tree (e.g. `git archive pre-redesign | tar -x -C .before`)
#   ROWS: ablation rows (default fp16,int8,int4,int4_int8kv,sq)
#   ORDER: the runs, in order (default "A1 B1 B2 A2"; "A1 B1" when time is short)
set -u
A=${1:?A_DIR}; OUTD=${2:?OUT_DIR}; ROWS=${3:-fp16,int8,int4,int4_int8kv,sq}
ORDER=${4:-A1 B1 B2 A2}
B=$(pwd)
export PYTHONUNBUFFERED=1
run() {  # tree label
  (cd "$1" && timeout 280 python3 benchmark.py --ablation --only "$ROWS" \
      --out_json "$OUTD/ablation_$2.json" --assets /tmp/ab_assets_$2) 2>&1 |
    grep -E '^== |decode_tok_s|error|Error' | cut -c1-300
}
mkdir -p "$OUTD"
for tag in $ORDER; do
  mkdir -p /tmp/ab_assets_$tag
  echo "=== tree ${tag:0:1} run $tag $(date +%T)"
  if [ "${tag:0:1}" = A ]; then run "$A" "$tag"; else run "$B" "$tag"; fi
done
python3 - "$OUTD" "$ROWS" <<'PY'
import json, os, sys
out, rows = sys.argv[1], sys.argv[2].split(",")
def load(tag):
    p = os.path.join(out, f"ablation_{tag}.json")
    return json.load(open(p)).get("ablation", {}) if os.path.exists(p) else {}
r = {t: load(t) for t in ("A1", "B1", "B2", "A2")}
print("| row | A decode tok/s (A1, A2) | B decode tok/s (B1, B2) | B/A (means) | A latency s | B latency s |")
print("|---|---|---|---|---|---|")
for k in rows:
    a = [r[t][k]["decode_tok_s"] for t in ("A1", "A2") if k in r[t] and "decode_tok_s" in r[t][k]]
    b = [r[t][k]["decode_tok_s"] for t in ("B1", "B2") if k in r[t] and "decode_tok_s" in r[t][k]]
    la = [r[t][k]["latency_s"] for t in ("A1", "A2") if k in r[t] and "latency_s" in r[t][k]]
    lb = [r[t][k]["latency_s"] for t in ("B1", "B2") if k in r[t] and "latency_s" in r[t][k]]
    if a and b:
        ratio = (sum(b) / len(b)) / (sum(a) / len(a))
        print(f"| {k} | {', '.join(f'{x:.1f}' for x in a)} | {', '.join(f'{x:.1f}' for x in b)} "
              f"| {ratio:.3f} | {', '.join(f'{x:.4f}' for x in la)} | {', '.join(f'{x:.4f}' for x in lb)} |")
    else:
        print(f"| {k} | missing | missing | - | - | - |")
PY
