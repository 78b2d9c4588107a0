"""Hugging Face baseline for run.py: the same prompts through transformers' ``generate``
(greedy, or beam search with run.py's beam flags: --num_beams, --num_return_sequences,
--length_penalty, --early_stopping).

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
                              torch_dtype)
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


def hf_generate_kwargs(sampling=None, beam: Optional[dict] = None, tokenizer=None) -> dict:
    """``generate`` keyword arguments for our controls (``sampling.SamplingConfig``) and beam
    settings (``cli_compat.beam_settings``), HF's names and meanings: sampling ->
    do_sample/temperature/top_k/top_p, ``repetition_penalty``, ``no_repeat_ngram_size``,
    ``min_length`` -> ``min_new_tokens``, ``bad_words`` -> ``bad_words_ids``, ``end_id`` /
    ``pad_id`` -> ``eos_token_id`` / ``pad_token_id``; the OpenAI presence/frequency
    penalties (HF has none) and ``stop_words`` (token sequences) by a logits processor and
    a stopping criterion of ours."""
    kw: dict = {"do_sample": False, "num_beams": 1}
    if sampling is not None:
        if not sampling.greedy:
            kw.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                      top_p=sampling.top_p if sampling.top_p > 0 else 1.0)
        if sampling.repetition_penalty != 1.0:
            kw["repetition_penalty"] = sampling.repetition_penalty
        if sampling.no_repeat_ngram_size:
            kw["no_repeat_ngram_size"] = sampling.no_repeat_ngram_size
        if sampling.min_length:
            kw["min_new_tokens"] = sampling.min_length
        if sampling.bad_words:
            kw["bad_words_ids"] = [list(w) for w in sampling.bad_words]
        if sampling.end_id is not None:
            kw["eos_token_id"] = sampling.end_id
        if sampling.pad_id is not None:
            kw["pad_token_id"] = sampling.pad_id
    if beam is not None and beam["num_beams"] > 1:
        kw.update(num_beams=beam["num_beams"], length_penalty=beam["length_penalty"],
                  early_stopping=beam["early_stopping"],
                  num_return_sequences=beam["num_return_sequences"])
    return kw


def _extra_processors(sampling, prompt_len: int):
    """(logits processors, stopping criteria) for the controls HF lacks."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    class OpenAIPenalties(LogitsProcessor):
        def __call__(self, input_ids, scores):
            gen = input_ids[:, prompt_len:]
            counts = torch.zeros_like(scores).scatter_add_(
                1, gen, torch.ones_like(gen, dtype=scores.dtype))
            return (scores - sampling.presence_penalty * (counts > 0).to(scores.dtype)
                    - sampling.frequency_penalty * counts)

    class StopWords(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            gen = input_ids[:, prompt_len:].tolist()
            done = [any(len(g) >= len(w) and g[-len(w):] == list(w)
                        for w in sampling.stop_words) for g in gen]
            return torch.tensor(done, device=input_ids.device)

    procs, stops = [], []
    if sampling is not None and (sampling.presence_penalty or sampling.frequency_penalty):
        procs.append(OpenAIPenalties())
    if sampling is not None and sampling.stop_words:
        stops.append(StopWords())
    return procs, stops


def hf_generate(model, batch_ids: Sequence[Sequence[int]], max_new_tokens: int, tokenizer,
                sampling=None, beam: Optional[dict] = None) -> list[list[int]]:
    """Generation for a batch of prompts (left-padded, as TensorRT-LLM's summarize.py
    does for HF): greedy, or with ``sampling``'s controls and ``beam``'s beam search
    (``hf_generate_kwargs``). Returns the generated ids of each prompt (with beams:
    ``num_return_sequences`` rows per prompt), stopped before the first end id or stop
    word."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    from llama_engine.sampling import cut_at_stop

    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    width = max(len(x) for x in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, ids in enumerate(batch_ids):
        input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        mask[i, width - len(ids):] = 1
    kw = dict(eos_token_id=tokenizer.end_ids or None, pad_token_id=pad,
              bos_token_id=tokenizer.bos_id)
    kw.update(hf_generate_kwargs(sampling, beam))
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, **kw)
    procs, stops = _extra_processors(sampling, width)
    if sampling is not None and sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             generation_config=gen_config,
                             logits_processor=LogitsProcessorList(procs),
                             stopping_criteria=StoppingCriteriaList(stops))
    if device.type == "cuda":
        torch.cuda.synchronize()
    gen = out[:, width:].tolist()                    # [B (x beams), <= max_new_tokens]
    ends = [kw["eos_token_id"]] if isinstance(kw["eos_token_id"], int) else (
        kw["eos_token_id"] or [])
    words = sampling.stop_words if sampling is not None else ()
    return [cut_at_stop(g, ends, words)[0] for g in gen]


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
    beam = cli_compat.beam_settings(args)
    per_prompt = beam["num_return_sequences"] if beam["num_beams"] > 1 else 1

    def once():
        # One prompt at a time: HF's padded batches are not bit-exact with unpadded ones.
        return [row for ids in batch_ids
                for row in hf_generate(model, [ids], args.max_output_len, tokenizer, beam=beam)]

    if args.num_runs > 1:
        once()                                          # warm-up, untimed
    latencies, outputs = [], None
    for _ in range(args.num_runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outputs = once()
        latencies.append(time.perf_counter() - t0)

    for i, out in enumerate(outputs):
        print_io(prompts[i // per_prompt], tokenizer.decode(out))
    print_timing(RUN_NAME, sum(latencies) / len(latencies), sum(len(o) for o in outputs))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
