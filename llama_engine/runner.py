"""The engine: load an engine directory and generate with a static batch.

``Engine`` loads the tensors, builds the network and hands it to its ``ModelRunner``
(model_runner.py: KV cache, attention metadata, CUDA graphs, sampling). ``generate`` is the
static batch scheduled onto the runner as gpt-fast splits it: ``prefill`` (all prompt tokens
of the batch as one flat batch), ``decode_step`` (one token per sequence; on CUDA replayed
from a CUDA graph per batch size), ``sample``. Each sequence owns a fixed block range of the
paged cache, so the same attention kernels serve static and inflight batching
(``serving.LLMEngine`` schedules onto the same runner).
"""
from __future__ import annotations

import dataclasses
import numbers
import os
import time
from typing import Callable, Optional, Sequence, Union

import torch

from . import beam as beam_search
from . import checkpoint as ckpt
from . import parallel
from .config import ConfigError, EngineConfig
from .engine_check import validate_engine
from .kernels import pdl
from .kv_cache import KVCache, blocks_for, static_block_tables
from .model import Transformer, kv_scales_from_checkpoint
from .model_runner import ModelRunner
from .options import RuntimeOptions
from .logits_processors import Controls
from .sampling import (GenerationOutput, SamplingConfig, check_token_ids,  # noqa: F401
                       cut_at_stop, sample, token_logprobs)

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}
WEIGHTS_FILE = "rank0.safetensors"


class EngineLimitError(ConfigError):
    """A request outside the limits the engine was built for."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_engine_tensors(engine_dir: str, device: str = "cpu") -> tuple[EngineConfig, dict]:
    """-> (config, this rank's tensors). An engine built with --tp_size N holds
    rank{r}.safetensors per rank; this process's rank comes from the torchrun group (joined
    here if needed, llama_engine/parallel.py)."""
    config = EngineConfig.load(engine_dir)
    name = WEIGHTS_FILE
    if config.world_size > 1:
        name = f"rank{parallel.require_world(config.world_size)}.safetensors"
    tensors = ckpt.load_tensors(os.path.join(engine_dir, name), device=device)
    validate_engine(config, tensors, engine_dir)
    return config, tensors


class Engine:
    """A loaded engine: its config and its ``ModelRunner`` (model, KV cache, CUDA graphs),
    with the static batch (``generate``) scheduled onto the runner."""

    def __init__(self, config: EngineConfig, model, device: str, engine_dir: Optional[str] = None,
                 kv_scales: Optional[list] = None):
        self.config, self.device = config, torch.device(device)
        self.engine_dir = engine_dir
        self.kv_scales = kv_scales
        self.runner = ModelRunner(config, model, self.device, kv_scales)
        self.dtype = self.runner.dtype
        self.block_size = config.build.tokens_per_block

    @property
    def model(self):
        return self.runner.model

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, engine_dir: str, device: Optional[str] = None,
                 dtype: Optional[str] = None,
                 options: Optional[RuntimeOptions] = None) -> "Engine":
        """Load an engine built by build.py. ``dtype`` overrides the float dtype (e.g. float32
        to run an fp16 engine on a CPU). ``options``: run-time choices (options.py); when
        given they are applied here (PDL mode, all-reduce, CUDA graphs)."""
        device = device or default_device()
        if EngineConfig.load(engine_dir).world_size > 1:
            parallel.init_from_env(device)  # NCCL for CUDA, gloo for CPU; before any loading
            device = parallel.rank_device(device)
        config, tensors = load_engine_tensors(engine_dir, "cpu")
        return cls.from_tensors(config, tensors, device, dtype, engine_dir, options)

    @classmethod
    def from_tensors(cls, config: EngineConfig, tensors: dict, device: str,
                     dtype: Optional[str] = None, engine_dir: Optional[str] = None,
                     options: Optional[RuntimeOptions] = None) -> "Engine":
        """The engine of loaded tensors (this rank's under tensor parallelism); ``options``
        as in ``from_dir`` (None: defaults, CUDA graphs left to ``enable_cuda_graphs``)."""
        if options is not None:
            pdl.set_mode(options.pdl)  # process-wide: every later launch
        opts = options or RuntimeOptions()
        if dtype and dtype != config.dtype:
            src = TORCH_DTYPES[config.dtype]
            tensors = {k: (v.to(TORCH_DTYPES[dtype]) if v.dtype == src else v)
                       for k, v in tensors.items()}
            config.dtype = dtype
        if config.dtype == "float64" and torch.device(device).type == "cuda":
            # The Triton kernels (attention) have no float64 variant; float64 engines exist for
            # exactness tests on the CPU.
            raise ConfigError("float64 engines run on the CPU only (--device cpu); build with "
                              "--dtype float32/float16/bfloat16 for CUDA, or pass --dtype "
                              "float32 to run.py")
        tensors = {k: v.to(device) for k, v in tensors.items()}
        max_pos = max(config.build.max_seq_len, config.model.max_position_embeddings)
        tp_size, tp_rank, full_args = config.world_size, 0, config.model
        if tp_size > 1:
            # Tensor parallelism: the tensors are this rank's shards. The engine's config then
            # describes the rank's network (its heads / MLP width; hidden size and vocabulary
            # stay global), so the KV caches are sized for the rank's KV heads.
            tp_rank = parallel.require_world(tp_size, device)
            parallel.sync_rng()  # unseeded sampling draws the same tokens on every rank
            # collective; before any forward or graph capture
            parallel.setup_all_reduce(device, opts.tp_allreduce)
            config = dataclasses.replace(config, model=parallel.local_args(full_args, tp_size))
        model = Transformer.from_checkpoint(
            full_args, config.quant, tensors, max_pos, tp_rank=tp_rank, tp_size=tp_size,
            parallel_embedding=config.build.use_parallel_embedding)
        model = model.to(device).eval()
        kv_scales = kv_scales_from_checkpoint(config.model, config.quant, tensors)
        engine = cls(config, model, device, engine_dir, kv_scales)
        engine.tp_rank, engine.tp_size = tp_rank, tp_size
        engine.runner.prefill_graph_max_tokens = opts.prefill_graph_max_tokens
        if options is not None and options.cuda_graphs:
            engine.enable_cuda_graphs()
        return engine

    # -- limits --------------------------------------------------------------------------------
    def check_limits(self, batch_input_ids: list, max_new_tokens: int) -> None:
        b = self.config.build
        if not batch_input_ids:
            raise EngineLimitError("no prompts given")
        if len(batch_input_ids) > b.max_batch_size:
            raise EngineLimitError(f"batch of {len(batch_input_ids)} prompts exceeds the engine's "
                                   f"max_batch_size {b.max_batch_size} (rebuild with a larger "
                                   "--max_batch_size)")
        for i, ids in enumerate(batch_input_ids):
            if len(ids) == 0:
                raise EngineLimitError(f"prompt {i} is empty")
            if len(ids) > b.max_input_len:
                raise EngineLimitError(f"prompt {i} has {len(ids)} tokens, over the engine's "
                                       f"max_input_len {b.max_input_len} (rebuild with a larger "
                                       "--max_input_len or shorten the prompt)")
        if max_new_tokens > b.max_output_len:
            raise EngineLimitError(f"max_output_len {max_new_tokens} exceeds the engine's "
                                   f"max_output_len {b.max_output_len}")
        if max_new_tokens < 1:
            raise EngineLimitError("max_output_len must be at least 1")

    # -- the static batch on the runner ----------------------------------------------------------
    def kv_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """A cache with room for ``batch_size`` sequences of ``max_seq_len``; reused when it fits."""
        return self.runner.ensure_cache(batch_size * blocks_for(max_seq_len, self.block_size))

    def prefill(self, batch_input_ids: list, cache: KVCache, block_tables: torch.Tensor):
        """Run all prompt tokens; -> fp32 logits of each prompt's last token [B, V]."""
        return self.runner.prefill(batch_input_ids, cache, block_tables)

    def decode_step(self, tokens: torch.Tensor, context_lens: torch.Tensor,
                    block_tables: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sequence. ``context_lens`` (int32[B], tokens cached so far) is
        advanced in place. -> fp32 logits [B, V]."""
        return self.runner.decode(tokens, context_lens, block_tables, cache)

    def enable_cuda_graphs(self) -> None:
        """Replay decode steps from CUDA graphs (one per batch size); CUDA only."""
        self.runner.enable_cuda_graphs()

    def check_request(self, batch_input_ids, max_new_tokens,
                      sampling: SamplingConfig) -> list:
        """Validate a static batch before any work: token ids are ints in the vocabulary,
        lengths within the engine's limits, the sampling settings in range. -> the prompts
        as lists of ints. One-line ``ConfigError`` naming the prompt otherwise."""
        if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool):
            raise EngineLimitError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingConfig):
            raise ConfigError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        vocab = self.config.model.vocab_size
        if isinstance(batch_input_ids, (str, bytes)) or not hasattr(batch_input_ids, "__len__"):
            raise EngineLimitError("batch_input_ids must be a list of token-id lists")
        ids = [check_token_ids(p, vocab, f"prompt {i}") for i, p in enumerate(batch_input_ids)]
        self.check_limits(ids, max_new_tokens)
        sampling.validate(vocab, "sampling")
        return ids

    @torch.inference_mode()
    def generate(self, batch_input_ids: list, max_new_tokens: int,
                 sampling: Optional[SamplingConfig] = None,
                 end_id: Union[int, Sequence[int], None] = None,
                 streamer: Optional[Callable[[int, list], None]] = None,
                 speculative=None,
                 beam: Optional[beam_search.BeamConfig] = None) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` for each prompt (a static batch).

        ``end_id``: the model's end ids (``Tokenizer.end_ids``; one int or several);
        ``sampling.end_id`` replaces them and ``sampling.stop_words`` end a row too (the
        one stopping rule, ``sampling.cut_at_stop``). ``streamer(step, tokens)`` is called
        with the new token of every sequence each step. ``speculative``: a
        ``speculative.SpeculativeConfig``; its own loop runs instead. ``beam``: a
        ``beam.BeamConfig``; with ``num_beams > 1`` beam search runs (beam.py) and the
        result has ``num_return_sequences`` rows per prompt with their ``beam_scores``."""
        if beam is not None and beam.enabled:
            if speculative is not None:
                raise ConfigError("beam search and speculative decoding do not combine")
            beam.validate()
            sampling = sampling or SamplingConfig()
            beam.check_sampling(sampling)
            ids = self.check_request(batch_input_ids, max_new_tokens, sampling)
            default_ends = [] if end_id is None else (
                [end_id] if isinstance(end_id, numbers.Integral) else list(end_id))
            return beam_search.generate(self, ids, max_new_tokens, beam,
                                        sampling.end_ids(default_ends))
        if speculative is not None:
            return speculative.generate(self, batch_input_ids, max_new_tokens, sampling,
                                        end_id, streamer)
        sampling = sampling or SamplingConfig()
        batch_input_ids = self.check_request(batch_input_ids, max_new_tokens, sampling)
        default_ends = [] if end_id is None else (
            [end_id] if isinstance(end_id, numbers.Integral) else list(end_id))
        end_ids = sampling.end_ids(default_ends)
        gen = None
        if sampling.seed is not None and not sampling.greedy:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        bsz = len(batch_input_ids)
        max_seq = max(len(p) for p in batch_input_ids) + max_new_tokens
        cache = self.kv_cache(bsz, max_seq)
        block_tables = static_block_tables(bsz, max_seq, self.block_size, self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        controls = slots = None
        if sampling.has_controls:
            controls = Controls(self.config.model.vocab_size, max_seq, self.device, bsz)
            slots = [controls.slot(b, sampling, p, len(p), end_ids)
                     for b, p in enumerate(batch_input_ids)]
        end_t = (torch.tensor(end_ids, dtype=torch.int64, device=self.device)
                 if len(end_ids) > 1 else None)
        logprobs = [] if sampling.logprobs is not None else None

        def pick(logits, step):
            if controls is not None:
                logits = controls.apply(slots, logits, step)
            tok = sample(logits, sampling, gen)
            if logprobs is not None:
                logprobs.append(token_logprobs(logits, tok, sampling))
            if controls is not None:
                controls.update(slots, tok)
            return tok

        t0 = time.perf_counter()
        next_tok = pick(self.prefill(batch_input_ids, cache, block_tables), 0)
        out = [next_tok]
        sync()
        t_prefill = time.perf_counter() - t0
        context_lens = torch.tensor([len(p) for p in batch_input_ids], dtype=torch.int32,
                                    device=self.device)
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        can_stop = bool(end_ids) or bool(sampling.stop_words)
        if streamer:
            streamer(0, next_tok.tolist())
        for step in range(1, max_new_tokens):
            if can_stop:
                if len(end_ids) == 1:
                    done |= next_tok == end_ids[0]
                elif end_ids:
                    done |= torch.isin(next_tok, end_t)
                if sampling.stop_words:
                    done |= controls.stopped(slots)
                if bool(done.all()):
                    break
            logits = self.decode_step(next_tok, context_lens, block_tables, cache)
            next_tok = pick(logits, step)
            out.append(next_tok)
            if streamer:
                streamer(step, next_tok.tolist())
        sync()
        latency = time.perf_counter() - t0
        return self._outputs(torch.stack(out, dim=1).tolist(), end_ids, sampling, logprobs,
                             latency, t_prefill)

    @staticmethod
    def _outputs(tokens: list, end_ids: list, sampling: SamplingConfig, logprobs,
                 latency: float, t_prefill: float) -> GenerationOutput:
        """Rows of sampled tokens [B][steps] cut by the one stopping rule."""
        output_ids, reasons, total = [], [], 0
        for row in tokens:
            row, stopped = cut_at_stop(row, end_ids, sampling.stop_words)
            output_ids.append(row)
            reasons.append("stop" if stopped else "length")
            total += len(row)
        res = GenerationOutput(output_ids, total, latency, t_prefill, finish_reasons=reasons)
        if logprobs is not None:
            lp = torch.stack([x[0] for x in logprobs], 1).tolist()  # [B, steps]
            res.log_probs = [r[:len(o)] for r, o in zip(lp, output_ids)]
            if sampling.logprobs:
                ids = torch.stack([x[1] for x in logprobs], 1).tolist()   # [B, steps, N]
                vals = torch.stack([x[2] for x in logprobs], 1).tolist()
                res.top_logprobs = [[list(zip(i, v)) for i, v in zip(ri[:len(o)], rv)]
                                    for ri, rv, o in zip(ids, vals, output_ids)]
        return res

    @torch.inference_mode()
    def forward_logits(self, input_ids: list) -> torch.Tensor:
        """Teacher-forced fp32 logits of every position of one sequence: [T, V]."""
        if len(input_ids) > self.config.build.max_input_len + self.config.build.max_output_len:
            raise EngineLimitError(f"sequence of {len(input_ids)} tokens exceeds the engine's "
                                   f"max_seq_len {self.config.build.max_seq_len}")
        cache = self.kv_cache(1, len(input_ids))
        bt = static_block_tables(1, len(input_ids), self.block_size, self.device)
        return self.runner.forward_all(input_ids, cache, bt)
