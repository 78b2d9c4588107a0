"""SmoothQuant's per-layer alpha search (llama_engine/smoothquant.py ``search_alphas``,
``hf_llama_convert.py -sq auto``): on a tiny model with outlier channels the searched alphas
give every smoothed group a lower quantized-output error than alpha 0.5 on the calibration rows
and on rows it never saw (measured, asserted); the checkpoint records them, builds and runs; a
checkpoint with one alpha (older ones) still loads."""
from __future__ import annotations

import json

import torch

from llama_engine import awq, smoothquant as sq
from llama_engine.checkpoint import hf_to_unified
from test_awq import _tiny_with_outliers


def _stats(model, prompts):
    act_max: dict = {}
    _, rows = awq.capture_inputs(model, prompts, tokens_per_prompt=32, progress=False,
                                 maxima=act_max)
    return rows, act_max


def test_alpha_search_lowers_every_groups_error_against_alpha_half(tiny_hf_factory):
    args, sd, prompts = _tiny_with_outliers(tiny_hf_factory)
    model = sq.hf_model_from_state_dict(args, sd)
    rows, act_max_hf = _stats(model, prompts[:4])
    held_out, _ = _stats(model, prompts[4:])
    tensors = hf_to_unified(sd, args)
    # the smoothing statistic keyed as smooth_unified reads it
    act = {f"transformer.layers.{i}.{grp}": act_max_hf[f"model.layers.{i}.{mod}"]
           for i in range(args.num_hidden_layers) for grp, _, mod in sq.SQ_GROUPS}
    alphas, report = sq.search_alphas(tensors, args, act, rows, progress=False)
    assert set(alphas) == set(act) and all(0.1 <= a <= 0.95 for a in alphas.values())
    strictly = 0
    total_half = total_best = 0.0
    for i in range(args.num_hidden_layers):
        for grp, linears, mod in sq.SQ_GROUPS:
            prefix = f"transformer.layers.{i}.{grp}"
            errs = report[prefix]
            assert errs[alphas[prefix]] <= errs[0.5], prefix
            strictly += errs[alphas[prefix]] < errs[0.5]
            # held-out rows: the chosen alpha's error against alpha 0.5's, recomputed
            w = torch.cat([tensors[f"transformer.layers.{i}.{n}.weight"] for n in linears])
            x = held_out[f"model.layers.{i}.{mod}"]
            y = x @ w.t()
            for a, acc in ((0.5, "half"), (alphas[prefix], "best")):
                s = sq.smoothing_factors(act[prefix], [w], a)
                e = ((sq.w8a8_output(x, w, s, True, True) - y) ** 2).mean().item()
                if acc == "half":
                    total_half += e
                else:
                    total_best += e
    assert strictly >= len(alphas) // 2, (strictly, report)
    assert total_best < total_half, (total_best, total_half)


def test_smooth_unified_takes_one_alpha_or_one_per_group(tiny_hf_factory):
    """A dict of alpha 0.5 everywhere smooths exactly as the single float 0.5 (old path)."""
    args, sd, prompts = _tiny_with_outliers(tiny_hf_factory)
    model = sq.hf_model_from_state_dict(args, sd)
    act, _ = sq.capture_stats(model, prompts[:2], kv=False, progress=False)
    tensors = hf_to_unified(sd, args)
    one = sq.smooth_unified(tensors, args, act, 0.5)
    per = sq.smooth_unified(tensors, args, act, {f"transformer.layers.{i}.{g}": 0.5
                                                 for i in range(args.num_hidden_layers)
                                                 for g, _, _ in sq.SQ_GROUPS})
    for a, b in zip(one, per):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _convert_and_run(src, tmp_path, sq_arg):
    import build
    import hf_llama_convert
    from llama_engine.kv_cache import static_block_tables
    from llama_engine.runner import Engine
    ck, eng = tmp_path / f"ck{sq_arg}", tmp_path / f"eng{sq_arg}"
    assert hf_llama_convert.main(["-i", str(src), "-o", str(ck), "-sq", sq_arg, "--per_token",
                                  "--per_channel", "--calib_dataset", "synthetic",
                                  "--calib_size", "4", "--max_input_length", "32",
                                  "--dtype", "float32", "--device", "cpu",
                                  "--no_progress"]) == 0
    q = json.loads((ck / "config.json").read_text())["quantization"]
    assert build.main(["--ckpt_dir", str(ck), "--output_dir", str(eng), "--use_smooth_quant",
                       "--per_token", "--per_channel", "--max_batch_size", "1",
                       "--max_input_len", "16", "--max_output_len", "4"]) == 0
    e = Engine.from_dir(str(eng), device="cpu")
    cache = e.kv_cache(1, 8)
    logits = e.prefill([[1, 5, 7]], cache, static_block_tables(1, 8, e.block_size, e.device))
    assert torch.isfinite(logits).all()
    return q


def test_convert_sq_auto_records_alphas_and_runs_and_fixed_alpha_still_loads(tiny_hf_factory,
                                                                             tmp_path):
    src = tiny_hf_factory(2, False)
    q = _convert_and_run(src, tmp_path, "auto")
    alphas = q["smoothquant_alphas"]
    assert len(alphas) == 4 * 2 and all(0.1 <= a <= 0.95 for a in alphas.values())
    assert isinstance(q["smoothquant_val"], float)       # TensorRT-LLM's field: one float
    assert q["calibration"]["sq_alpha_search"]["num_prompts"] >= 1
    old = _convert_and_run(src, tmp_path, "0.5")          # the format before the search
    assert old["smoothquant_val"] == 0.5 and "smoothquant_alphas" not in old


def test_sq_flag_rejects_bad_values(capsys):
    import hf_llama_convert
    for bad in ("1.5", "best"):
        try:
            hf_llama_convert.build_parser().parse_args(["-i", "x", "-o", "y", "-sq", bad])
        except SystemExit as e:
            assert e.code == 2
        assert "-sq" in capsys.readouterr().err
