"""llama_engine/kernels/tuning.py: the tuned launch configs are data (configs/<GPU>.json). The
loader picks the file of the device's name, falls back to the heuristics for other devices and
CPU tensors, every row of every file is a valid config, and the writer the tuning tools use
round-trips through the validation."""
from __future__ import annotations

import json

import pytest
import torch

from llama_engine.config import ConfigError
from llama_engine.kernels import tuning as T

FILES = sorted(T.CONFIG_DIR.glob("*.json"))


def test_the_h100_and_h200_files_exist_under_their_device_names():
    names = {f.name for f in FILES}
    assert T.file_for("NVIDIA H100 80GB HBM3").name == "NVIDIA_H100_80GB_HBM3.json"
    assert {"NVIDIA_H100_80GB_HBM3.json", "NVIDIA_H200.json"} <= names


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_every_row_is_a_valid_config(path):
    doc = json.loads(path.read_text())
    assert T.file_for(doc["device"]) == path              # the file is named after its GPU
    table = T.parse_table(doc, str(path))                 # raises on any bad row
    assert len(table.skinny) == len(doc["skinny_gemv"])   # no key twice
    for (kind, *_), cfg in table.skinny.items():
        assert isinstance(cfg, (T.SkinnyCfg, T.GemmCfg))
        if isinstance(cfg, T.SkinnyCfg):
            # dot8 (FP8 tensor cores) only for the FP8 GEMV
            assert cfg.kernel in (("dot", "fma", "dot8") if kind == T.F8 else ("dot", "fma"))
            assert cfg.block_k >= 2
    assert set(table.decode) == set(T.FALLBACK_DECODE_CONFIG)


def test_loader_picks_the_devices_file_and_falls_back_elsewhere():
    h100 = T.table_for_name("NVIDIA H100 80GB HBM3")
    assert h100.source.endswith("NVIDIA_H100_80GB_HBM3.json")
    # a tuned key: exactly its row; another shape: the nearest row of its kind and M bucket
    assert T.pick_skinny(h100, T.FP, 1, 4096, 4096) == T.SkinnyCfg("dot", 32, 256, 1, 4, 5)
    assert T.pick_skinny(h100, T.I4G, 64, 22016, 4096) == T.GemmCfg(64, 64, 256, 8, 4, 3)
    assert T.pick_skinny(h100, T.FP, 3, 4000, 4100) == T.pick_skinny(h100, T.FP, 4, 4096, 4096)
    unknown = T.table_for_name("Imaginary GPU 9000")
    assert unknown is T.FALLBACK and T.table_for(torch.device("cpu")) is T.FALLBACK
    assert T.pick_skinny(unknown, T.I8, 1, 4096, 4096) == T.heuristic_skinny(T.I8, 1, 4096, 4096)
    assert unknown.decode == T.FALLBACK_DECODE_CONFIG
    assert h100.decode == T.FALLBACK_DECODE_CONFIG        # the H100 sweep's values


def test_h200_keeps_its_own_rows_and_each_row_names_where_it_was_measured():
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200"):
        rows = json.loads(T.file_for(name).read_text())["skinny_gemv"]
        assert all(r["measured_on"].startswith(("NVIDIA H100", "NVIDIA H200")) for r in rows)
    h200 = T.table_for_name("NVIDIA H200")
    # LLaMA-13B's one-GPU down_proj, tuned on an H200 with PDL on
    assert T.pick_skinny(h200, T.FP, 1, 5120, 5120) == T.SkinnyCfg("fma", 2, 1024, 1, 4, 1)


@pytest.mark.parametrize("row,msg", [
    ({"kind": "fp4", "m": 1, "n": 8, "k": 8, "kernel": "dot", "block_n": 8, "block_k": 32},
     "kind must be"),
    ({"kind": "fp", "m": 2, "n": 8, "k": 8, "kernel": "dot", "block_n": 8, "block_k": 32},
     "m must be"),
    ({"kind": "fp", "m": 1, "n": 8, "k": 8, "kernel": "wmma", "block_n": 8, "block_k": 32},
     "kernel must be"),
    ({"kind": "fp", "m": 1, "n": 8, "k": 8, "kernel": "dot", "block_n": 24, "block_k": 32},
     "block_n=24 must be a power of two"),
    ({"kind": "fp", "m": 1, "n": 8, "k": 8, "kernel": "gemm", "block_m": 64, "block_n": 64,
      "block_k": 64, "num_stages": 0}, "num_stages=0"),
], ids=["kind", "m-bucket", "kernel", "block_n", "stages"])
def test_bad_rows_are_config_errors(row, msg):
    with pytest.raises(ConfigError, match=msg):
        T.parse_table({"skinny_gemv": [row]}, "test")


@pytest.mark.parametrize("over,msg", [
    ([1], "JSON object"), ({"bogus": 1}, "unknown"), ({"block_n": 48}, "power of two"),
    ({"int8_magic": 1}, "bool"), ({"max_partition_int8": 64, "block_n_int8": 128}, "at least"),
], ids=["not-object", "unknown-key", "not-pow2", "wrong-type", "partition-below-tile"])
def test_bad_decode_entries_are_config_errors(over, msg):
    with pytest.raises(ConfigError, match=msg):
        T.check_decode_config(over)


def test_save_table_writes_a_new_devices_file_and_replaces_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "CONFIG_DIR", tmp_path)
    cfg = T.SkinnyCfg("fma", 4, 1024, 1, 4, 1)
    path = T.save_table("Test GPU", [T.row_of(T.FP, 1, 4096, 4096, cfg, GBps=1000)],
                        decode={"block_n_int8": 64})
    assert path == tmp_path / "Test_GPU.json"
    t = T.table_for_name("Test GPU")
    assert t.skinny == {(T.FP, 1, 4096, 4096): cfg} and t.decode["block_n_int8"] == 64
    new = T.GemmCfg(64, 64, 128, 8, 4, 4)
    T.save_table("Test GPU", [T.row_of(T.FP, 1, 4096, 4096, new)])   # same key: replaced
    t = T.table_for_name("Test GPU")
    assert t.skinny == {(T.FP, 1, 4096, 4096): new} and t.decode["block_n_int8"] == 64
    with pytest.raises(ConfigError):
        T.save_table("Test GPU", decode={"block_n": 3})
    T.forget_loaded()
