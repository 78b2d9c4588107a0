"""The prefill dequantizer (kernels/dequant.py) under the Triton interpreter against the
formats' own references: int4 symmetric (pack_int4), int4 with zeros (int4_zp), int8
per-channel and int8 group-wise, odd N and K, and a group narrower at the end of K."""
import pytest
import torch

from conftest import interpreter_on
from llama_engine.config import ConfigError
from llama_engine.kernels import dequant as D
from llama_engine.kernels import reference as R
from llama_engine.kernels.int4_zp import dequantize_w4_zp
from llama_engine.kernels.int8_group import dequantize_w8_group

needs_interpreter = pytest.mark.skipif(
    not interpreter_on(), reason="the kernel checks run under TRITON_INTERPRET=1 (no CUDA here "
    "and the interpreter is off)")


def _codes(N, K, bits, g):
    if bits == 4:
        return torch.randint(-128, 128, (N, K // 2), generator=g).to(torch.int8)
    return torch.randint(-128, 128, (N, K), generator=g).to(torch.int8)


@needs_interpreter
@pytest.mark.parametrize("N,K,G", [(37, 96, 32), (70, 320, 64), (33, 96, 96), (40, 200, 64)])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_dequant_equals_references(N, K, G, zeros, dtype):
    g = torch.Generator().manual_seed(N * K + G)
    q = _codes(N, K, 4, g)
    ng = -(-K // G)
    s = torch.rand(ng, N, generator=g) * 0.1 + 0.01
    z = torch.randn(ng, N, generator=g) * 0.1 if zeros else None
    got = D.dequantize(q, s, z, G, 4, dtype, impl="triton")
    if zeros:
        want = dequantize_w4_zp(q, s, z, G, torch.float32)
    else:
        want = R.unpack_int4_ref(q).float() * s.repeat_interleave(G, 0)[:K].t()
    assert got.dtype == dtype and got.shape == (N, K)
    assert torch.equal(got, want.to(dtype))
    assert torch.equal(D.dequantize(q, s, z, G, 4, dtype, impl="torch"), want.to(dtype))


@needs_interpreter
@pytest.mark.parametrize("N,K,G", [(37, 96, 32), (50, 200, 64), (33, 130, 0)])
@pytest.mark.parametrize("zeros", [False, True])
def test_int8_dequant_equals_references(N, K, G, zeros):
    g = torch.Generator().manual_seed(N + K + G)
    q = _codes(N, K, 8, g)
    ng = -(-K // G) if G else 1
    s = torch.rand(ng, N, generator=g) * 0.1 + 0.01
    z = torch.randn(ng, N, generator=g) * 0.1 if zeros else None
    got = D.dequantize(q, s, z, G, 8, torch.float32, impl="triton")
    if zeros:
        want = dequantize_w8_group(q, s, z, G or K, torch.float32)
    else:
        want = q.float() * s.repeat_interleave(G or K, 0)[:K].t()
    assert torch.equal(got, want)


def test_bad_inputs_are_one_line_errors():
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ConfigError, match="scales / zeros"):
        D.dequantize(q, torch.ones(3, 4), None, 8, 4, torch.float16)
    with pytest.raises(ConfigError, match="bits"):
        D.dequantize(q, torch.ones(1, 4), None, 0, 3, torch.float16)
    with pytest.raises(ConfigError, match="even"):
        D.dequantize(q, torch.ones(2, 4), None, 15, 4, torch.float16)
