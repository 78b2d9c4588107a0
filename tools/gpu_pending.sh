#!/usr/bin/env bash
# The GPU measurements still owed to issues 18-22, in parts, so that a short lease runs the
# parts it can: bash tools/gpu_pending.sh $OUT part[,part...] (each part has its own time limit;
# the parts and their commands are the case list below). Carry .whl for the http part.
set -u
OUT=${1:?out dir}; PARTS=${2:-spec,zp}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $OUT/log.txt
part() { local name=$1 lim=$2; shift 2; echo "=== $name ($(date +%T)) $*" | tee -a $OUT/log.txt
  timeout $lim "$@" 2>&1 | tee -a $OUT/log.txt | tail -n 80 > $OUT/$name.txt; echo "=== $name rc=${PIPESTATUS[0]} ($(date +%T))" | tee -a $OUT/log.txt; }
for p in ${PARTS//,/ }; do case $p in
  spec) part spec 90 python benchmark.py --model_config llama-7b --speculative --modes fp16,int4 --spec_context 512 --spec_acceptance assets/spec_acceptance.json ;;
  zp) part zp 110 python tools/gpu_int4_zp_bench.py --M 1,4,16,64 --group_size 128 --json $OUT/zp.json ;;
  fp8kv) part fp8kv 150 python benchmark.py --model_config llama-7b --modes fp16,fp16_fp8kv --batch 32 --input_len 1920 --output_len 128 --max_input_len 2048 --section fp8kv_b32 --out_json assets/benchmark_fp8kv.json ;;
  fp8kvtest) part fp8kvtest 120 python -m pytest -q -x tests/test_fp8_kv.py ;;
  gptfasttest) part gptfasttest 120 env OMP_NUM_THREADS=8 python -m pytest -q tests/test_gptfast_baseline.py -k cuda ;;
  gptfast) part gptfast 420 python benchmark.py --gptfast --out_json $OUT/gptfast.json --assets $OUT ;;
  prefilltest) part prefilltest 100 python -m pytest -q -m gpu tests/test_gpu.py -k prefill ;;
  spectest) part spectest 100 python -m pytest -q -m gpu tests/test_gpu.py -k speculative ;;
  prefill) part prefill 300 python benchmark.py --prefill --modes fp16,int8,int4,int4_zp,sq,int8kv,int4_int8kv --out_json $OUT/prefill.json ;;
  gputest) part gputest 200 python -m pytest -q -m gpu tests/ ;;
  http) part http 300 python benchmark.py --model_config llama-7b --serving --http --http_parts uniform,prefix --num_requests 1000 --stream_interval 1,4 ;;
  fp8check) part fp8check 330 python tools/gpu_fp8_check.py --sweep --write --json $OUT/fp8_check.json ;;
  fp8) part fp8 240 python benchmark.py --model_config llama-7b --modes fp16,fp8,fp8_pcpt --batch 1,64 --input_len 128 --output_len 128 --section fp8 ;;
  fp8serve) for m in fp16 fp8_fp8kv; do part fp8serve_$m 150 python benchmark.py --model_config llama-7b --serving --serving_parts uniform --modes $m --num_requests 1000; done ;;
  int8g) part int8g 100 python tools/gpu_int8_group_bench.py --json $OUT/int8g.json ;;
  beam) part beam 85 python tools/gpu_beam_bench.py --runs 2 --json $OUT/beam.json ;;
  fp8test) part fp8test 120 python -m pytest -q -x tests/test_fp8.py tests/test_fp8_kv.py ;;
  fp8modules) part fp8modules 120 python tools/gpu_fp8_check.py --modules --M 1 --json $OUT/fp8_modules.json ;;
  fp8q) part fp8q 150 python benchmark.py --model_config llama-7b --modes fp16,fp8 --batch 1,64 --input_len 128 --output_len 128 --section fp8_tuned ;;
  fp8sweep) part fp8sweep 300 python tools/gpu_fp8_check.py --sweep --write --skip_logits --M 1,16,64 --json $OUT/fp8_sweep.json ;;
  httpu) part httpu 150 python benchmark.py --model_config llama-7b --serving --http --http_parts uniform --num_requests 1000 ;;
  dq) part dq 150 python tools/gpu_dequant_bench.py --json $OUT/dequant.json ;;
  dqtest) part dqtest 100 python -m pytest -q -m gpu tests/test_gpu.py -k "dequant or prefill_graph" ;;
  fp8b1) part fp8b1 40 python benchmark.py --model_config llama-7b --modes fp16,fp8 --batch 1 --input_len 128 --output_len 128 --section fp8_dot ;;
esac; done
tar czf $OUT/assets.tgz assets docs/runs llama_engine/kernels/configs 2>/dev/null
