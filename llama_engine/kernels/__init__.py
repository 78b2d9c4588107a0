"""Compute kernels of the engine: Triton kernels for CUDA, plain-PyTorch references for the CPU."""
