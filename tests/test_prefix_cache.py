"""Prefix caching in the block manager: sharing, LRU eviction, preemption, cancellation
(pure Python, a fake model over a fake paged cache), and identical tokens with caching on and
off on the tiny float64 engine, with the hit count the shared prefix implies."""
import random
import zlib

import pytest

from llama_engine.serving import BlockManager, FinishReason, Scheduler, Sequence

VOCAB = 50


def next_token(history) -> int:
    return zlib.crc32(repr(list(history)).encode()) % VOCAB


def alone(prompt, max_tokens):
    hist, out = list(prompt), []
    while len(out) < max_tokens:
        tok = next_token(hist)
        out.append(tok)
        hist.append(tok)
    return out


class FakeModel:
    """Writes (position, token, whole prefix) into slots; before sampling, checks that every
    slot of the sequence holds exactly its own history (a shared block must too)."""

    def __init__(self, bm):
        self.bm, self.cache = bm, {}
        self.computed = 0

    def run(self, out):
        tokens = []
        for seq, n, sample in zip(out.seqs, out.num_new_tokens, out.sample):
            start = seq.num_computed_tokens
            hist = seq.token_ids(0, start + n)
            for pos, slot in enumerate(self.bm.slots(seq, start, start + n), start):
                # A registered block is never written again.
                assert self.bm._block_key.get(slot // self.bm.block_size) is None
                self.cache[slot] = tuple(hist[:pos + 1])
            self.computed += n
            for pos, slot in enumerate(self.bm.slots(seq, 0, start + n)):
                assert self.cache[slot] == tuple(hist[:pos + 1]), (seq.request_id, pos)
            tokens.append(next_token(hist) if sample else None)
        return tokens


def drive(sched, specs, arrivals=None, cancels=None, model=None):
    model = model or FakeModel(sched.bm)
    arrivals = arrivals if arrivals is not None else {0: list(range(len(specs)))}
    cancels = cancels or {}
    pending, step, finished = len(specs), 0, {}
    while pending or sched.has_unfinished():
        for i in arrivals.get(step, []):
            rid, prompt, max_tokens = specs[i]
            sched.add(Sequence(rid, prompt, max_tokens))
            pending -= 1
        for rid in cancels.get(step, []):
            sched.cancel(rid)
        out = sched.schedule()
        sched.update(out, model.run(out))
        for seq in sched.pop_finished():
            assert seq.request_id not in finished, "finished twice"
            finished[seq.request_id] = seq
        held = {}
        for s in sched.running:
            for b in s.block_table:
                held[b] = held.get(b, 0) + 1
        assert all(sched.bm.ref_counts[b] == c for b, c in held.items())
        assert sum(sched.bm.ref_counts) == sum(held.values())
        assert sched.bm.num_used_blocks == len(held)
        step += 1
        assert step < 100_000
    assert not any(sched.bm.ref_counts) and sched.bm.num_free_blocks == sched.bm.num_blocks
    return finished, model


def test_shared_prefix_hits_and_counts():
    bs, prefix = 4, list(range(10, 22))                         # 3 full blocks shared
    specs = [(f"r{i}", prefix + [30 + i, 31 + i], 5) for i in range(6)]
    sched = Scheduler(BlockManager(64, bs, enable_prefix_caching=True), 2, 64)
    finished, model = drive(sched, specs, arrivals={0: [0], 3: [1, 2, 3, 4, 5]})
    for rid, prompt, m in specs:
        assert finished[rid].output_ids == alone(prompt, m)
    bm = sched.bm
    assert bm.prefix_hit_blocks == 3 * 5                        # every later one hits 3 blocks
    assert bm.prefix_hit_tokens == 12 * 5
    assert bm.prefix_query_tokens == sum(len(p) for _, p, _ in specs)
    off = Scheduler(BlockManager(64, bs), 2, 64)
    _, model_off = drive(off, specs, arrivals={0: [0], 3: [1, 2, 3, 4, 5]})
    assert model_off.computed - model.computed == 12 * 5


def test_whole_prompt_cached_still_computes_last_token():
    bs, prompt = 4, list(range(8))                              # exactly 2 blocks
    sched = Scheduler(BlockManager(16, bs, enable_prefix_caching=True), 1, 16)
    finished, _ = drive(sched, [("a", prompt, 3), ("b", prompt, 3)], arrivals={0: [0], 6: [1]})
    assert finished["b"].output_ids == finished["a"].output_ids == alone(prompt, 3)
    assert sched.bm.prefix_hit_blocks == 1                      # the block with the last token is not taken


def test_lru_eviction_keeps_recent_prefixes():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    sched = Scheduler(bm, 1, 8)
    _, model = drive(sched, [("a", [1, 2, 3, 4, 5], 1)])   # registers [1,2], [1,2][3,4]
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    drive(sched, [("b", [7, 8, 9, 10, 11], 1)], model=model)  # 2 never-cached, 1 evicted
    # The tail [3,4] was released before its prefix [1,2], so it goes first.
    assert bm.num_evictions == 1
    finished, _ = drive(sched, [("c", [1, 2, 3, 4, 6], 1)], model=model)
    assert finished["c"].output_ids == alone([1, 2, 3, 4, 6], 1)
    assert bm.prefix_hit_blocks == 1


@pytest.mark.parametrize("seed", range(40))
def test_random_shared_prefixes_with_preemption_and_cancels(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    bases = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    specs = []
    for i in range(rng.randint(2, 20)):
        p = rng.choice(bases) + [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
        specs.append((f"r{i}", p, rng.randint(1, 10)))
    arrivals = {}
    for i in range(len(specs)):
        arrivals.setdefault(i * rng.randint(0, 3), []).append(i)
    cancels, cancelled = {}, set()
    for rid, _, _ in specs:
        if rng.random() < 0.15:
            cancels.setdefault(rng.randrange(40), []).append(rid)
            cancelled.add(rid)
    num_blocks = rng.randint(12, 30) // bs + 8
    sched = Scheduler(BlockManager(num_blocks, bs, enable_prefix_caching=True),
                      rng.randint(1, 5), 24, policy=rng.choice(Scheduler.POLICIES))
    finished, _ = drive(sched, specs, arrivals, cancels)
    assert set(finished) == {s[0] for s in specs}
    for rid, prompt, m in specs:
        seq = finished[rid]
        if seq.finish_reason in (FinishReason.CANCELLED, FinishReason.ERROR):
            assert rid in cancelled or seq.finish_reason == FinishReason.ERROR
            continue
        assert seq.output_ids == alone(prompt, m), rid


# ---------------------------------------------------------------------------------------------
# The tiny float64 engine: caching on and off give identical tokens
# ---------------------------------------------------------------------------------------------
def test_engine_prefix_caching_on_off_identical(tiny_engine):
    from llama_engine.serving import LLMEngine
    rng = random.Random(3)
    shared = [rng.randrange(3, 512) for _ in range(20)]         # 5 full blocks of 4
    prompts = [shared + [rng.randrange(3, 512) for _ in range(rng.randint(1, 9))]
               for _ in range(6)]
    outs, engines = {}, {}
    for on in (False, True):
        eng = LLMEngine(tiny_engine, max_num_tokens=16, max_kv_cache_tokens=4 * 72,
                        enable_prefix_caching=on)
        first = eng.generate(prompts[:1], 8)                    # the prefix gets cached
        rest = eng.generate(prompts[1:], 8)
        outs[on] = [s.output_ids for s in first + rest]
        engines[on] = eng
        assert eng.block_manager.num_used_blocks == 0
    assert outs[True] == outs[False]
    bm = engines[True].block_manager
    assert bm.prefix_hit_blocks == 5 * 5
    assert engines[False].block_manager.prefix_hit_blocks == 0


def test_prompts_over_one_cached_prefix_share_one_attention_call(tiny_engine, monkeypatch):
    # Equal suffixes after the same cached prefix go through one prefill_attention_batch call
    # whose keys are the gathered prefix plus the new tokens; tokens equal caching off.
    from llama_engine.kernels import ops
    from llama_engine.serving import LLMEngine
    calls = []
    batch = ops.prefill_attention_batch
    monkeypatch.setattr(ops, "prefill_attention_batch", lambda q, k, *a, **kw: (
        calls.append((q.shape[0], q.shape[1], k.shape[1])), batch(q, k, *a, **kw))[1])
    rng = random.Random(4)
    shared = [rng.randrange(3, 512) for _ in range(16)]         # 4 full blocks of 4
    prompts = [shared + [rng.randrange(3, 512) for _ in range(6)] for _ in range(4)]
    outs = {}
    for on in (False, True):
        eng = LLMEngine(tiny_engine, max_num_tokens=64, max_kv_cache_tokens=4 * 72,
                        enable_prefix_caching=on)
        first = eng.generate(prompts[:1], 6)
        calls.clear()
        rest = eng.generate(prompts[1:], 6)
        outs[on] = [s.output_ids for s in first + rest]
        if on:
            assert (3, 6, 22) in calls, calls   # 3 prompts, 6 new tokens over 16 cached
        assert eng.block_manager.num_used_blocks == 0
    assert outs[True] == outs[False]


@pytest.fixture(scope="module")
def tiny_engine():
    import torch

    import weight
    from llama_engine import checkpoint as ckpt
    from llama_engine.config import BuildConfig, EngineConfig, ModelArgs, PRESETS, QuantConfig
    from llama_engine.runner import Engine
    args = ModelArgs(**PRESETS["tiny"])
    sd = weight.random_weights(args, "float64", seed=0)
    sd = {k: (v * 4 if v.dim() == 2 else v) for k, v in sd.items()}
    build = BuildConfig(max_batch_size=4, max_input_len=48, max_output_len=24,
                        tokens_per_block=4, use_inflight_batching=True, paged_kv_cache=True)
    cfg = EngineConfig(model=args, quant=QuantConfig(), build=build, dtype="float64")
    torch.set_num_threads(1)
    return Engine.from_tensors(cfg, ckpt.hf_to_unified(sd, args), "cpu")
