"""Compute kernels of the engine: Triton kernels for CUDA, plain-PyTorch references for the CPU.

Layout (each module's docstring says what it owns and may import):

* ``ops``            the public ops the network calls (re-exported from the modules below)
* ``reference``      torch references of every op: the CPU path and the test oracle
* ``linear``         linear ops: dispatch and launches;  ``linear_kernels``  their Triton kernels
* ``norm``           RMSNorm, add + RMSNorm, SwiGLU;      ``norm_kernels``    their Triton kernels
* ``attn``           RoPE, KV writes, attention;          ``attn_kernels``    their Triton kernels
* ``comm``           one-shot all-reduce / all-gather kernels for tensor parallelism
* ``partial``        ``PartialSum``, the deferred layer output
* ``tuning``         tuned launch configs per GPU (``configs/*.json``) and the fallback
* ``pdl``            programmatic dependent launch
* ``common``         Triton availability, the ``impl`` rule, shared jit helpers

GPU self-checks and sweeps live in ``tools/`` (gpu_kernel_check.py, gpu_*_sweep.py).
Importing the kernels checks the environment once (``llama_engine.envs``): an unknown
``LLAMA_ENGINE_*`` variable is a ``ConfigError``.
"""
from ..envs import check_environment

check_environment()
