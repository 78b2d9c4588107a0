"""benchmark.py's flow on the CPU (``--device cpu``, tiny random model): the speed numbers
mean nothing here (the GPU run makes those); what is checked is that every part runs, writes
the sections and keys the report reads, merges with earlier results instead of replacing
them, and that the tensor-parallel path under torchrun writes once, from rank 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import benchmark  # noqa: E402

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
    # a variant's rows sit beside the default ones (gpu_suite.sh swiglu)
    d = run(tmp_path, "--ablation", "--only", "fp16", "--row_suffix", "_swiglu")
    assert {"fp16", "fp16_swiglu"} <= set(d["ablation"])
    assert d["ablation"]["fp16_swiglu"]["label"].endswith("[swiglu]")
    assert "[swiglu] |" in (tmp_path / "benchmark.md").read_text()


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
    monkeypatch.setattr(benchmark, "time_hf", boom)
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
    assert benchmark.categorize("ncclDevKernel_AllReduce_Sum_f16_RING_LL") == ar
    assert benchmark.categorize("_one_shot_all_reduce_kernel") == ar
    assert benchmark.categorize("_one_shot_all_gather_kernel") == ar


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
    import json

    import benchmark
    ev = [{"cat": "kernel", "name": "_skinny_dot_kernel", "ts": 0.0, "dur": 20.0},
          {"cat": "kernel", "name": "_rms_norm_kernel", "ts": 5.0, "dur": 19.0},   # waits
          {"cat": "kernel", "name": "_decode_attn_kernel", "ts": 30.0, "dur": 4.0},  # gap 6
          {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 99.0}]
    p = tmp_path / "trace.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    got = benchmark.categorize_trace(str(p))
    assert got == {"weight GEMM/GEMV": 0.020, "RMSNorm": 0.004, "attention": 0.004}
