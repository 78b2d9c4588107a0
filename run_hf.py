"""Hugging Face baseline for run.py: the same prompts through transformers' greedy ``generate``.

    python run_hf.py --hf_model_location MODEL_DIR_OR.gguf --max_output_len 50 \
        [--tokenizer_dir DIR] [--input_text "..."]... [--input_file F] [--data_type fp16] \
        [--num_runs N] [--device cuda]

Prompts are tokenized with ``llama_engine.tokenizer`` (SentencePiece's ids for LLaMA, BOS
first), exactly as run.py tokenizes them, so the two scripts' outputs can be compared token
for token. Prints ``Input: "…"`` / ``Output: "…"`` per prompt, then
``llama-hf-run (mean latency: X sec)`` and tokens per second.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from llama_engine import cli, cli_compat
from llama_engine.cli import (DTYPE_CHOICES, add_prompt_args, default_dtype_for, parse_dtype,
                              print_io, print_timing, read_prompts, resolve_device, run_main,
                              strip_at_end, torch_dtype)
from llama_engine.config import ConfigError
from llama_engine.tokenizer import load_tokenizer

RUN_NAME = "llama-hf-run"


def load_hf_model(location: str, dtype: str, device: str):
    """``AutoModelForCausalLM`` from a HF folder or a ``.gguf`` file (dequantized by
    transformers), in ``dtype`` on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    if not os.path.exists(location):
        raise ConfigError(f"--hf_model_location {location} does not exist")
    tdtype = torch_dtype(dtype)
    kwargs = {}
    if os.path.isfile(location):
        if not location.endswith(".gguf"):
            raise ConfigError(f"--hf_model_location {location}: expected a folder or a .gguf file")
        folder, name = os.path.split(os.path.abspath(location))
        kwargs["gguf_file"] = name
    else:
        folder = location
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=tdtype, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"cannot load HF model from {location} ({type(e).__name__}: {msg})"
                          ) from None
    if model.dtype != tdtype:     # GGUF dequantizes to fp32 whatever was asked
        model = model.to(tdtype)
    return model.to(device).eval()


def hf_generate(model, batch_ids: Sequence[Sequence[int]], max_new_tokens: int, tokenizer
                ) -> list[list[int]]:
    """Greedy generation for a batch of prompts (left-padded, as TensorRT-LLM's summarize.py
    does for HF). Returns the generated ids of each prompt, stopped before the first end id."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    width = max(len(x) for x in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, ids in enumerate(batch_ids):
        input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask[i, width - len(ids):] = 1
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        eos_token_id=tokenizer.end_ids or None, pad_token_id=pad,
        bos_token_id=tokenizer.bos_id)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             generation_config=gen_config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    gen = out[:, width:].tolist()                    # [B, <= max_new_tokens]
    return [strip_at_end(g, tokenizer.end_ids) for g in gen]


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_model_location", "--hf_model_dir", "--model_dir",
                   dest="hf_model_location", required=True,
                   help="HF model folder or a .gguf file")
    p.add_argument("--tokenizer_dir", default=None,
                   help="tokenizer folder/file (default: --hf_model_location)")
    p.add_argument("--max_output_len", type=int, required=True)
    add_prompt_args(p)
    p.add_argument("--num_runs", type=int, default=1,
                   help="timed runs; with more than one, an untimed warm-up run comes first")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--data_type", "--hf_data_type", dest="data_type", choices=DTYPE_CHOICES,
                   default=None, help="model dtype (default: fp16 on CUDA, fp32 on CPU)")
    cli_compat.add_log_level(p, default="error")
    cli_compat.add_beam_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args))


def _main(args) -> int:
    import torch

    cli_compat.apply_log_level(args.log_level)
    if args.max_output_len <= 0:
        raise ConfigError(f"--max_output_len must be positive, got {args.max_output_len}")
    if args.num_runs <= 0:
        raise ConfigError(f"--num_runs must be positive, got {args.num_runs}")
    if not os.path.exists(args.hf_model_location):
        raise ConfigError(f"--hf_model_location {args.hf_model_location} does not exist")
    device = resolve_device(args.device)
    dtype = parse_dtype(args.data_type) if args.data_type else default_dtype_for(device)

    prompts = read_prompts(args.input_text, args.input_file)
    tokenizer = load_tokenizer(args.tokenizer_dir or args.hf_model_location)
    batch_ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
    model = load_hf_model(args.hf_model_location, dtype, device)

    def once():
        # One prompt at a time: HF's padded batches are not bit-exact with unpadded ones.
        return [hf_generate(model, [ids], args.max_output_len, tokenizer)[0]
                for ids in batch_ids]

    if args.num_runs > 1:
        once()                                          # warm-up, untimed
    latencies, outputs = [], None
    for _ in range(args.num_runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outputs = once()
        latencies.append(time.perf_counter() - t0)

    for prompt, out in zip(prompts, outputs):
        print_io(prompt, tokenizer.decode(out))
    print_timing(RUN_NAME, sum(latencies) / len(latencies), sum(len(o) for o in outputs))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
