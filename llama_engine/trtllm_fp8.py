"""TensorRT-LLM's FP8 checkpoint tensors <-> ours, both ways; ``trtllm.py`` calls these for
``quant_algo`` FP8 and FP8_PER_CHANNEL_PER_TOKEN (spec table with sources: docs/trtllm-format.md).

TensorRT-LLM 1.2 (``tensorrt_llm/quantization/layers.py``):

* FP8 (``FP8Linear`` / ``FP8RowLinear``): ``weight`` fp8 [N, K], ``weights_scaling_factor``
  float32 (1,), ``activation_scaling_factor`` float32 (1,) (static, calibrated);
* FP8_PER_CHANNEL_PER_TOKEN (``Fp8RowwiseLinear`` / ``Fp8RowwiseRowLinear``): ``weight`` fp8
  [N, K], ``per_channel_scale`` float32 (N,); activations scaled per token at run time.

Our tensors use the same names and shapes, so the exchange is checks and dtype/shape
normalisation; round trips are bit-identical. Our two other combinations (per-channel weights
with static activations, per-tensor weights with per-token activations) have no TensorRT-LLM
form and are refused on export in one line. ``fp8_per_channel`` / ``fp8_dynamic_act`` are ours
and never written into TensorRT-LLM's ``quantization`` dict.

Imports: ``config``, ``kernels.fp8`` (the dtype).
"""
from __future__ import annotations

from .config import FP8, FP8_PCPT, ConfigError, QuantConfig
from .kernels.fp8 import FP8_DTYPE

def trtllm_fp8_algo(quant: QuantConfig) -> str:
    """The TensorRT-LLM quant_algo of ``quant``; ConfigError for our mixed combinations."""
    combo = (quant.fp8_per_channel, quant.fp8_dynamic_act)
    if combo == (False, False):
        return FP8
    if combo == (True, True):
        return FP8_PCPT
    raise ConfigError(f"{quant.describe()} has no TensorRT-LLM form (it has FP8 = per-tensor "
                      "weights with static activations and FP8_PER_CHANNEL_PER_TOKEN); convert "
                      "again with both or neither of --fp8_per_channel / --fp8_dynamic_act")


def _expected(quant: QuantConfig, n: int, k: int) -> dict:
    """{suffix: shape} of one FP8 linear under ``quant`` (TensorRT-LLM's two forms and ours)."""
    d = {"weight": (n, k)}
    if quant.fp8_per_channel:
        d["per_channel_scale"] = (n,)
    else:
        d["weights_scaling_factor"] = (1,)
    if not quant.fp8_dynamic_act:
        d["activation_scaling_factor"] = (1,)
    return d


def _check(out: dict, p: str, quant: QuantConfig, need) -> None:
    w = need(out, p + ".weight")
    if w.dtype != FP8_DTYPE:
        raise ConfigError(f"{p}.weight is {w.dtype}; {quant.quant_algo} needs float8_e4m3fn "
                          "(TensorRT-LLM keeps no float linears inside FP8 layers)")
    n, k = w.shape
    for suffix, shape in _expected(quant, n, k).items():
        if suffix == "weight":
            continue
        t = need(out, f"{p}.{suffix}").float()
        if t.numel() != shape[0]:
            raise ConfigError(f"{p}.{suffix} has {t.numel()} values; {quant.describe()} needs "
                              f"{shape}")
        out[f"{p}.{suffix}"] = t.reshape(shape).contiguous()
    if not w.is_contiguous():
        out[p + ".weight"] = w.contiguous()


def fp8_to_trtllm(out: dict, prefixes: list, quant: QuantConfig, qdict: dict, need,
                  extensions: bool = False) -> None:
    """Ours -> TensorRT-LLM, in place on ``out`` (tensors) and ``qdict`` (its quantization).
    ``extensions`` (our own checkpoints): our mixed combinations are kept (quant_algo FP8 plus
    our two fields); without it (an export for TensorRT-LLM) they are refused. No-op
    unless ``quant`` is FP8."""
    if not quant.is_fp8:
        return
    if extensions and trtllm_fp8_algo_or_none(quant) is None:
        for p in prefixes:
            _check(out, p, quant, need)
        return
    qdict["quant_algo"] = trtllm_fp8_algo(quant)
    qdict.pop("fp8_per_channel", None)
    qdict.pop("fp8_dynamic_act", None)
    for p in prefixes:
        _check(out, p, quant, need)
        if quant.fp8_dynamic_act:
            out.pop(p + ".activation_scaling_factor", None)


def trtllm_fp8_algo_or_none(quant: QuantConfig):
    try:
        return trtllm_fp8_algo(quant)
    except ConfigError:
        return None


def fp8_from_trtllm(out: dict, prefixes: list, quant: QuantConfig, need) -> None:
    """TensorRT-LLM -> ours, in place. FP8_PER_CHANNEL_PER_TOKEN sets both FP8 fields; FP8
    keeps what the checkpoint's quantization dict says (our extension; default: neither).
    No-op unless ``quant`` is FP8."""
    if not quant.is_fp8:
        return
    if quant.quant_algo == FP8_PCPT:
        quant.fp8_per_channel = quant.fp8_dynamic_act = True
    for p in prefixes:
        _check(out, p, quant, need)
        if quant.fp8_dynamic_act:
            out.pop(p + ".activation_scaling_factor", None)
