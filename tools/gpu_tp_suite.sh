#!/usr/bin/env bash
# Tensor parallelism and inflight-batching measurements on a 2-GPU machine, in one call.
# Usage on the GPU machine: bash tools/gpu_tp_suite.sh OUT_DIR [parts...]
# parts: check tp13b serving_tp serving   (default: all); extra: profile_tp (where a TP token
#        goes: the all-reduces against the rest, LLaMA-13B batch 1, rank 0 traced),
#        serving_cmp (LLaMA-7B 1000 x 128/128 inflight
#        batching on one GPU, TP=2 NCCL, TP=2 one-shot), gpu_check (tools/gpu_check.py, one GPU),
#        pdl (tools/gpu_pdl_sweep.py on LLaMA-13B fp16: one GPU, then TP=2; PDL_SETTINGS,
#        PDL_BATCH)
# tp13b times one GPU, then TP=2 with NCCL's all-reduce and with the one-shot kernel (fused with
# the next RMSNorm): benchmark.py --tp_allreduce; profile_tp and serving_tp use TP_AR (default
# oneshot).
set -u
OUTD=${1:?out dir}; shift
PARTS=${*:-"check tp13b serving_tp serving"}
J=$OUTD/benchmark.json
# NVLink multicast off (it can take a shared host's GPUs out of service).
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TP_AR=${TP_AR:-oneshot}
B="python3 benchmark.py --out_json $J --assets $OUTD"
TR="python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmark.py --out_json $J --assets $OUTD"
G="--model_config llama-13b --modes fp16 --batch 1,16 --input_len 8 --output_len 50 --section tp"
nvidia-smi -L
for p in $PARTS; do
  echo "=== $p $(date +%T)"
  case $p in
    check)      timeout 330 python3 tools/gpu_tp_check.py --tp 2 --timeout 120 ;;
    profile_tp) timeout 150 $TR --tp_allreduce $TP_AR --model_config llama-13b --profile --modes fp16 --batch 1 --input_len 8 --output_len 50 --max_input_len 64 && gzip -f $OUTD/trace_*.json ;;
    tp13b)      timeout 100 $B $G; timeout 120 $TR $G --tp_allreduce nccl;
                timeout 120 $TR $G --tp_allreduce oneshot ;;
    gpu_check)  timeout 240 python3 tools/gpu_check.py ;;
    pdl)        S=${PDL_SETTINGS:-off,on,off,on}; rc=0  # either run failing fails the part
                timeout 150 python3 tools/gpu_pdl_sweep.py --batch ${PDL_BATCH:-1} --settings $S --json $OUTD/pdl_1gpu.json || rc=$?
                timeout 170 python3 -m torch.distributed.run --standalone --nproc_per_node 2 tools/gpu_pdl_sweep.py --tp_allreduce $TP_AR --batch ${PDL_BATCH:-1} --settings $S --json $OUTD/pdl_tp2.json || rc=$?
                (exit $rc) ;;
    serving_tp) timeout 100 $TR --tp_allreduce $TP_AR --serving --serving_parts uniform --num_requests 1000 ;;
    serving_cmp) timeout 100 $B --serving --serving_parts uniform --num_requests 1000;
                timeout 100 $TR --tp_allreduce nccl --serving --serving_parts uniform --num_requests 1000;
                timeout 100 $TR --tp_allreduce oneshot --serving --serving_parts uniform --num_requests 1000 ;;
    serving)    timeout 200 $B --serving --serving_parts uniform,cnn,mixed,hf --num_requests 1000 --mixed_requests 100 ;;
  esac 2>&1 | grep -v "it/s\]\|FutureWarning\|rotary_emb = "
  echo "=== $p exit ${PIPESTATUS[0]}"   # the part's own status (124: its time limit)
done
echo "=== done $(date +%T)"
