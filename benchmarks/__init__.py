"""benchmark.py's parts: speed of our engine against Hugging Face, measured on random weights.

    modes.py      the rows: engine modes (build flags per quantization) and the ablation order
    device.py     synchronise, peak memory, free cached blocks; random prompts
    options.py    run-time engine choices (all-reduce, PDL) from flags to the engine
    weights.py    random LLaMA-shaped fp16 weights and an in-memory engine per mode
    roofline.py   bytes a decode step reads, read bandwidth: the floor a mode can reach
    latency.py    timed generate calls (engine, HF), the ablation rows, the latency grid, memory
    profiling.py  GPU time per kernel category from a torch.profiler trace
    gptfast.py    gpt-fast's design rebuilt on the same weights: the --gptfast baseline
    serving.py    inflight-batching load: uniform, cnn-shaped, mixed, HF baseline, Poisson
    report.py     results JSON (merged section by section), markdown tables
    plots.py      assets/benchmark.png and assets/serving.png

None of them imports benchmark.py; report.py and plots.py import no torch, so tools can use them.
"""
