"""TensorRT-LLM's command-line flags on our scripts: the ones we take under their name with no
work to do here, the ones we refuse, ``--log_level``, and the run-time flag set that
TensorRT-LLM's ``examples/utils.py`` gives run.py and summarize.py.

A refused flag (a feature this engine does not have: LoRA, Medusa, FP8, ...) is parsed, so the
user gets one line naming the flag and why (``error: --lora_dir is not supported here: ...``,
exit 2), never argparse's "unrecognized arguments". A no-effect flag is accepted silently (it
tunes something TensorRT-LLM has and we do not need: plugins, timing caches, sessions).
docs/flags.md lists every flag with its status; tests/test_flags.py holds both to each other.
"""
from __future__ import annotations

import argparse
import logging
from typing import Iterable, Optional

from llama_engine.cli import die, positive_int

# TensorRT-LLM's logger levels (examples/utils.py), most verbose first, as Python levels.
LOG_LEVELS = {"verbose": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR, "internal_error": logging.CRITICAL}


class Refused(argparse.Action):
    """A flag whose feature we lack: using it is one ``error:`` line naming it."""

    def __init__(self, option_strings, dest, why: str = "", **kwargs):
        kwargs.setdefault("nargs", "*")
        kwargs.setdefault("default", argparse.SUPPRESS)
        kwargs.setdefault("help", f"not supported here: {why}")
        self.why = why
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        die(f"{option_string} is not supported here: {self.why}")


class NoEffect(argparse.Action):
    """A TensorRT-LLM flag accepted (with or without a value) that changes nothing here."""

    def __init__(self, option_strings, dest, why: str = "", **kwargs):
        kwargs.setdefault("nargs", "?")
        kwargs.setdefault("default", None)
        kwargs.setdefault("help", f"accepted, no effect here: {why}")
        self.why = why
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values if values not in (None, []) else True)


class OnlyValues(argparse.Action):
    """A flag we support for some values only (``--num_beams 1``): others are refused."""

    def __init__(self, option_strings, dest, allowed: Iterable = (), why: str = "", **kwargs):
        self.allowed = tuple(allowed)
        self.why = why
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if values not in self.allowed:
            die(f"{option_string} {values} is not supported here: {self.why}")
        setattr(namespace, self.dest, values)


def has_flag(parser, name: str) -> bool:
    return name in parser._option_string_actions


def refuse(group, *names: str, why: str, nargs="*") -> None:
    group.add_argument(*names, action=Refused, why=why, nargs=nargs)


def no_effect(group, *names: str, why: str, nargs="?") -> None:
    group.add_argument(*names, action=NoEffect, why=why, nargs=nargs)


def add_log_level(parser, default: str = "info") -> None:
    """``--log_level`` with TensorRT-LLM's level names."""
    parser.add_argument("--log_level", default=default, choices=tuple(LOG_LEVELS),
                        help="logging level of the llama_engine and transformers loggers "
                             f"(default {default})")


def apply_log_level(level: Optional[str]) -> None:
    """Set the level of Python's logging for our modules and of transformers' logger."""
    if level is None:
        return
    value = LOG_LEVELS[level]
    ours = logging.getLogger("llama_engine")   # other libraries' loggers are left alone
    ours.setLevel(value)
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
        ours.addHandler(handler)
    logging.getLogger("transformers").setLevel(max(value, logging.WARNING)
                                               if level != "verbose" else value)


def early_stopping_arg(text: str):
    """``--early_stopping``: TensorRT-LLM's 1/0 or HF's true/false/never -> True/False/'never'."""
    table = {"1": True, "true": True, "0": False, "false": False, "never": "never"}
    v = str(text).strip().lower()
    if v not in table:
        raise argparse.ArgumentTypeError(f"must be 1, 0, true, false or never, got {text!r}")
    return table[v]


def add_beam_flags(parser) -> None:
    """Beam search (llama_engine/beam.py): --num_beams, --num_return_sequences,
    --length_penalty, --early_stopping with HF ``generate`` semantics."""
    g = parser.add_argument_group("beam search (TensorRT-LLM's flags, HF generate's scoring)")
    g.add_argument("--num_beams", type=positive_int, default=1,
                   help="beam width (1: greedy or sampling; > 1: beam search, each beam a "
                        "row of the batch)")
    g.add_argument("--num_return_sequences", type=positive_int, default=None,
                   help="best beams returned per prompt (default: all --num_beams)")
    g.add_argument("--length_penalty", type=float, default=1.0,
                   help="a finished beam scores sum(log p) / length ** this (default 1.0)")
    g.add_argument("--early_stopping", type=early_stopping_arg, default=True,
                   help="1/true: stop a prompt once num_beams beams finished (default); "
                        "0/false: once no running beam can beat them at its current length; "
                        "never: at the longest length when --length_penalty > 0")
    g.add_argument("--beam_search_diversity_rate", type=float, default=None,
                   action=OnlyValues, allowed=(None, 0.0),
                   why="diverse beam search is not built; leave it at 0",
                   help="0 only (no diverse beam search)")
    refuse(g, "--beam_width_array", why="variable beam width is not built")


def beam_settings(args) -> dict:
    """The beam flags as ``beam.BeamConfig`` keyword arguments (num_return_sequences
    defaults to num_beams); checked there."""
    n = args.num_return_sequences if args.num_return_sequences is not None else args.num_beams
    if n > args.num_beams:
        die(f"--num_return_sequences {n} is more than --num_beams {args.num_beams}")
    return dict(num_beams=args.num_beams, num_return_sequences=n,
                length_penalty=args.length_penalty, early_stopping=args.early_stopping)


def add_common_runtime_flags(parser) -> None:
    """The rest of TensorRT-LLM's examples/utils.py ``add_common_args`` that run.py and
    summarize.py do not define themselves: accepted with no effect, or refused. Flags the
    parser already has are left alone (call this last)."""
    g = parser.add_argument_group("other TensorRT-LLM run-time flags")

    def no(name, why, nargs="?"):
        if not has_flag(parser, name):
            no_effect(g, name, why=why, nargs=nargs)

    def ref(name, why):
        if not has_flag(parser, name):
            refuse(g, name, why=why)

    one_runtime = "one runtime here (no C++/Python session choice)"
    no("--use_py_session", one_runtime, nargs=0)
    no("--backend", "run.py detects the engine's backend from its directory")
    no("--multi_block_mode", "our decode attention splits long contexts by itself")
    no("--enable_context_fmha_fp32_acc", "attention accumulates in fp32 always", nargs=0)
    no("--cuda_graph_mode", "CUDA graphs are on by default here (--no_cuda_graphs)", nargs=0)
    no("--no_prompt_template", "no default prompt template for LLaMA (as in TensorRT-LLM)",
       nargs=0)
    no("--tokenizer_type", "the tokenizer type is read from the tokenizer files")
    no("--streaming_interval", "streaming prints every token as it comes")
    no("--kv_cache_enable_block_reuse", "no KV block reuse here; the flag changes nothing",
       nargs=0)
    no("--no-kv_cache_enable_block_reuse", "no KV block reuse here", nargs=0)
    no("--kv_cache_free_gpu_memory_fraction", "the paged KV cache is sized from the engine")
    no("--cross_kv_cache_fraction", "encoder-decoder models only")
    no("--return_all_generated_tokens", "streaming prints the new text of each step")
    no("--hf_device_map_auto", "the HF baseline loads on one device")
    no("--hf_data_type", "the HF model's dtype; no HF model runs in this script")
    no("--data_type", "the HF model's dtype; no HF model runs in this script")
    no("--streaming", "results print at the end; progress bars show the work", nargs=0)
    no("--fail_fast_on_attention_window_too_large", "an engine limit is always an error "
       "before any work", nargs=0)
    ref("--gpu_weights_percent", "no weight streaming; all weights stay on the device")
    ref("--max_tokens_in_paged_kv_cache", "the paged KV cache is sized from the engine")
    ref("--enable_chunked_context", "no chunked prefill")
    ref("--sink_token_length", "no attention sinks")
    ref("--max_attention_window_size", "no sliding-window attention")
    ref("--debug_mode", "no debug tensors")
    ref("--min_p", "no min-p sampling")
    ref("--prompt_table_path", "no prompt tuning")
    ref("--prompt_tasks", "no prompt tuning")
    ref("--num_prepend_vtokens", "no prompt tuning")
    ref("--lora_dir", "no LoRA")
    ref("--lora_ckpt_source", "no LoRA")
    ref("--lora_task_uids", "no LoRA")
    ref("--language_task_uids", "no language adapters")
    ref("--draft_target_model_config", "draft-target decoding is --speculative_decoding_mode "
        "draft_tokens_external with --draft_engine_dir here")
    for name in ("--ngram_config", "--prompt_lookup_config", "--medusa_choices",
                 "--eagle_choices", "--eagle_posterior_threshold", "--eagle_use_dynamic_tree",
                 "--eagle_dynamic_tree_max_top_k", "--lookahead_config"):
        ref(name, "no NGram/Medusa/EAGLE/lookahead decoding")
    ref("--vocab_file", "pass the tokenizer's folder (or .gguf) as --tokenizer_dir")
