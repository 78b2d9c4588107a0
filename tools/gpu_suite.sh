#!/usr/bin/env bash
# The GPU measurements behind the README, in one call (each part under its own time limit).
# Usage on the GPU machine: bash tools/gpu_suite.sh OUT_DIR [parts...]
# parts: ablation kv_long prefill memory profile serving poisson grid   (default: all)
#        extra parts: kv_ablation (int4 + INT8 KV row), cnn_no_evict, serving_int8kv, mixed300
set -u
OUTD=${1:?out dir}; shift
PARTS=${*:-"ablation kv_long prefill memory profile serving poisson grid"}
J=$OUTD/benchmark.json
export PYTHONUNBUFFERED=1
B="python3 benchmark.py --out_json $J --assets $OUTD"
for p in $PARTS; do
  echo "=== $p $(date +%T)"
  case $p in
    ablation) timeout 250 $B --ablation ;;
    kv_long)  timeout 70 $B --modes fp16,int8kv --batch 32 --input_len 1920 --output_len 128 --section kv_long ;;
    prefill)  timeout 35 $B --modes fp16 --batch 1 --input_len 2048 --output_len 2 --section prefill ;;
    grid)     timeout 120 $B --modes fp16,int8,int4,sq --batch 16,64 --input_len 128 --output_len 128 --section grid ;;
    memory)   timeout 50 $B --memory int4 ;;
    profile)  timeout 45 $B --profile --modes fp16,int4 --batch 1 --input_len 8 --output_len 50 --max_input_len 64 && gzip -f $OUTD/trace_*.json ;;
    poisson)  timeout 150 $B --serving --poisson_rates 8,16,32,64 --num_requests 200 ;;
    kv_ablation)    timeout 60 $B --ablation --only int4_int8kv ;;
    cnn_no_evict)   timeout 90 $B --serving --serving_parts cnn --scheduler_policy guaranteed_no_evict ;;
    serving_int8kv) timeout 60 $B --serving --serving_parts uniform --modes int8kv ;;
    mixed300)       timeout 200 $B --serving --serving_parts mixed,hf --mixed_requests 300 ;;
    serving)  timeout 200 $B --serving --serving_parts uniform,cnn,mixed,hf --num_requests 1000 --mixed_requests 100 ;;
  esac 2>&1 | grep -v "it/s\]\|FutureWarning\|rotary_emb = "
  echo "=== $p exit ${PIPESTATUS[0]}"   # the part's own status (124: its time limit)
done
echo "=== done $(date +%T)"
