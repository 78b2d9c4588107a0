"""The OpenAI API's request bodies (validated with pydantic), its error body, and the one
mapping of OpenAI sampling parameters onto ``sampling.SamplingConfig``.

Errors look as OpenAI clients expect: ``{"error": {"message", "type", "param", "code"}}`` with
the HTTP status an ``APIError`` carries. Unknown fields are ignored (clients send new ones
before servers know them); known fields of the wrong type or out of range are a 400.
A parameter that ``SamplingConfig`` has no field for answers 400 "not supported by this
engine" when the request sets it to anything but its neutral value, so a newer
``SamplingConfig`` turns it on without edits here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from llama_engine.sampling import SamplingConfig


class APIError(Exception):
    """An error answered as OpenAI's JSON error body with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Parameters shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)                     # vLLM's extension; -1: off
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    min_tokens: int = Field(0, ge=0)
    user: Optional[str] = None                        # accepted and ignored
    logit_bias: Optional[dict[str, float]] = None

    def check_supported(self) -> None:
        """A 400 naming the first field set to something this engine does not do (a client
        must not get an answer that silently ignored it)."""
        for name, value in self._unsupported():
            if value:
                raise APIError(400, f"{name} is not supported by this engine", param=name,
                               code="unsupported_parameter")

    def _unsupported(self) -> list:
        return [("logit_bias", self.logit_bias)]

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop strings", param="stop")
        return stops


class CompletionRequest(_Common):
    max_tokens: Optional[int] = 16                    # OpenAI's default for completions
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)

    def _unsupported(self) -> list:
        # echo with logprobs would need the prompt's log-probs, which no step computes.
        return super()._unsupported() + [
            ("suffix", self.suffix), ("best_of", self.best_of not in (None, self.n)),
            ("echo", self.echo and self.logprobs is not None)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise APIError(400, f"content part of type {p.get('type')!r} is not supported",
                               param="messages")
            parts.append(str(p.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Union[str, dict, None] = None
    functions: Optional[list] = None
    function_call: Union[str, dict, None] = None
    parallel_tool_calls: Optional[bool] = None        # accepted: meaningless without tools

    def check_supported(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        super().check_supported()

    def _unsupported(self) -> list:
        fmt = (self.response_format or {}).get("type", "text")
        return super()._unsupported() + [
            ("response_format", fmt != "text"), ("tools", self.tools),
            ("tool_choice", self.tool_choice not in (None, "none", "auto")),
            ("functions", self.functions), ("function_call", self.function_call)]


# OpenAI parameter -> (SamplingConfig field, neutral value meaning "off").
_OPTIONAL_FIELDS = {
    "presence_penalty": ("presence_penalty", 0.0),
    "frequency_penalty": ("frequency_penalty", 0.0),
    "repetition_penalty": ("repetition_penalty", 1.0),
    "min_tokens": ("min_length", 0),
}


def to_sampling(req: _Common, logprobs: Optional[int] = None, index: int = 0) -> SamplingConfig:
    """The one mapping of a request's OpenAI parameters onto ``SamplingConfig`` (``index``:
    which of ``n`` choices, so seeded choices differ). ``logprobs``: top log-probabilities
    asked for (None: none)."""
    have = {f.name for f in dataclasses.fields(SamplingConfig)}
    kw: dict[str, Any] = {}
    if req.temperature == 0.0:
        kw.update(temperature=1.0, top_k=1)               # greedy
    else:
        kw.update(temperature=req.temperature, top_k=max(req.top_k, 0),
                  top_p=req.top_p if req.top_p < 1.0 else 0.0)
        if req.top_k == 1:
            kw["top_k"] = 1
    if req.seed is not None:
        kw["seed"] = req.seed + index
    asked = {name: getattr(req, name) for name in _OPTIONAL_FIELDS}
    if logprobs is not None:
        asked["logprobs"] = logprobs
    for name, value in asked.items():
        field, neutral = _OPTIONAL_FIELDS.get(name, (name, None))
        if value == neutral:
            continue
        if field not in have:
            raise APIError(400, f"{name} is not supported by this engine", param=name,
                           code="unsupported_parameter")
        kw[field] = value
    return SamplingConfig(**kw)
