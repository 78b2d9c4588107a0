"""benchmark.py's flow on the CPU (``--device cpu``, tiny random model): the speed numbers
mean nothing here (the GPU run makes those); what is checked is that every part runs, writes
the sections and keys the report reads, merges with earlier results instead of replacing
them, and that the tensor-parallel path under torchrun writes once, from rank 0. The report,
the JSON merge and the flag checks are tested directly on small hand-made results."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import benchmark  # noqa: E402
from benchmarks import latency, options, profiling, report, serving  # noqa: E402

TINY = ["--device", "cpu", "--model_config", "tiny"]


def run(tmp: Path, *args) -> dict:
    rc = benchmark.main([*TINY, "--out_json", str(tmp / "b.json"), "--assets", str(tmp), *args])
    assert rc == 0
    return json.loads((tmp / "b.json").read_text())


def test_ablation_grid_and_report_merge(tmp_path):
    d = run(tmp_path, "--ablation", "--only", "hf_eager,fp16,int8")
    rows = d["ablation"]
    assert set(rows) == {"hf_eager", "fp16", "int8"}
    for k in ("fp16", "int8"):
        r = rows[k]
        assert r["decode_tok_s"] > 0 and r["latency_s"] > r["prefill_s"] > 0
        assert 0 < r["pct_floor"] and r["floor_tok_s"] > 0
    # int8 weight-only reads half the bytes of fp16 per linear weight
    assert rows["int8"]["weight_gib"] < 0.6 * rows["fp16"]["weight_gib"]
    d = run(tmp_path, "--modes", "fp16,sq", "--batch", "1,3", "--input_len", "5",
            "--output_len", "4", "--section", "grid")
    assert set(d["ablation"]) == {"hf_eager", "fp16", "int8"}  # merged, not replaced
    assert set(d["grid"]) == {f"tiny {m} b{b} i5 o4" for m in ("fp16", "sq") for b in (1, 3)}
    md = (tmp_path / "benchmark.md").read_text()
    assert "| HF eager |" in md and "### Batch sweep" in md and "tiny fp16 b3 i5 o4" in md
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    # one row measured again replaces that row alone
    before = d["ablation"]["int8"]
    d = run(tmp_path, "--ablation", "--only", "fp16")
    assert set(d["ablation"]) == {"hf_eager", "fp16", "int8"} and d["ablation"]["int8"] == before
    assert d["ablation"]["fp16"]["label"] == "fp16" and d["meta"]["ablation_model"] == "tiny"


def test_serving_parts(tmp_path):
    d = run(tmp_path, "--serving", "--num_requests", "5", "--mixed_requests", "4",
            "--serving_parts", "uniform,mixed")
    s = d["serving"]
    u = s["uniform_128_128"]
    assert u["num_requests"] == 5 and u["output_tokens"] == 5 * 128 and u["tokens_per_s"] > 0
    m = s["mixed"]
    assert m["inflight"]["num_requests"] == 4 and m["inflight_vs_static"] > 0
    assert "cnn_shaped" not in s and "hf_batch32_128_128" not in s
    md = (tmp_path / "benchmark.md").read_text()
    assert "### Inflight batching" in md and "Mixed lengths (4 requests" in md


def test_failing_hf_baseline_is_reported(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("compile exploded\nsecond line")
    monkeypatch.setattr(latency, "time_hf", boom)
    d = run(tmp_path, "--ablation", "--only", "hf_eager,fp16")
    assert d["ablation"]["hf_eager"]["error"] == "RuntimeError: compile exploded"
    assert "failed: RuntimeError: compile exploded" in (tmp_path / "benchmark.md").read_text()
    assert d["ablation"]["fp16"]["decode_tok_s"] > 0
    monkeypatch.undo()  # measured again, the row is replaced: no stale error stays beside it
    d = run(tmp_path, "--ablation", "--only", "hf_eager")
    assert "error" not in d["ablation"]["hf_eager"] and d["ablation"]["hf_eager"]["latency_s"] > 0
    assert "failed" not in (tmp_path / "benchmark.md").read_text()


def test_tensor_parallel_grid_under_torchrun(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "benchmark.py"), *TINY, "--modes", "fp16", "--batch", "2",
           "--input_len", "6", "--output_len", "4", "--section", "tp",
           "--tp_allreduce", "nccl", "--pdl", "off",  # the run-time options reach the engine
           "--out_json", str(tmp_path / "b.json"), "--assets", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads((tmp_path / "b.json").read_text())
    assert list(d["tp"]) == ["tiny fp16 b2 i6 o4 tp2"]
    assert proc.stdout.count("tiny fp16 b2 i6 o4 tp2 {") == 1  # rank 1 prints nothing


def test_profile_under_torchrun(tmp_path):
    """--profile under torchrun: both ranks generate, rank 0 alone traces and writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "benchmark.py"), *TINY, "--profile", "--modes", "fp16", "--batch", "1",
           "--input_len", "6", "--output_len", "4",
           "--out_json", str(tmp_path / "b.json"), "--assets", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads((tmp_path / "b.json").read_text())
    assert list(d["profile"]) == ["tiny fp16 b1 i6 o4 tp2"]
    assert (tmp_path / "trace_fp16_b1_tp2.json").is_file()
    ar = "all-reduce (NCCL or one-shot)"
    assert profiling.categorize("ncclDevKernel_AllReduce_Sum_f16_RING_LL") == ar
    assert profiling.categorize("_one_shot_all_reduce_kernel") == ar
    assert profiling.categorize("_one_shot_all_gather_kernel") == ar


@pytest.mark.parametrize("flags", [["--ablation"], ["--serving", "--poisson_rates", "4"]])
def test_torchrun_rejects_single_gpu_parts(tmp_path, flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "benchmark.py"), *TINY, *flags, "--out_json", str(tmp_path / "b.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "under torchrun benchmark.py runs the latency grid" in proc.stderr
    assert not (tmp_path / "b.json").exists()


def test_serving_takes_one_mode(tmp_path, capsys):
    rc = benchmark.main([*TINY, "--serving", "--modes", "fp16,int8",
                         "--out_json", str(tmp_path / "b.json")])
    assert rc == 2 and "--serving runs one mode" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_categorize_trace_counts_overlapping_kernels_once(tmp_path):
    """Kernels launched with PDL start before their predecessor ends: each counts only the
    time it adds to the busy frontier, so the categories sum to the busy span."""
    ev = [{"cat": "kernel", "name": "_skinny_dot_kernel", "ts": 0.0, "dur": 20.0},
          {"cat": "kernel", "name": "_rms_norm_kernel", "ts": 5.0, "dur": 19.0},   # waits
          {"cat": "kernel", "name": "_decode_attn_kernel", "ts": 30.0, "dur": 4.0},  # gap 6
          {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 99.0}]
    p = tmp_path / "trace.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    got = profiling.categorize_trace(str(p))
    assert got == {"weight GEMM/GEMV": 0.020, "RMSNorm": 0.004, "attention": 0.004}


def test_memory_on_cpu(tmp_path):
    """--memory runs on the CPU too (peak memory NaN there) and merges into the JSON."""
    run(tmp_path, "--ablation", "--only", "fp16")
    d = run(tmp_path, "--memory", "fp16")
    r = d["memory"]["fp16"]
    assert r["mode"] == "fp16" and r["context"] == 2048 and r["weight_gib"] > 0
    assert set(d["ablation"]) == {"fp16"}


# ---------------------------------------------------------------------------------------------
# Flags: every bad combination is one line on stderr, exit 2, before any work
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, msg", [
    (["--modes", "fp99"], "--modes: unknown fp99"),
    (["--batch", "1,0"], "--batch takes positive numbers"),
    (["--input_len", "8,x"], "--input_len takes a comma list of ints"),
    (["--only", "fp16"], "--only picks rows of --ablation"),
    (["--ablation", "--only", "fp16,fp17"], "--only: unknown fp17"),
    (["--serving", "--serving_parts", "uniform,nope"], "--serving_parts: unknown nope"),
    (["--serving", "--poisson_rates", "4,-1"], "--poisson_rates takes positive numbers"),
    (["--memory", "int3"], "--memory: unknown mode int3"),
    (["--serving", "--modes", "fp16,int8"], "--serving runs one mode"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, msg):
    rc = benchmark.main([*TINY, *flags, "--out_json", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "b.json").exists()


def test_validate_accepts_good_flags():
    p = benchmark.build_parser()
    for flags in (["--ablation", "--only", "hf_eager,sq"], ["--modes", "fp16,int4", "--batch",
                  "1,16"], ["--serving", "--serving_parts", "uniform,cnn,mixed,hf",
                  "--poisson_rates", "8,16.5"], ["--engine_dir", "x", "--modes", "mine"],
                  ["--report", "--modes", "whatever"]):
        assert benchmark.validate(p.parse_args(["--device", "cpu", *flags]), 1) is None, flags
    a = p.parse_args(["--device", "cpu", "--ablation"])
    assert "under torchrun" in benchmark.validate(a, 2)


def test_cuda_needed_unless_cpu_or_report(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = benchmark.build_parser()
    assert "needs a CUDA GPU" in benchmark.validate(p.parse_args([]), 1)
    assert benchmark.validate(p.parse_args(["--report"]), 1) is None


@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_tp_suite.sh"])
def test_gpu_suites_call_valid_flags(script):
    """Every --flag the suites pass to benchmark.py exists (no --row_suffix, no env switches
    of deleted experiments)."""
    text = (REPO / "tools" / script).read_text()
    known = {o for act in benchmark.build_parser()._actions for o in act.option_strings}
    lines = [ln for ln in text.splitlines()
             if re.search(r"\$(B|TR|G)\b", ln) or "benchmark.py" in ln]
    used = {f for ln in lines for f in re.findall(r"(?<![\w-])--[a-z_]+", ln)}
    used -= {"--standalone", "--nproc_per_node"}  # torch.distributed.run's own
    assert used and used <= known, used - known
    for switch in ("FUSED_SWIGLU", "TP_FUSE_NORM", "row_suffix"):
        assert switch not in text


# ---------------------------------------------------------------------------------------------
# Row names
# ---------------------------------------------------------------------------------------------
def test_row_names_on_one_process():
    assert latency.grid_key("fp16", 1, 8, 50, "llama-7b", False, "none") == "fp16 b1 i8 o50"
    assert latency.grid_key("sq", 16, 128, 128, "tiny", False, "none") == "tiny sq b16 i128 o128"
    assert latency.grid_key("fp16", 1, 8, 50, "tiny", True, "none") == "fp16 b1 i8 o50"
    assert latency.grid_key("fp16", 1, 8, 50, "llama-7b", False,
                            "oneshot+norm") == "fp16 b1 i8 o50 oneshot+norm"
    assert latency.grid_key("fp16", 1, 8, 50, "llama-7b", False, "nccl") == "fp16 b1 i8 o50"
    assert latency.trace_path("a", "int4", 1, "none") == os.path.join("a", "trace_int4_b1.json")
    assert latency.trace_path("a", "fp16", 2, "oneshot+norm") == os.path.join(
        "a", "trace_fp16_b2_oneshot_norm.json")
    assert serving.row_suffix("fp16", "max_utilization", "none") == ""
    assert serving.row_suffix("int8kv", "guaranteed_no_evict",
                              "oneshot") == "_int8kv_no_evict_oneshot"


def test_engine_kwargs_carries_run_time_choices():
    """--tp_allreduce/--pdl reach the engine as one RuntimeOptions; None takes the defaults and
    the timing code, not the options, decides where CUDA graphs run."""
    from llama_engine.options import RuntimeOptions
    assert options.engine_kwargs() == {"options": RuntimeOptions(cuda_graphs=False)}
    kw = options.engine_kwargs("nccl", "off")
    assert kw == {"options": RuntimeOptions(tp_allreduce="nccl", pdl="off", cuda_graphs=False)}


# ---------------------------------------------------------------------------------------------
# Report: JSON merge and markdown, on hand-made results
# ---------------------------------------------------------------------------------------------
def test_merge_json_replaces_rows_and_updates_meta(tmp_path):
    path = str(tmp_path / "sub" / "b.json")
    report.merge_json(path, {"meta": {"gpu": "A", "note": {"x": 1}},
                             "ablation": {"fp16": {"latency_s": 1.0, "error": "old"},
                                          "int8": {"latency_s": 2.0}},
                             "selfcheck": [1]})
    got = report.merge_json(path, {"meta": {"date": "d", "note": {"y": 2}},
                                   "ablation": {"fp16": {"latency_s": 0.5}},
                                   "selfcheck": [2], "grid": {"r": {}}})
    assert got == json.loads(Path(path).read_text())
    assert got["meta"] == {"gpu": "A", "date": "d", "note": {"x": 1, "y": 2}}
    assert got["ablation"] == {"fp16": {"latency_s": 0.5}, "int8": {"latency_s": 2.0}}
    assert got["selfcheck"] == [2] and got["grid"] == {"r": {}}
    assert not Path(path + ".tmp").exists()


def _result() -> dict:
    tok = {"latency_s": 0.5, "prefill_s": 0.01, "decode_tok_s": 100.0, "peak_mem_gib": 1.0}
    steps = {"decode": {"ms_per_step": 7.0, "seqs_per_step": 200.0},
             "mixed": {"ms_per_step": 30.0, "tokens_per_step": 4096.0}}
    uni = {"num_requests": 10, "tokens_per_s": 5000.0, "ttft_p50_s": 0.5, "ttft_p99_s": 1.0,
           "tpot_p50_s": 0.02, "num_preempted": 0, "steps": steps}
    poisson = {"8/s": {"rate_per_s": 8, "tokens_per_s": 900.0, "ttft_p50_s": 0.05,
                       "ttft_p99_s": 0.1, "tpot_p50_s": 0.01, "tpot_p99_s": 0.02}}
    return {"meta": {"gpu": "GPU X", "date": "2026-01-01", "read_TBps": 3.0},
            "ablation": {"hf_eager": {"latency_s": 2.0, "label": "HF eager"},
                         "hf_compile": {"error": "RuntimeError: no", "label": "HF compile"},
                         "fp16": {"latency_s": 0.5, "decode_tok_s": 101.25, "pct_floor": 80.4,
                                  "weight_gib": 12.5, "peak_mem_gib": 13.0, "label": "fp16"},
                         "extra": {"latency_s": 1.0, "label": "an extra row"}},
            "grid": {"fp16 b16 i128 o128": tok}, "tp_h200": {"tiny fp16 b1 i8 o50 tp2": tok},
            "memory": {"int4": {"weight_gib": 3.5, "peak_mem_gib": 4.25, "context": 2048}},
            "profile": {"fp16 b1 i8 o50": {"wall_ms": 400.0,
                                           "by_category_ms": {"attention": 20.0,
                                                              "RMSNorm": 5.0}}},
            "serving": {"uniform_128_128": uni, "hf_batch32_128_128": {"e2e_tok_s": 1000.0},
                        "uniform_vs_hf": 5.0,
                        "mixed": {"num_requests": 3, "max_batch": 64, "inflight": uni,
                                  "static_tok_s": 2500.0, "inflight_vs_static": 2.0},
                        "hf_batch32_mixed": {"useful_tok_s": 300.0}, "poisson": poisson}}


def test_markdown_tables():
    md = report.markdown(_result()).splitlines()
    assert md[0].startswith("LLaMA-7B shapes, random weights, batch 1, input 8, output 50; "
                            "GPU X, 2026-01-01; read bandwidth 3.00 TB/s")
    rows = [ln for ln in md if ln.startswith("| ")]
    assert "| HF eager | 2.000 | - | 1.00x | - | - | nan |" in rows
    assert "| HF compile | failed: RuntimeError: no | - | - | - | - | - |" in rows
    assert "| fp16 | 0.500 | 101.2 | 4.00x | 80% | 12.50 | 13.0 |" in rows
    assert rows.index("| an extra row | 1.000 | - | 2.00x | - | - | nan |") > rows.index(
        "| fp16 | 0.500 | 101.2 | 4.00x | 80% | 12.50 | 13.0 |")  # unknown rows last
    assert "### Batch sweep (input 128, output 128)" in md
    assert "| fp16 b16 i128 o128 | 0.500 | 10.0 | 100 | 1.0 |" in rows
    assert "| tiny fp16 b1 i8 o50 tp2 | 0.500 | 10.0 | 100 | 1.0 |" in rows
    assert any(ln.startswith("### Tensor parallelism on 2x NVIDIA H200 (") for ln in md)
    assert ("int4: weights 3.50 GiB, peak 4.25 GiB (torch.cuda.max_memory_allocated) at batch 1 "
            "with a 2048-token sequence.") in md
    assert "| run | wall | RMSNorm | attention |" in md
    assert "| fp16 b1 i8 o50 | 400.0 | 5.0 | 20.0 |" in rows
    assert "| uniform_128_128 | 10 | 5000 | 0.50 / 1.00 | 20.0 | 0 | 7.0 (200) | 30.0 (4096) |" \
        in rows
    assert any(ln.startswith("| mixed | 10 | 5000 |") for ln in rows)  # its inflight half
    assert ("Mixed lengths (3 requests, inputs 32-1024, outputs 16-512, batch limit 64): "
            "inflight 5000 tok/s, our static batching 2500 tok/s (2.00x).") in md
    assert "HF padded static batch 32 (input 128, output 128): 1000 tok/s." in md
    assert "Ours (uniform_128_128) / HF batch 32 in the same call: 5.00x." in md
    assert "HF padded static batch of the first 32 mixed requests: 300 useful tok/s." in md
    assert "| 8 | 900 | 50 / 100 | 10.0 / 20.0 |" in rows


def test_markdown_of_empty_results_is_the_ablation_header_alone():
    md = report.markdown({})
    assert md.startswith("LLaMA-7B shapes") and "###" not in md
    assert md.splitlines()[-1] == "|---|---|---|---|---|---|---|"


def test_report_flag_writes_table_and_plots_without_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "b.json").write_text(json.dumps(_result()))
    rc = benchmark.main(["--report", "--out_json", str(tmp_path / "b.json"),
                         "--assets", str(tmp_path / "out")])
    assert rc == 0
    md = (tmp_path / "out" / "benchmark.md").read_text()
    assert md == report.markdown(_result()) + "\n" and md.strip() in capsys.readouterr().out
    pytest.importorskip("matplotlib", reason="the plots need matplotlib")
    assert (tmp_path / "out" / "benchmark.png").stat().st_size > 0
    assert (tmp_path / "out" / "serving.png").stat().st_size > 0


def test_report_renders_speculative_and_fp8_sections():
    """The speculative section becomes a verify-step table whose projection is tokens per step
    times 1000 / verify ms, and the fp8 grid rows are listed under their own title."""
    from benchmarks import report
    spec = {"fp16": {"context": 512, "decode_ms": 5.0, "graphs": True, "plain_tok_s": 200.0,
                     "verify_ms": {"2": 5.1, "3": 5.5}, "ratio": {"2": 1.02, "3": 1.1},
                     "tokens_per_step": {"2": 1.65}, "projected_tok_s": {"2": 300.0}},
            "serving": {"off": {}}}
    row = {"latency_s": 1.0, "prefill_s": 0.005, "decode_tok_s": 115.2, "peak_mem_gib": 19.0}
    md = report.sections_markdown({"speculative": spec, "fp8": {"fp8 b1 i128 o128": row}})
    assert "| 3 | 5.500 | 1.100 | 1.650 | 300.0 |" in md
    assert "| 2 | 5.100 | 1.020 | - | - |" in md
    assert "### FP8 W8A8 against fp16" in md and "| fp8 b1 i128 o128 |" in md
