"""Beam search against Hugging Face ``generate(num_beams=..., do_sample=False)``: the same
sequences and scores, in the static batch and under inflight batching (mixed with other
requests, with preemption and prefix caching), on a tiny random LLaMA for the
length_penalty / early_stopping variants and on SmolLM2 (float64) for real summaries; the
block manager's sharing and copy-on-write; bad input as one line."""
from __future__ import annotations

import pytest
import torch

import build
from llama_engine.beam import BeamConfig
from llama_engine.config import ConfigError
from llama_engine.runner import Engine
from llama_engine.sampling import SamplingConfig
from llama_engine.serving import BlockManager, LLMEngine, Sequence

N = 16
PROMPTS = [[1, 17, 93, 5, 61, 200, 34], [1, 250, 8, 8, 140, 77, 3, 9, 42]]
# Tokens the tiny model produces often: as end ids they end beams early, so finished
# hypotheses, early stopping and length penalties all matter.
ENDS = [20, 93]


@pytest.fixture(scope="module")
def tiny(tiny_hf_factory, tmp_path_factory):
    from transformers import LlamaForCausalLM
    torch.set_num_threads(1)
    src = tiny_hf_factory(2, False)
    out = tmp_path_factory.mktemp("beam") / "eng"
    assert build.main(["--model_dir", str(src), "--dtype", "float64", "--output_dir", str(out),
                       "--max_batch_size", "8", "--max_input_len", "64",
                       "--max_output_len", "32"]) == 0
    engine = Engine.from_dir(str(out), device="cpu")
    hf = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float64).eval()
    return engine, hf


def hf_beams(hf, prompt, n_new, cfg: BeamConfig, ends, pad=0):
    """HF's num_return_sequences rows (cut before the first end id) and their scores."""
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                      do_sample=False, num_beams=cfg.num_beams,
                      length_penalty=cfg.length_penalty, early_stopping=cfg.early_stopping,
                      num_return_sequences=cfg.num_return_sequences, eos_token_id=ends,
                      pad_token_id=pad, return_dict_in_generate=True, output_scores=True)
    rows = []
    for r in out.sequences[:, len(prompt):].tolist():
        cut = next((i for i, t in enumerate(r) if t in ends), len(r))
        rows.append(r[:cut])
    return rows, out.sequences_scores.tolist()


def check_equal(ours_rows, ours_scores, hf_rows, hf_scores, tol=1e-9):
    # HF pads rows that ended early; ours are cut there: compare the cut rows.
    assert ours_rows == hf_rows
    assert max(abs(a - b) for a, b in zip(ours_scores, hf_scores)) <= tol


@pytest.mark.parametrize("cfg", [
    BeamConfig(2, 1.0, False, 2),
    BeamConfig(4, 1.0, True, 3),
    BeamConfig(4, 2.0, "never", 4),
    BeamConfig(3, 0.5, False, 1),
    BeamConfig(4, -1.0, True, 2),
], ids=lambda c: f"k{c.num_beams}-lp{c.length_penalty}-es{c.early_stopping}"
                 f"-n{c.num_return_sequences}")
def test_tiny_equals_hf_static_and_inflight(tiny, cfg):
    engine, hf = tiny
    st = engine.generate(PROMPTS, N, beam=cfg, end_id=ENDS)
    n = cfg.num_return_sequences
    assert len(st.output_ids) == len(PROMPTS) * n and st.num_return_sequences == n
    for g, p in enumerate(PROMPTS):
        rows, scores = hf_beams(hf, p, N, cfg, ENDS)
        check_equal(st.output_ids[g * n:(g + 1) * n], st.beam_scores[g * n:(g + 1) * n],
                    rows, scores)
    assert st.cum_log_probs == st.beam_scores
    # Inflight: beside a plain request, with a small token budget.
    llm = LLMEngine(engine, max_num_tokens=8, max_kv_cache_tokens=1024)
    other = llm.add_request([1, 3, 4, 5], SamplingConfig(), 10)
    seqs = llm.generate(PROMPTS, N, stop_ids=ENDS, beam=cfg)
    assert [r for s in seqs for r in s.beam_output_ids] == st.output_ids
    assert [x for s in seqs for x in s.beam_scores] == st.beam_scores
    assert all(s.output_ids == s.beam_output_ids[0] for s in seqs)
    while llm.has_unfinished():
        llm.step()
    assert llm.block_manager.num_used_blocks == 0, "beam rows leaked blocks"
    assert other is not None


def test_inflight_preemption_and_prefix_caching_give_the_same_beams(tiny):
    engine, _ = tiny
    cfg = BeamConfig(4, 1.0, False, 4)
    st = engine.generate(PROMPTS, N, beam=cfg, end_id=ENDS)
    # A cache too small for both groups at once: one is preempted and restarts its search.
    llm = LLMEngine(engine, max_num_tokens=64, max_kv_cache_tokens=640,
                    enable_prefix_caching=True)
    seqs = llm.generate(PROMPTS + PROMPTS[:1], N, stop_ids=ENDS, beam=cfg)
    assert llm.scheduler.num_preemptions > 0
    rows = [r for s in seqs for r in s.beam_output_ids]
    assert rows[:8] == st.output_ids and rows[8:] == st.output_ids[:4]
    assert llm.block_manager.num_used_blocks == 0


def test_block_sharing_and_copy_on_write():
    bm = BlockManager(8, 4)
    a, b = Sequence(0, [1] * 6, 4), Sequence(1, [1] * 6, 4)
    bm.allocate(a, 6)                      # blocks for positions 0..5: two, the last partial
    b.block_table = list(a.block_table)
    bm.share(b.block_table)
    src_dst = bm.cow(b, 6)                 # b writes position 6: its shared last block
    assert src_dst is not None and src_dst[0] == a.block_table[1]
    assert b.block_table[1] == src_dst[1] != a.block_table[1]
    assert bm.cow(a, 6) is None            # a holds its last block alone now
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_bad_input_is_one_line(tiny):
    engine, _ = tiny
    with pytest.raises(ConfigError, match="exceeds the engine's max_batch_size 8"):
        engine.generate(PROMPTS * 2, 4, beam=BeamConfig(num_beams=3))
    with pytest.raises(ConfigError, match="num_return_sequences"):
        engine.generate(PROMPTS, 4, beam=BeamConfig(num_beams=2, num_return_sequences=3))
    with pytest.raises(ConfigError, match="early_stopping"):
        engine.generate(PROMPTS, 4, beam=BeamConfig(num_beams=2, early_stopping="sometimes"))
    with pytest.raises(ConfigError, match="deterministically"):
        engine.generate(PROMPTS, 4, SamplingConfig(top_k=5), beam=BeamConfig(num_beams=2))
    llm = LLMEngine(engine, max_kv_cache_tokens=1024)
    with pytest.raises(ConfigError, match="penalties"):
        llm.add_request(PROMPTS[0], SamplingConfig(repetition_penalty=1.2), 4,
                        beam=BeamConfig(num_beams=2))


# -- SmolLM2, float64: real summaries --------------------------------------------------------
@pytest.fixture(scope="module")
def smol(smol_engine, smollm2_gguf, shared_data):
    from run_hf import load_hf_model
    from llama_engine.prompts import build_summarize_prompt, load_cnn_dailymail
    from llama_engine.tokenizer import load_tokenizer
    torch.set_num_threads(1)
    tok = load_tokenizer(smollm2_gguf)
    recs = load_cnn_dailymail(str(shared_data / "cnn_dailymail" / "test_dev.jsonl"), limit=2)
    prompts = [build_summarize_prompt(r["article"], tok, 96)
               for r in recs]
    engine = Engine.from_dir(str(smol_engine), device="cpu")
    hf = load_hf_model(smollm2_gguf, "float64", "cpu")
    return engine, hf, tok, prompts


@pytest.mark.parametrize("k", [2, 4])
def test_smollm2_beams_equal_hf(smol, k):
    engine, hf, tok, prompts = smol
    cfg = BeamConfig(k, 1.0, False, 2)
    ends = tok.end_ids
    hf_rows, hf_scores = [], []
    for p in prompts:
        rows, scores = hf_beams(hf, p, 24, cfg, ends, pad=tok.pad_id or 0)
        hf_rows += rows
        hf_scores += scores
    # Static: the engine (batch 2) holds one prompt's beams at a time for k=2; 4 beams
    # exceed it (one line) while inflight batching is not bound by the build's batch size.
    # (Inflight = static is checked for every variant on the tiny model above.)
    if k == 2:
        st = [engine.generate([p], 24, beam=cfg, end_id=ends) for p in prompts]
        check_equal([r for o in st for r in o.output_ids],
                    [x for o in st for x in o.beam_scores], hf_rows, hf_scores)
        return
    with pytest.raises(ConfigError, match="max_batch_size 2"):
        engine.generate(prompts[:1], 24, beam=cfg, end_id=ends)
    llm = LLMEngine(engine, max_batch_size=8, max_num_tokens=512, max_kv_cache_tokens=4096)
    llm.add_request(prompts[0][:50], SamplingConfig(), 8)          # another request beside
    seqs = llm.generate(prompts, 24, stop_ids=ends, beam=cfg)
    check_equal([r for s in seqs for r in s.beam_output_ids],
                [x for s in seqs for x in s.beam_scores], hf_rows, hf_scores)
