"""Summarization accuracy on cnn_dailymail: our engine vs Hugging Face, scored with ROUGE.

Mirrors TensorRT-LLM's ``examples/summarize.py`` (same flag names, prompt and result lines):

    python summarize.py --test_trt_llm --engine_dir ENGINE --test_hf \
        --hf_model_location MODEL_DIR_OR.gguf [--tokenizer_dir DIR] [--data_type fp16] \
        [--dataset_path test.jsonl] [--batch_size 1] [--max_ite 20] [--output_len 100] \
        [--max_input_length 923] [--use_chat_template] [--check_accuracy \
        --tensorrt_llm_rouge1_threshold 14] [--output_json out.json]

``--test_trt_llm`` runs *our* engine (the flag keeps TensorRT-LLM's name); its result lines
name the backend that ran ("PyTorch engine (ours)", or "TensorRT-LLM" for a TensorRT-LLM
engine dir). Both sides get the same prompt ids (``llama_engine.prompts``), generate greedily
(or with run.py's sampling flags, or with --num_beams N: HF's ``generate(num_beams=N)`` as
the baseline; beam 0 is scored), and are scored by ``llama_engine.rouge`` (equal to ``evaluate``'s rouge, bootstrap seeded
with 0). Each side first runs an untimed warm-up on the first article, as TensorRT-LLM does.
``--eval_ppl`` adds each side's perplexity of the reference summaries (teacher forced after
the prompt, ``llama_engine.perplexity``), or with ``--ppl_of output`` of the prompt and the
side's own output as TensorRT-LLM scores it; with ``--check_accuracy`` it must not exceed
``--tensorrt_llm_ppl_threshold``. TensorRT-LLM's other flags: docs/flags.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from llama_engine import cli, cli_compat
from llama_engine.cli import (DTYPE_CHOICES, default_dtype_for, parse_dtype, resolve_device,
                              run_main, strip_at_end)
from llama_engine import options as runtime_options
from llama_engine.config import ConfigError
from llama_engine.prompts import (DEFAULT_MAX_INPUT_LENGTH, build_summarize_prompt,
                                  load_cnn_dailymail)
from llama_engine.rouge import RougeResult, compute_rouge, format_rouge
from llama_engine.tokenizer import find_tokenizer_source, load_tokenizer

ENGINE_BACKEND_NAME = "PyTorch engine (ours)"
TRTLLM_BACKEND_NAME = "TensorRT-LLM"
HF_BACKEND_NAME = "Hugging Face"


@dataclass
class SideResult:
    """One side's run: texts, ids, time and scores."""

    key: str                         # "engine" | "hf"
    backend: str
    outputs: list = field(default_factory=list)       # decoded summaries, one per article
    output_ids: list = field(default_factory=list)    # generated ids (end id excluded)
    latency_s: float = 0.0                            # timed loop, warm-up excluded
    rouge: Optional[RougeResult] = None
    ppls: Optional[list] = None                       # --eval_ppl: one per article

    @property
    def ppl(self) -> float:
        return sum(self.ppls) / len(self.ppls) if self.ppls else float("nan")

    @property
    def output_tokens(self) -> int:
        return sum(len(x) for x in self.output_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.latency_s if self.latency_s > 0 else float("nan")

    def print_result(self, file=None) -> None:
        file = file or sys.stdout
        name = self.backend
        print(f"{name} (total latency: {self.latency_s} sec)", file=file)
        print(f"{name} (total output tokens: {self.output_tokens})", file=file)
        print(f"{name} (tokens per second: {self.tokens_per_s})", file=file)
        print(f"{name} beam 0 result", file=file)
        for line in format_rouge(self.rouge):
            print(line, file=file)
        if self.ppls is not None:
            print(f"  Per-token perplexity: {self.ppl}", file=file)

    def to_json(self) -> dict:
        return {"backend": self.backend, "total_latency_s": self.latency_s,
                "output_tokens": self.output_tokens, "tokens_per_s": self.tokens_per_s,
                **(self.rouge.to_json() if self.rouge else {}),
                **({"perplexity": self.ppl, "perplexities": self.ppls}
                   if self.ppls is not None else {}),
                "outputs": self.outputs, "output_ids": self.output_ids}


def engine_backend_name(engine_dir: str) -> str:
    try:  # the TensorRT-LLM backend module arrives with its own issue
        from llama_engine.trtllm import is_trtllm_engine_dir
    except ImportError:
        return ENGINE_BACKEND_NAME
    return TRTLLM_BACKEND_NAME if is_trtllm_engine_dir(engine_dir) else ENGINE_BACKEND_NAME


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _timed_loop(prompts: list, batch_size: int, device: str, generate,
                desc: str = "") -> tuple[list, float]:
    """Run ``generate(batch) -> list of id lists`` over all batches; returns ids and seconds.
    A progress bar on stderr counts articles, with the side's output tokens/s and the ETA."""
    from tqdm import tqdm

    ids, total, tokens = [], 0.0, 0
    with tqdm(total=len(prompts), desc=desc, unit="article", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for batch in _batches(prompts, batch_size):
            _sync(device)
            t0 = time.perf_counter()
            out = generate(batch)
            _sync(device)
            total += time.perf_counter() - t0
            ids.extend(out)
            tokens += sum(len(x) for x in out)
            bar.set_postfix_str(f"{tokens / total:.1f} tok/s" if total > 0 else "")
            bar.update(len(batch))
    return ids, total


def reference_ids(records: list, tokenizer, output_len: int) -> list:
    """The reference summaries as ids (no BOS), at most ``output_len`` tokens each."""
    return [tokenizer.encode(r["highlights"], add_bos=False)[:output_len] for r in records]


def side_perplexities(log_probs_of, prompts: list, references, outputs: list,
                      desc: str) -> list:
    """Per-article perplexity, with a progress bar: of the reference after the prompt, or
    (``references == "output"``) of the prompt and the side's own ``outputs`` together, from
    the second token on (TensorRT-LLM's form)."""
    from tqdm import tqdm

    from llama_engine.perplexity import perplexity
    whole = references == "output"
    targets = outputs if whole else references
    return [perplexity(log_probs_of(p, t, whole)) for p, t in
            tqdm(list(zip(prompts, targets)), desc=f"{desc} ppl", unit="article",
                 file=sys.stderr, dynamic_ncols=True) if t or whole]


def run_engine_side(args, prompts: list, tokenizer, device: str, references=None) -> SideResult:
    from run import generate_inflight, load_runner
    engine, backend = load_runner(args.engine_dir, device, None,
                                  options=runtime_options.from_args(args))
    _check_engine_limits(engine, args, max(len(p) for p in prompts))
    from llama_engine import speculative
    spec = speculative.config_from_args(args, engine)
    spec_kw = {"speculative": spec} if spec is not None else {}

    # The one stopping rule for both paths: the model's end ids (Tokenizer.end_ids); greedy
    # unless the sampling flags say otherwise; beam 0 of --num_beams is scored.
    sampling = cli.sampling_from_args(args, tokenizer)
    from llama_engine.beam import BeamConfig
    beam = BeamConfig(**cli_compat.beam_settings(args))
    if beam.enabled:
        if spec is not None:
            raise ConfigError("--num_beams > 1 does not combine with speculative decoding")
        beam.check_sampling(sampling, "--num_beams")
        spec_kw = {"beam": beam}

    def generate(batch):
        if args.use_inflight_batching:
            out = generate_inflight(engine, batch, args.output_len, sampling,
                                    stop_ids=tokenizer.end_ids,
                                    scheduler_policy=args.scheduler_policy,
                                    enable_prefix_caching=args.enable_prefix_caching, **spec_kw)
        else:
            out = engine.generate(batch, max_new_tokens=args.output_len, sampling=sampling,
                                  end_id=tokenizer.end_ids, **spec_kw)
        rows = out.output_ids[::getattr(out, "num_return_sequences", 1)]  # beam 0 of each
        return [strip_at_end(ids, tokenizer.end_ids) for ids in rows]

    generate(prompts[:1])                                   # warm-up, untimed
    ids, latency = _timed_loop(prompts, args.batch_size, device, generate, desc="engine")
    side = SideResult("engine", backend, [tokenizer.decode(x) for x in ids], ids, latency)
    if references is not None:
        if not hasattr(engine, "forward_logits"):
            raise ConfigError(f"--eval_ppl: the {backend} runner gives no logits")
        from llama_engine.perplexity import engine_log_probs
        side.ppls = side_perplexities(lambda p, r, w: engine_log_probs(engine, p, r, w),
                                      prompts, references, ids, "engine")
    return side


def _check_engine_limits(engine, args, longest_prompt: int) -> None:
    """Fail before a long run, not in its middle, when the engine was built too small."""
    build = getattr(getattr(engine, "config", None), "build", None)
    if build is None:
        return
    checks = (("max_input_len", longest_prompt, "--max_input_length"),
              ("max_output_len", args.output_len, "--output_len"),
              ("max_batch_size", args.batch_size, "--batch_size"))
    for name, need, flag in checks:
        have = getattr(build, name, None)
        if have is not None and need > have:
            raise ConfigError(f"engine {args.engine_dir} was built with {name}={have} but this "
                              f"run needs {need}; lower {flag} or rebuild with --{name} {need}")


def run_hf_side(args, prompts: list, tokenizer, device: str, references=None) -> SideResult:
    from run_hf import hf_generate, load_hf_model

    dtype = parse_dtype(args.data_type) if args.data_type else default_dtype_for(device)
    model = load_hf_model(args.hf_model_location, dtype, device)

    sampling = cli.sampling_from_args(args, tokenizer)
    beam = cli_compat.beam_settings(args)
    step = beam["num_return_sequences"] if beam["num_beams"] > 1 else 1

    def generate(batch):
        rows = hf_generate(model, batch, args.output_len, tokenizer, sampling, beam)
        return rows[::step]                                  # beam 0 of each prompt

    generate(prompts[:1])                                   # warm-up, untimed
    ids, latency = _timed_loop(prompts, args.batch_size, device, generate, desc="HF")
    side = SideResult("hf", HF_BACKEND_NAME, [tokenizer.decode(x) for x in ids], ids, latency)
    if references is not None:
        from llama_engine.perplexity import hf_log_probs
        side.ppls = side_perplexities(lambda p, r, w: hf_log_probs(model, p, r, w), prompts,
                                      references, ids, "HF")
    return side


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--test_trt_llm", action="store_true",
                   help="run our engine (--engine_dir); TensorRT-LLM's flag name")
    p.add_argument("--test_hf", action="store_true", help="run the HF baseline")
    p.add_argument("--engine_dir", default=None)
    p.add_argument("--hf_model_location", "--hf_model_dir", "--model_dir",
                   dest="hf_model_location", default=None, help="HF folder or .gguf file")
    p.add_argument("--tokenizer_dir", default=None,
                   help="default: the engine dir's tokenizer, else --hf_model_location")
    p.add_argument("--data_type", "--hf_data_type", dest="data_type", choices=DTYPE_CHOICES,
                   default=None,
                   help="HF model dtype (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--dataset_path", "--dataset_dir", dest="dataset_path", default=None,
                   help="jsonl/json/parquet with article+highlights, or a saved HF dataset; "
                        "default: datasets.load_dataset('cnn_dailymail', '3.0.0')")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_ite", type=int, default=20)
    p.add_argument("--output_len", type=int, default=100)
    p.add_argument("--max_input_length", type=int, default=DEFAULT_MAX_INPUT_LENGTH)
    p.add_argument("--check_accuracy", action="store_true")
    p.add_argument("--tensorrt_llm_rouge1_threshold", type=float, default=14.0)
    p.add_argument("--eval_ppl", action="store_true",
                   help="also score each side's perplexity (of what: --ppl_of)")
    p.add_argument("--ppl_of", choices=("reference", "output"), default=None,
                   help="--eval_ppl scores the reference summary after the prompt (default), "
                        "or, as TensorRT-LLM's summarize.py does, the prompt and the side's "
                        "own output from the second token on")
    p.add_argument("--tensorrt_llm_ppl_threshold", type=float, default=15.0,
                   help="with --check_accuracy --eval_ppl: the engine's largest passing "
                        "perplexity (default 15.0)")
    p.add_argument("--eval_task", default="summarize", action=cli_compat.OnlyValues,
                   allowed=("summarize",), why="cnn_dailymail summarization only",
                   help="summarize (the only task here)")
    p.add_argument("--output_dir", default=None,
                   help="write the summaries, one per line: trtllm.out (engine), hf.out (HF)")
    p.add_argument("--use_chat_template", action="store_true",
                   help="wrap an instruction and the article in the tokenizer's chat template")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--output_json", default=None,
                   help="write per-article outputs and the scores to this file")
    p.add_argument("--use_inflight_batching", action="store_true",
                   help="run the engine side through the inflight-batching scheduler")
    p.add_argument("--scheduler_policy", default="max_utilization",
                   choices=("max_utilization", "guaranteed_no_evict"),
                   help="with --use_inflight_batching: see run.py --help")
    cli.add_prefix_caching_arg(p)
    runtime_options.add_arguments(p)
    cli_compat.add_log_level(p)
    cli_compat.no_effect(p, "--rouge_dir", why="ROUGE is computed in-process "
                         "(llama_engine.rouge)")
    cli_compat.no_effect(p, "--no_add_special_tokens", nargs=0,
                         why="the summarize prompt builder decides BOS")
    cli_compat.add_beam_flags(p)
    g = p.add_argument_group("sampling controls (run.py's): both sides get them, ours in the "
                             "engine, HF's generate with the same controls")
    cli.add_sampling_args(g)
    cli_compat.add_common_runtime_flags(p)
    cli.add_speculative_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args))


def _validate(args) -> None:
    if not (args.test_trt_llm or args.test_hf):
        raise ConfigError("nothing to do: pass --test_trt_llm and/or --test_hf")
    if args.test_trt_llm and not args.engine_dir:
        raise ConfigError("--test_trt_llm needs --engine_dir")
    if args.test_hf and not args.hf_model_location:
        raise ConfigError("--test_hf needs --hf_model_location")
    if args.enable_prefix_caching and not args.use_inflight_batching:
        raise ConfigError("--enable_prefix_caching needs --use_inflight_batching")
    if args.ppl_of is not None and not args.eval_ppl:
        raise ConfigError("--ppl_of says what --eval_ppl scores; pass --eval_ppl too")
    for name in ("batch_size", "max_ite", "output_len", "max_input_length"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be positive, got {getattr(args, name)}")


def _tokenizer_source(args) -> str:
    if args.tokenizer_dir:
        return args.tokenizer_dir
    if args.test_trt_llm and find_tokenizer_source(args.engine_dir):
        return args.engine_dir
    if args.hf_model_location:
        return args.hf_model_location
    raise ConfigError(f"no tokenizer in {args.engine_dir}; pass --tokenizer_dir")


def _main(args) -> int:
    cli_compat.apply_log_level(args.log_level)
    _validate(args)
    if args.test_trt_llm:
        cli.check_engine_dir(args.engine_dir)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(_tokenizer_source(args))
    records = load_cnn_dailymail(args.dataset_path, split="test",
                                 limit=args.batch_size * args.max_ite)
    prompts = [build_summarize_prompt(r["article"], tokenizer, args.max_input_length,
                                      use_chat_template=args.use_chat_template)
               for r in records]
    references = [r["highlights"] for r in records]
    print(f"summarize: {len(records)} articles, batch {args.batch_size}, "
          f"output_len {args.output_len}, prompt tokens {min(map(len, prompts))}.."
          f"{max(map(len, prompts))}, device {device}", file=sys.stderr)

    refs = None
    if args.eval_ppl:
        refs = ("output" if args.ppl_of == "output"
                else reference_ids(records, tokenizer, args.output_len))
    sides = []
    if args.test_trt_llm:
        sides.append(run_engine_side(args, prompts, tokenizer, device, refs))
        _free_memory(device)             # the engine is gone with its function's frame
    if args.test_hf:
        sides.append(run_hf_side(args, prompts, tokenizer, device, refs))
        _free_memory(device)
    for side in sides:
        side.rouge = compute_rouge(side.outputs, references, seed=0)

    for side in sides:                                  # engine first, as run
        print(f'{side.backend} output for article 0: "{side.outputs[0]}"')
    for side in sides:
        side.print_result()
    if len(sides) == 2:
        print(identical_line(sides[0], sides[1]))
    sys.stdout.flush()

    if args.output_json:
        _write_json(args, records, prompts, sides)
    if args.output_dir:
        _write_out_files(args.output_dir, sides)

    if args.check_accuracy:
        side = sides[0]           # the engine side when it ran (TensorRT-LLM checks only it)
        rouge1 = side.rouge.scaled()["rouge1"]
        if not rouge1 > args.tensorrt_llm_rouge1_threshold:
            print(f"[FAILED] {side.backend} rouge1 ({rouge1}) is smaller than threshold "
                  f"({args.tensorrt_llm_rouge1_threshold}).")
            return 1
        print(f"[PASSED] {side.backend} rouge1 ({rouge1}) > threshold "
              f"({args.tensorrt_llm_rouge1_threshold}).")
        if args.eval_ppl:
            if not side.ppl <= args.tensorrt_llm_ppl_threshold:
                print(f"[FAILED] {side.backend} perplexity ({side.ppl}) is larger than "
                      f"threshold ({args.tensorrt_llm_ppl_threshold}).")
                return 1
            print(f"[PASSED] {side.backend} perplexity ({side.ppl}) <= threshold "
                  f"({args.tensorrt_llm_ppl_threshold}).")
    return 0


def _write_out_files(folder: str, sides: list) -> None:
    """TensorRT-LLM's --output_dir: trtllm.out and hf.out, one summary per line."""
    try:
        os.makedirs(folder, exist_ok=True)
        for side in sides:
            name = "trtllm.out" if side.key == "engine" else "hf.out"
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                for text in side.outputs:
                    f.write(text.replace("\n", " ") + "\n")
    except OSError as e:
        raise ConfigError(f"--output_dir {folder}: cannot write ({e.strerror})") from None


def identical_line(a: SideResult, b: SideResult) -> str:
    """"N/M summaries identical": how many articles got the same generated ids on both sides."""
    same = sum(x == y for x, y in zip(a.output_ids, b.output_ids))
    return f"{same}/{len(a.output_ids)} summaries identical ({a.backend} vs {b.backend})"


def _write_json(args, records, prompts, sides) -> None:
    articles = []
    for i, (r, p) in enumerate(zip(records, prompts)):
        item = {"index": i, "id": r.get("id"), "highlights": r["highlights"],
                "input_tokens": len(p)}
        for side in sides:
            item[side.key] = {"output": side.outputs[i], "output_ids": side.output_ids[i],
                              "rouge": side.rouge.per_example[i]}
        articles.append(item)
    doc = {"config": {k: v for k, v in vars(args).items()},
           "results": {side.key: {k: v for k, v in side.to_json().items()
                                  if k not in ("outputs", "output_ids", "per_example")}
                       for side in sides},
           "articles": articles}
    try:
        with open(args.output_json, "w") as f:
            json.dump(doc, f, indent=2)
    except OSError as e:
        raise ConfigError(f"--output_json {args.output_json}: cannot write ({e.strerror})") from None


if __name__ == "__main__":
    sys.exit(main())
