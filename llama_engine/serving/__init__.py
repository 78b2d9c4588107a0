"""Inflight batching on a paged KV cache (TensorRT-LLM's ``--use_inflight_batching``).

Parts, after nano-vllm's layout: ``Sequence`` (one request and its state), ``BlockManager``
(the paged cache's block allocator), ``Scheduler`` (which requests run each step, chunked
prefill, preemption by recompute) and ``LLMEngine`` (the API: add_request / step / cancel /
generate / stream). Each step runs on the engine's one ``llama_engine.model_runner.ModelRunner``
(flat token batch -> model -> sampled tokens, CUDA graphs for decode), the same runner the
static batch uses. The first three are pure Python; ``LLMEngine`` imports torch and is loaded
on first use.
"""
from llama_engine.serving.block_manager import BlockManager
from llama_engine.serving.scheduler import Scheduler, SchedulerOutput
from llama_engine.serving.sequence import FinishReason, Sequence, SequenceStatus

__all__ = ["BlockManager", "FinishReason", "LLMEngine", "ModelRunner", "Scheduler",
           "SchedulerOutput", "Sequence", "SequenceStatus"]


def __getattr__(name):
    # Lazy: the scheduler and its tests need no torch.
    if name == "LLMEngine":
        from llama_engine.serving.llm_engine import LLMEngine
        return LLMEngine
    if name == "ModelRunner":
        from llama_engine.model_runner import ModelRunner
        return ModelRunner
    raise AttributeError(name)
