"""LLaMA inference engine internals: config, checkpoint, kernels, runner, serving."""
