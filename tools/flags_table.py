"""docs/flags.md: every flag of TensorRT-LLM's scripts that our scripts mirror, with its status.

    python tools/flags_table.py            # print the table
    python tools/flags_table.py --write    # rewrite docs/flags.md
    python tools/flags_table.py --check    # exit 1 when docs/flags.md is stale

The TensorRT-LLM flag lists below were read from its sources (v0.5.0 ``examples/llama``;
today's ``examples/run.py``, ``examples/summarize.py``, ``examples/utils.py``, the LLaMA
``convert_checkpoint.py`` and ``tensorrt_llm/commands/build.py``). Each row's status comes
from our parser itself: *supported*, *alias* (of our older name), *some values* (the others
are refused in one line), *accepted, no effect* (a TensorRT-only knob), *refused* (a feature
we lack; one ``error:`` line naming the flag), *ours* (not a TensorRT-LLM flag), or
*pending* (arrives with another branch of this round). tests/test_flags.py holds the file,
the parsers and these lists to each other.
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from llama_engine import cli_compat  # noqa: E402

V05_BUILD = """world_size tp_size pp_size model_dir ft_model_dir meta_ckpt_dir quant_ckpt_path dtype
timing_cache log_level vocab_size n_layer n_positions n_embd n_head n_kv_head multiple_of
ffn_dim_multiplier inter_size hidden_act rms_norm_eps max_batch_size max_input_len
max_output_len max_beam_width rotary_base rotary_scaling use_gpt_attention_plugin
use_gemm_plugin use_rmsnorm_plugin parallel_build enable_context_fmha
enable_context_fmha_fp32_acc visualize enable_debug_output gpus_per_node builder_opt
output_dir remove_input_padding use_smooth_quant per_channel per_token per_group group_size
int8_kv_cache use_parallel_embedding embedding_sharding_dim enable_fp8 fp8_kv_cache
quantized_fp8_model_path use_weight_only weight_only_precision use_inflight_batching
paged_kv_cache tokens_per_block max_num_tokens strongly_typed use_custom_all_reduce"""
TRTLLM_BUILD = """checkpoint_dir model_config build_config model_cls_file model_cls_name
output_dir max_batch_size max_input_len max_seq_len max_decoder_seq_len max_beam_width
max_num_tokens opt_num_tokens max_encoder_input_len max_prompt_embedding_table_size
max_multimodal_len kv_cache_type paged_kv_cache input_timing_cache output_timing_cache
profiling_verbosity strip_plan weight_sparsity weight_streaming fast_build workers log_level
enable_debug_output visualize_network dry_run monitor_memory logits_dtype
gather_context_logits gather_generation_logits gather_all_token_logits lora_dir
lora_ckpt_source lora_target_modules max_lora_rank speculative_decoding_mode max_draft_len
bert_attention_plugin gpt_attention_plugin gemm_plugin gemm_swiglu_plugin
fp8_rowwise_gemm_plugin nccl_plugin lora_plugin dora_plugin moe_plugin mamba_conv1d_plugin
low_latency_gemm_plugin low_latency_gemm_swiglu_plugin gemm_allreduce_plugin context_fmha
bert_context_fmha_fp32_acc remove_input_padding norm_quant_fusion reduce_fusion user_buffer
tokens_per_block use_paged_context_fmha use_fp8_context_fmha fuse_fp4_quant
multiple_profiles paged_state streamingllm manage_weights use_fused_mlp pp_reduce_scatter"""
V05_RUN = """max_output_len log_level engine_dir tokenizer_dir input_text input_tokens output_csv
output_npy num_beams"""
RUN = """max_input_length max_output_len draft_engine_dir input_text input_file
multimodal_input_file input_token_extra_ids input_token_extra_ids_file output_csv output_npy
output_generation_logits output_logits_npy output_log_probs_npy output_cum_log_probs_npy
run_profiling fail_fast_on_attention_window_too_large"""
UTILS = """num_beams num_return_sequences temperature top_k top_p length_penalty
repetition_penalty presence_penalty frequency_penalty min_p beam_search_diversity_rate
random_seed early_stopping beam_width_array end_id stop_words bad_words no_repeat_ngram_size
sink_token_length max_attention_window_size multi_block_mode enable_context_fmha_fp32_acc
cuda_graph_mode log_level no_prompt_template use_py_session debug_mode streaming
streaming_interval prompt_table_path prompt_tasks lora_dir lora_ckpt_source lora_task_uids
num_prepend_vtokens draft_target_model_config ngram_config prompt_lookup_config
medusa_choices eagle_choices eagle_posterior_threshold eagle_use_dynamic_tree
eagle_dynamic_tree_max_top_k lookahead_config engine_dir tokenizer_type vocab_file
no_add_special_tokens hf_model_dir model_dir tokenizer_dir gpu_weights_percent
max_tokens_in_paged_kv_cache kv_cache_enable_block_reuse no-kv_cache_enable_block_reuse
kv_cache_free_gpu_memory_fraction cross_kv_cache_fraction enable_chunked_context
hf_data_type data_type hf_device_map_auto return_all_generated_tokens language_task_uids
backend"""
V05_SUMMARIZE = """hf_model_location test_hf test_trt_llm data_type dataset_path log_level
engine_dir batch_size max_ite check_accuracy tensorrt_llm_rouge1_threshold num_beams top_k"""
SUMMARIZE = """test_hf test_trt_llm eval_task check_accuracy tensorrt_llm_rouge1_threshold
eval_ppl tensorrt_llm_ppl_threshold dataset_dir rouge_dir batch_size max_ite output_len
max_input_length output_dir"""
V05_HF_CONVERT = """-i --in-file -o --out-dir -tp --tensor-parallelism -p --processes -kv
--calibrate-kv-cache -sq --smoothquant --model -t --storage-type --multi-query-mode
--dataset-cache-dir"""
# TensorRT-LLM's examples/quantization/quantize.py (the flags our converter takes from it)
QUANTIZE = """kv_cache_dtype"""
CONVERT = """model_dir meta_ckpt_dir tp_size pp_size moe_tp_size cp_size moe_ep_size dtype
vocab_size n_positions n_layer n_head n_kv_head n_embd inter_size multiple_of
ffn_dim_multiplier rms_norm_eps use_weight_only disable_weight_only_quant_plugin
weight_only_precision calib_dataset calib_size calib_max_seq_length smoothquant use_qserve
per_channel per_token int8_kv_cache fp8_kv_cache quant_ckpt_path use_fp8 use_nvfp4
use_fp8_rowwise use_meta_fp8_rowwise_recipe per_group load_by_shard hidden_act rotary_base
group_size load_model_on_cpu use_parallel_embedding embedding_sharding_dim output_dir workers
moe_num_experts moe_top_k moe_renorm_mode save_config_only remove_duplicated_kv_heads
log_level"""

# Flags that other branches of this round add (sampling controls; speculative decoding).
SAMPLING = {"--repetition_penalty", "--presence_penalty", "--frequency_penalty",
            "--no_repeat_ngram_size", "--min_length", "--end_id", "--pad_id", "--stop_words",
            "--bad_words", "--random_seed"}
SPECULATIVE = {"--speculative_decoding_mode", "--max_draft_len", "--draft_engine_dir"}
PENDING: dict = {}


def _flags(text: str) -> list:
    return [x if x.startswith("-") else "--" + x for x in text.split()]


# our script -> [(TensorRT-LLM source, its flags)]
SOURCES = {
    "build.py": [("v0.5 build.py", _flags(V05_BUILD)), ("trtllm-build", _flags(TRTLLM_BUILD))],
    "run.py": [("v0.5 run.py", _flags(V05_RUN)), ("run.py", _flags(RUN)),
               ("utils.py", _flags(UTILS))],
    "summarize.py": [("v0.5 summarize.py", _flags(V05_SUMMARIZE)),
                     ("summarize.py", _flags(SUMMARIZE)), ("utils.py", _flags(UTILS))],
    "run_hf.py": [],
    "hf_llama_convert.py": [("v0.5 hf_llama_convert.py", _flags(V05_HF_CONVERT)),
                            ("quantize.py", _flags(QUANTIZE))],
    "convert_checkpoint.py": [("convert_checkpoint.py", _flags(CONVERT))],
}


def parsers() -> dict:
    """Our scripts' parsers, by file name."""
    import build
    import convert_checkpoint
    import hf_llama_convert
    import run
    import run_hf
    import summarize
    return {"build.py": build.build_parser(), "run.py": run.build_parser(),
            "summarize.py": summarize.build_parser(), "run_hf.py": run_hf.build_parser(),
            "hf_llama_convert.py": hf_llama_convert.build_parser(),
            "convert_checkpoint.py": convert_checkpoint.build_parser()}


def status_of(action: argparse.Action, flag: str) -> str:
    if isinstance(action, cli_compat.Refused):
        return f"refused: {action.why}"
    if isinstance(action, cli_compat.NoEffect):
        return f"accepted, no effect: {action.why}"
    if isinstance(action, cli_compat.OnlyValues):
        shown = ", ".join(str(v) for v in action.allowed if v is not None)
        return f"supported for {shown} only; others refused: {action.why}"
    longs = [o for o in action.option_strings if o.startswith("--")]
    main = longs[0] if longs else action.option_strings[0]
    if flag != main and flag in action.option_strings:
        return f"alias of `{main}`"
    return "supported"


def rows_for(script: str, parser) -> list:
    """(flag, sources, status) for every TensorRT-LLM flag and every flag of ours."""
    actions = parser._option_string_actions
    origin: dict = {}
    for source, flags in SOURCES[script]:
        for f in flags:
            origin.setdefault(f, []).append(source)
    for f in PENDING.get(script, ()):
        origin.setdefault(f, ["this round"])
    rows = []
    for f in sorted(set(origin) | {o for o in actions if o not in ("-h", "--help")},
                    key=lambda x: x.lstrip("-")):
        src = ", ".join(origin.get(f, [])) or "—"
        if f in actions:
            status = status_of(actions[f], f) if f in origin else (
                "ours" if status_of(actions[f], f) == "supported" else status_of(actions[f], f))
        elif f in PENDING.get(script, ()):
            status = "pending: " + ("sampling-controls branch" if f in SAMPLING or
                                    f in ("--temperature", "--top_k", "--top_p")
                                    else "speculative-decoding branch")
        else:
            status = "MISSING"
        rows.append((f, src, status))
    return rows


def render() -> str:
    out = ["# Flags: TensorRT-LLM's and ours",
           "",
           "Every flag of TensorRT-LLM's v0.5 `examples/llama` scripts and of today's "
           "`examples/run.py`, `examples/summarize.py`, `examples/utils.py`, LLaMA "
           "`convert_checkpoint.py` and `trtllm-build`, against the script here that takes "
           "it. Generated by `python tools/flags_table.py --write` from the parsers "
           "themselves; `tests/test_flags.py` fails when this file is stale, when a "
           "TensorRT-LLM flag is missing, or when a refused flag does not give one line "
           "naming it.",
           "",
           "Statuses: **supported**; **alias** of our older name; **supported for some "
           "values** (the others are refused in one line); **accepted, no effect** (a "
           "knob of TensorRT or of its runtime that has no counterpart here); **refused** "
           "(`error: --flag is not supported here: why`, exit 2); **ours** (not a "
           "TensorRT-LLM flag); **pending** (added by another branch of this round).",
           ""]
    for script, parser in parsers().items():
        out += [f"## {script}", "", "| flag | TensorRT-LLM source | status |",
                "|---|---|---|"]
        for f, src, status in rows_for(script, parser):
            out.append(f"| `{f}` | {src} | {status.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true")
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    text = render()
    path = os.path.join(REPO, "docs", "flags.md")
    if a.write:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")
    elif a.check:
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                print("docs/flags.md is stale: run python tools/flags_table.py --write")
                return 1
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
