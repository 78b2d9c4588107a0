"""Inflight batching: block manager, scheduler (pure Python) and the LLM engine (tiny model).

The scheduler tests drive the scheduler with a fake model that writes every computed token
into a fake paged cache through the block tables and, before sampling, checks that the whole
history of the sequence is there at the right slots; its "sampled" token is a hash of the
request and its history, so the expected outputs of each request run alone are known.
"""
import random
import zlib

import pytest

from llama_engine.config import ConfigError
from llama_engine.serving import (BlockManager, FinishReason, Scheduler, Sequence,
                                  SequenceStatus)

VOCAB = 50


# ---------------------------------------------------------------------------------------------
# A fake model over a fake paged cache
# ---------------------------------------------------------------------------------------------
def next_token(request_id, history) -> int:
    """Deterministic 'model': depends only on the request and its tokens so far."""
    return zlib.crc32(repr((request_id, list(history))).encode()) % VOCAB


def expected_output(seq_spec) -> tuple[list[int], FinishReason]:
    """What a request produces when run alone."""
    rid, prompt, max_tokens, stop_ids = seq_spec
    hist, out = list(prompt), []
    while True:
        tok = next_token(rid, hist)
        if tok in stop_ids:
            return out, FinishReason.STOP
        out.append(tok)
        hist.append(tok)
        if len(out) >= max_tokens:
            return out, FinishReason.LENGTH


class FakeModel:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.cache = {}        # slot -> (request_id, position, token)

    def run(self, out):
        tokens = []
        for seq, n, sample in zip(out.seqs, out.num_new_tokens, out.sample):
            start = seq.num_computed_tokens
            ids = seq.token_ids(start, start + n)
            assert len(ids) == n
            for pos, (slot, tok) in enumerate(zip(self.bm.slots(seq, start, start + n), ids),
                                              start):
                self.cache[slot] = (seq.request_id, pos, tok)
            if not sample:
                tokens.append(None)
                continue
            # "Attention" reads the whole history from the cache: it must all be there.
            hist = seq.token_ids(0, start + n)
            for pos, slot in enumerate(self.bm.slots(seq, 0, start + n)):
                assert self.cache[slot] == (seq.request_id, pos, hist[pos]), \
                    f"request {seq.request_id} position {pos}: cache holds {self.cache[slot]}"
            tokens.append(next_token(seq.request_id, hist))
        return tokens


def check_invariants(sched: Scheduler, order: dict):
    bm = sched.bm
    tables = [b for s in sched.running for b in s.block_table]
    assert len(tables) == len(set(tables)), "a block is held by two sequences"
    assert bm.num_free_blocks + len(tables) == bm.num_blocks
    assert all(bm.ref_counts[b] == 1 for b in tables)
    assert sum(bm.ref_counts) == len(tables)
    for s in sched.waiting:
        assert not s.block_table and s.num_computed_tokens == 0
        assert s.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
    assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
    assert len(sched.running) <= sched.max_batch_size
    # FCFS: both queues stay in arrival order (preempted requests are older than waiting ones).
    w = [order[s.request_id] for s in sched.waiting]
    r = [order[s.request_id] for s in sched.running]
    assert w == sorted(w) and r == sorted(r)
    if sched.running and sched.waiting:
        assert r[-1] < w[0]


def run_to_completion(sched, specs, arrivals=None, cancels=None, model=None,
                      max_steps=100_000):
    """Drive the scheduler; returns {request_id: finished Sequence} and the step outputs.
    ``arrivals``: {step: [spec indices]} (default all at step 0); ``cancels``: {step: [ids]}."""
    model = model or FakeModel(sched.bm)
    arrivals = arrivals if arrivals is not None else {0: list(range(len(specs)))}
    cancels = cancels or {}
    order = {spec[0]: i for i, spec in enumerate(specs)}
    finished, outs = {}, []
    pending = sum(len(v) for v in arrivals.values())
    step = 0
    while pending or sched.has_unfinished():
        for i in arrivals.get(step, []):
            rid, prompt, max_tokens, stop_ids = specs[i]
            sched.add(Sequence(rid, prompt, max_tokens, stop_ids=stop_ids))
            pending -= 1
        for rid in cancels.get(step, []):
            sched.cancel(rid)
        running_decodes = [s for s in sched.running if s.is_decode]
        out = sched.schedule()
        outs.append(out)
        # Step-level contracts.
        assert out.num_tokens <= sched.max_num_tokens
        assert len(out.seqs) <= sched.max_batch_size
        assert len(set(map(id, out.seqs))) == len(out.seqs)
        assert all(n >= 1 for n in out.num_new_tokens)
        assert out.is_decode == (bool(out.seqs) and all(n == 1 for n in out.num_new_tokens))
        if out.num_tokens < sched.max_num_tokens:
            # Decodes come first: a running decode is left out only when preempted.
            for s in running_decodes:
                assert s in out.seqs or s in out.preempted
        if sched.has_unfinished() and not out.preempted:
            assert out.seqs, "no progress in a step"
        tokens = model.run(out)
        sched.update(out, tokens)
        for seq in sched.pop_finished():
            assert seq.request_id not in finished, "request finished twice"
            assert seq.is_finished and not seq.block_table
            finished[seq.request_id] = seq
        check_invariants(sched, order)
        step += 1
        assert step < max_steps, "scheduler does not terminate"
    assert sched.bm.num_free_blocks == sched.bm.num_blocks, "blocks leaked"
    assert not any(sched.bm.ref_counts)
    return finished, outs


def make_specs(rng, n, prompt_range, out_range, stop_prob=0.0):
    specs = []
    for i in range(n):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(*prompt_range))]
        stop = {rng.randrange(VOCAB)} if rng.random() < stop_prob else set()
        specs.append((f"r{i}", prompt, rng.randint(*out_range), stop))
    return specs


def assert_outputs(finished, specs, skip=()):
    for spec in specs:
        if spec[0] in skip:
            continue
        seq = finished[spec[0]]
        want, reason = expected_output(spec)
        assert seq.output_ids == want, f"{spec[0]}: {seq.output_ids} != {want}"
        assert seq.finish_reason == reason


# ---------------------------------------------------------------------------------------------
# Block manager
# ---------------------------------------------------------------------------------------------
def test_block_manager_allocate_append_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = Sequence("a", list(range(6)), max_tokens=8)
    assert bm.blocks_needed(seq, 6) == 2 and bm.can_allocate(seq, 6)
    bm.allocate(seq, 6)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2
    seq.num_computed_tokens = 6
    bm.append(seq)                       # slot 6: still in block 1
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 8
    bm.append(seq)                       # slot 8: a third block
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 1
    b0, b1 = seq.block_table[:2]
    assert bm.slots(seq, 3, 6) == [b0 * 4 + 3, b1 * 4, b1 * 4 + 1]
    other = Sequence("b", [1] * 9, max_tokens=1)
    assert not bm.can_allocate(other, 9) and bm.can_allocate(other, 4)
    bm.free(seq)
    assert bm.num_free_blocks == 4 and seq.block_table == [] and not any(bm.ref_counts)


def test_block_manager_never_double_frees():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = Sequence("a", [1, 2, 3], max_tokens=1)
    bm.allocate(seq, 3)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table              # a stale table freed again
    with pytest.raises(AssertionError, match="double free"):
        bm.free(seq)


def test_block_manager_rejects_bad_sizes():
    with pytest.raises(ConfigError):
        BlockManager(0, 16)
    with pytest.raises(ConfigError):
        BlockManager(4, 0)


# ---------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------
def test_all_requests_complete_with_the_tokens_they_get_alone():
    specs = make_specs(random.Random(0), 12, (1, 20), (1, 15), stop_prob=0.3)
    sched = Scheduler(BlockManager(64, 4), max_batch_size=4, max_num_tokens=16)
    finished, _ = run_to_completion(sched, specs)
    assert set(finished) == {s[0] for s in specs}
    assert_outputs(finished, specs)
    assert sched.num_preemptions == 0


def test_stop_id_ends_the_request_and_is_not_output():
    prompt = [3, 4, 5]
    first = next_token("s", prompt)
    spec = ("s", prompt, 10, {first})
    sched = Scheduler(BlockManager(8, 4), max_batch_size=2, max_num_tokens=8)
    finished, _ = run_to_completion(sched, [spec])
    seq = finished["s"]
    assert seq.output_ids == [] and seq.finish_reason == FinishReason.STOP
    assert seq.stop_token == first


def test_chunked_prefill_splits_long_prompt_and_decodes_go_first():
    specs = [("short", [1, 2], 20, set()), ("long", list(range(40)), 3, set())]
    sched = Scheduler(BlockManager(64, 4), max_batch_size=4, max_num_tokens=16)
    finished, outs = run_to_completion(sched, specs, arrivals={0: [0], 2: [1]})
    assert_outputs(finished, specs)
    steps = [{s.request_id: n for s, n in zip(o.seqs, o.num_new_tokens)} for o in outs]
    assert steps[0] == {"short": 2}
    assert steps[1] == {"short": 1}
    # "long" arrives at step 2: 15 tokens (the decode took one), 15, then the last 10.
    assert steps[2] == {"short": 1, "long": 15}
    assert steps[3] == {"short": 1, "long": 15}
    assert steps[4] == {"short": 1, "long": 10}
    assert outs[4].sample[1] and not outs[3].sample[1]
    assert steps[5] == {"short": 1, "long": 1} and outs[5].is_decode


def test_preemption_by_recompute_then_completion():
    rng = random.Random(1)
    specs = make_specs(rng, 6, (6, 12), (10, 20))
    # 10 blocks of 4 = 40 slots: all 6 are admitted, then the cache runs out as they grow.
    sched = Scheduler(BlockManager(10, 4), max_batch_size=6, max_num_tokens=64)
    finished, outs = run_to_completion(sched, specs)
    assert sched.num_preemptions > 0
    assert any(seq.num_preemptions for seq in finished.values())
    assert_outputs(finished, specs)
    # Newest first: the first victim is the newest request running at that time.
    first = next(o for o in outs if o.preempted)
    victim = first.preempted[0]
    assert all(int(s.request_id[1:]) <= int(victim.request_id[1:]) for s in first.seqs)


def test_oldest_request_is_never_starved():
    # One request alone needs nearly the whole cache; the rest keep getting preempted for it.
    specs = [("big", [1] * 10, 20, set())] + [(f"s{i}", [2] * 3, 10, set()) for i in range(5)]
    sched = Scheduler(BlockManager(8, 4), max_batch_size=8, max_num_tokens=32)
    finished, _ = run_to_completion(sched, specs)
    assert_outputs(finished, specs)
    assert finished["big"].num_preemptions == 0


def test_cancel_frees_blocks_running_and_waiting():
    specs = [(f"r{i}", [1, 2, 3, 4, 5], 30, set()) for i in range(4)]
    sched = Scheduler(BlockManager(16, 4), max_batch_size=2, max_num_tokens=16)
    for rid, prompt, mt, stop in specs:
        sched.add(Sequence(rid, prompt, mt, stop_ids=stop))
    model = FakeModel(sched.bm)
    for _ in range(3):
        out = sched.schedule()
        sched.update(out, model.run(out))
    assert sched.get("r0").status is SequenceStatus.RUNNING
    assert sched.get("r3").status is SequenceStatus.WAITING
    used = sched.bm.num_used_blocks
    held = len(sched.get("r0").block_table)
    assert sched.cancel("r0") and sched.cancel("r3")
    assert sched.bm.num_used_blocks == used - held
    assert not sched.cancel("r0") and not sched.cancel("nope")
    done = sched.pop_finished()
    assert [s.request_id for s in done] == ["r0", "r3"]
    assert all(s.finish_reason == FinishReason.CANCELLED for s in done)
    finished, _ = run_to_completion(sched, specs, arrivals={}, model=model)
    assert set(finished) == {"r1", "r2"}
    assert_outputs(finished, specs, skip={"r0", "r3"})


def test_cancel_between_schedule_and_update_is_safe():
    sched = Scheduler(BlockManager(16, 4), max_batch_size=2, max_num_tokens=16)
    sched.add(Sequence("a", [1, 2, 3], 5))
    sched.add(Sequence("b", [4, 5], 5))
    out = sched.schedule()
    tokens = FakeModel(sched.bm).run(out)
    sched.cancel("a")
    sched.update(out, tokens)
    assert sched.get("a") is None and sched.get("b").num_output_tokens == 1
    assert sched.bm.num_used_blocks == len(sched.get("b").block_table)


@pytest.mark.parametrize("why,prompt_len,max_tokens,match", [
    ("over_cache", 20, 30, "whole cache has 8"),
    ("over_max_input_len", 70, 1, "longer than max_input_len 64"),
    ("over_max_output_len", 5, 70, "over max_output_len 64"),
    ("over_max_seq_len", 60, 40, "over max_seq_len 96"),
    ("empty_prompt", 0, 5, "empty prompt"),
    ("no_tokens", 5, 0, "max_tokens must be at least 1"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else "")
def test_never_fits_errors_while_others_complete(why, prompt_len, max_tokens, match):
    good = make_specs(random.Random(2), 3, (2, 6), (2, 6))
    bad = ("bad", [7] * prompt_len, max_tokens, set())
    specs = [good[0], bad, good[1], good[2]]
    sched = Scheduler(BlockManager(8, 4), max_batch_size=4, max_num_tokens=32,
                      max_input_len=64, max_output_len=64, max_seq_len=96)
    finished, _ = run_to_completion(sched, specs)
    assert finished["bad"].finish_reason == FinishReason.ERROR
    assert match in finished["bad"].error
    assert_outputs(finished, specs, skip={"bad"})


def test_exactly_fitting_request_runs():
    # prompt 10 + 23 new tokens: the last token's K/V is never written, so 32 slots suffice.
    spec = ("fit", [1] * 10, 23, set())
    sched = Scheduler(BlockManager(8, 4), max_batch_size=1, max_num_tokens=8)
    finished, _ = run_to_completion(sched, [spec])
    assert_outputs(finished, [spec])


def test_fcfs_order_with_one_slot():
    specs = make_specs(random.Random(3), 6, (1, 9), (1, 5))
    sched = Scheduler(BlockManager(32, 4), max_batch_size=1, max_num_tokens=8)
    order = []
    model = FakeModel(sched.bm)
    for rid, prompt, mt, stop in specs:
        sched.add(Sequence(rid, prompt, mt, stop_ids=stop))
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, model.run(out))
        order += [s.request_id for s in sched.pop_finished()]
    assert order == [s[0] for s in specs]


def test_duplicate_request_id_and_bad_limits_rejected():
    sched = Scheduler(BlockManager(8, 4), max_batch_size=2, max_num_tokens=8)
    sched.add(Sequence("a", [1], 2))
    with pytest.raises(ConfigError, match="already queued"):
        sched.add(Sequence("a", [1], 2))
    with pytest.raises(ConfigError, match="max_num_tokens"):
        Scheduler(BlockManager(8, 4), max_batch_size=8, max_num_tokens=4)


def test_guaranteed_no_evict_never_preempts():
    rng = random.Random(1)
    specs = make_specs(rng, 6, (6, 12), (10, 20))  # the preemption test's load
    sched = Scheduler(BlockManager(10, 4), max_batch_size=6, max_num_tokens=64,
                      policy="guaranteed_no_evict")
    finished, outs = run_to_completion(sched, specs)
    assert sched.num_preemptions == 0 and not any(o.preempted for o in outs)
    assert_outputs(finished, specs)
    # It admits only what fits whole: never more running than the cache holds at full length.
    assert max(len(o.seqs) for o in outs) < 6
    with pytest.raises(ConfigError, match="unknown scheduler policy 'fifo'"):
        Scheduler(BlockManager(10, 4), max_batch_size=6, max_num_tokens=64, policy="fifo")


@pytest.mark.parametrize("policy", Scheduler.POLICIES)
@pytest.mark.parametrize("seed", range(40))
def test_random_scenarios(seed, policy):
    """Random caches, limits, arrivals and cancellations: every request finishes exactly once
    with the tokens it would get alone, the cache always agrees with the block tables, and
    every block comes back."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_batch = rng.randint(1, 6)
    max_num_tokens = rng.randint(max_batch, 40)
    num_blocks = rng.randint(4, 40)
    specs = make_specs(rng, rng.randint(1, 25), (1, 30), (1, 25), stop_prob=0.3)
    arrivals = {}
    for i in range(len(specs)):
        arrivals.setdefault(rng.randrange(30), []).append(i)
    arrivals = {step: sorted(v) for step, v in arrivals.items()}
    # Re-number so that arrival order is spec order (check_invariants compares them).
    by_step = [i for step in sorted(arrivals) for i in arrivals[step]]
    specs = [specs[i] for i in by_step]
    pos = {old: new for new, old in enumerate(by_step)}
    arrivals = {step: [pos[i] for i in v] for step, v in arrivals.items()}
    cancels = {}
    cancelled = set()
    for spec in specs:
        if rng.random() < 0.15:
            cancels.setdefault(rng.randrange(60), []).append(spec[0])
            cancelled.add(spec[0])
    sched = Scheduler(BlockManager(num_blocks, block_size), max_batch_size=max_batch,
                      max_num_tokens=max_num_tokens, policy=policy)
    finished, _ = run_to_completion(sched, specs, arrivals, cancels)
    assert set(finished) == {s[0] for s in specs}
    if policy == "guaranteed_no_evict":
        assert sched.num_preemptions == 0
    never_fit = {rid for rid, s in finished.items() if s.finish_reason == FinishReason.ERROR}
    for rid in never_fit:
        spec = next(s for s in specs if s[0] == rid)
        assert -(-(len(spec[1]) + spec[2] - 1) // block_size) > num_blocks
    skip = set(never_fit)
    for rid in cancelled:
        if finished[rid].finish_reason == FinishReason.CANCELLED:
            skip.add(rid)
    assert_outputs(finished, specs, skip=skip)


# ---------------------------------------------------------------------------------------------
# LLMEngine on a tiny float64 model (float64: batch composition cannot flip a greedy token)
# ---------------------------------------------------------------------------------------------
BLOCK = 4
MAX_IN, MAX_OUT = 48, 24


@pytest.fixture(scope="module")
def tiny_engine():
    import torch

    import weight
    from llama_engine import checkpoint as ckpt
    from llama_engine.config import BuildConfig, EngineConfig, ModelArgs, PRESETS, QuantConfig
    from llama_engine.runner import Engine
    args = ModelArgs(**PRESETS["tiny"])
    sd = weight.random_weights(args, "float64", seed=0)
    # Wider than N(0, 0.02) so logits are far from uniform (greedy paths are not near-ties).
    sd = {k: (v * 4 if v.dim() == 2 else v) for k, v in sd.items()}
    build = BuildConfig(max_batch_size=4, max_input_len=MAX_IN, max_output_len=MAX_OUT,
                        tokens_per_block=BLOCK, use_inflight_batching=True, paged_kv_cache=True)
    cfg = EngineConfig(model=args, quant=QuantConfig(), build=build, dtype="float64")
    torch.set_num_threads(1)
    return Engine.from_tensors(cfg, ckpt.hf_to_unified(sd, args), "cpu")


def tiny_prompts(n, seed=0, lo=1, hi=MAX_IN):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@pytest.fixture(scope="module")
def alone(tiny_engine):
    """Greedy output of each prompt run alone with the static runner, memoized."""
    memo = {}

    def get(prompt, max_tokens):
        key = (tuple(prompt), max_tokens)
        if key not in memo:
            memo[key] = tiny_engine.generate([prompt], max_tokens).output_ids[0]
        return memo[key]
    return get


def llm(tiny_engine, **kw):
    from llama_engine.serving import LLMEngine
    kw.setdefault("max_num_tokens", 16)
    kw.setdefault("max_kv_cache_tokens", 4 * (MAX_IN + MAX_OUT))
    return LLMEngine(tiny_engine, **kw)


def assert_blocks_returned(eng):
    bm = eng.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)
    assert not eng.scheduler.running and not eng.scheduler.waiting


@pytest.mark.parametrize("kv_tokens,preempts", [
    pytest.param(4 * (MAX_IN + MAX_OUT), False, id="roomy-cache"),
    pytest.param(MAX_IN + MAX_OUT, True, id="tiny-cache-preempts"),
])
def test_inflight_greedy_equals_each_prompt_alone(tiny_engine, alone, kv_tokens, preempts):
    prompts = tiny_prompts(10, seed=1)
    max_tokens = [random.Random(i).randint(1, MAX_OUT) for i in range(len(prompts))]
    eng = llm(tiny_engine, max_kv_cache_tokens=kv_tokens)
    seqs = eng.generate(prompts, max_tokens)
    for p, m, seq in zip(prompts, max_tokens, seqs):
        assert seq.finish_reason == FinishReason.LENGTH
        assert seq.output_ids == alone(p, m)
    assert (eng.scheduler.num_preemptions > 0) == preempts
    assert_blocks_returned(eng)


def test_step_stats_count_every_step(tiny_engine):
    eng = llm(tiny_engine, max_num_tokens=8)
    prompts = tiny_prompts(3, seed=4, lo=10, hi=20)
    eng.generate(prompts, 5)
    st = eng.step_summary()
    assert st["decode"]["steps"] + st["mixed"]["steps"] == eng.num_steps
    assert st["mixed"]["tokens"] + st["decode"]["tokens"] == sum(map(len, prompts)) + 3 * 4
    assert st["decode"]["tokens"] == st["decode"]["seqs"]  # one token per sequence
    assert st["mixed"]["ms_per_step"] > 0 and st["preemptions"] == 0
    eng.reset_step_stats()
    assert eng.step_summary()["decode"]["steps"] == 0


def test_chunked_prefill_and_mixed_steps_are_exercised(tiny_engine, alone):
    eng = llm(tiny_engine, max_num_tokens=8)
    steps = []
    execute = eng.runner.execute
    eng.runner.execute = lambda out: (steps.append(list(zip(out.num_new_tokens, out.sample))),
                                      execute(out))[1]
    prompts = tiny_prompts(4, seed=2, lo=20, hi=MAX_IN)
    ids = [eng.add_request(p, max_tokens=6) for p in prompts]
    outs = {i: [] for i in ids}
    for out in eng.stream():
        outs[out.request_id] += out.new_token_ids
    # Some step ran a prompt chunk that samples nothing, some step mixed decodes and a chunk.
    assert any(not sample for step in steps for _, sample in step)
    assert any(any(n == 1 for n, _ in step) and any(n > 1 for n, _ in step) for step in steps)
    assert all(sum(n for n, _ in step) <= 8 for step in steps)
    for i, p in zip(ids, prompts):
        assert outs[i] == alone(p, 6)
    assert_blocks_returned(eng)


def test_equal_length_prompts_share_one_attention_call(tiny_engine, alone, monkeypatch):
    # Prompts of one length admitted together go through prefill_attention_batch (adjacent:
    # views; with another prompt between them: stacked); tokens still equal each alone.
    from llama_engine.kernels import ops
    calls = []
    batch = ops.prefill_attention_batch
    monkeypatch.setattr(ops, "prefill_attention_batch",
                        lambda q, *a, **k: (calls.append(q.shape[0]), batch(q, *a, **k))[1])
    eq = tiny_prompts(3, seed=7, lo=9, hi=9)
    other = tiny_prompts(1, seed=8, lo=5, hi=5)
    prompts = [eq[0], eq[1], other[0], eq[2]]
    eng = llm(tiny_engine, max_num_tokens=64)
    seqs = eng.generate(prompts, 5)
    assert calls and max(calls) == 3   # all three 9-token prompts in one call
    for p, seq in zip(prompts, seqs):
        assert seq.output_ids == alone(p, 5)
    assert_blocks_returned(eng)


def test_stream_and_stop_ids(tiny_engine, alone):
    prompts = tiny_prompts(3, seed=3, hi=20)
    full = [alone(p, 12) for p in prompts]
    stop = full[1][4]                      # request 1 stops at its 5th token
    eng = llm(tiny_engine)
    ids = [eng.add_request(p, max_tokens=12, stop_ids=[stop]) for p in prompts]
    got = {i: [] for i in ids}
    finished = {}
    for out in eng.stream():
        got[out.request_id] += out.new_token_ids
        if out.finished:
            assert out.request_id not in finished
            finished[out.request_id] = out
    for i, want in zip(ids, full):
        cut = want.index(stop) if stop in want else len(want)
        assert got[i] == want[:cut] == finished[i].sequence.output_ids
        assert finished[i].finish_reason == (FinishReason.STOP if stop in want
                                             else FinishReason.LENGTH)
    assert_blocks_returned(eng)


def test_cancel_frees_blocks_and_others_finish(tiny_engine, alone):
    prompts = tiny_prompts(4, seed=4, hi=30)
    eng = llm(tiny_engine)
    ids = [eng.add_request(p, max_tokens=MAX_OUT) for p in prompts]
    for _ in range(4):
        eng.step()
    victim = eng.scheduler.get(ids[1])
    assert victim.block_table and victim.num_output_tokens > 0
    used = eng.block_manager.num_used_blocks
    held = len(victim.block_table)
    assert eng.cancel(ids[1])
    assert eng.block_manager.num_used_blocks == used - held
    assert not eng.cancel(ids[1])
    results = {}
    for out in eng.stream():
        if out.finished:
            results[out.request_id] = out.sequence
    assert results[ids[1]].finish_reason == FinishReason.CANCELLED
    for i, p in zip(ids, prompts):
        if i != ids[1]:
            assert results[i].output_ids == alone(p, MAX_OUT)
    assert_blocks_returned(eng)


@pytest.mark.parametrize("prompt_len,max_tokens,match", [
    pytest.param(MAX_IN + 1, 4, "longer than max_input_len", id="prompt-too-long"),
    pytest.param(10, MAX_OUT + 1, "over max_output_len", id="too-many-tokens"),
    pytest.param(MAX_IN, MAX_OUT, "whole cache", id="over-the-cache"),
])
def test_never_fitting_request_errors_while_rest_complete(tiny_engine, alone, prompt_len,
                                                          max_tokens, match):
    prompts = tiny_prompts(3, seed=5, hi=20)
    bad = [7] * prompt_len
    eng = llm(tiny_engine, max_kv_cache_tokens=MAX_IN + MAX_OUT - 8)
    seqs = eng.generate([prompts[0], bad, prompts[1], prompts[2]], [8, max_tokens, 8, 8])
    assert seqs[1].finish_reason == FinishReason.ERROR and match in seqs[1].error
    assert seqs[1].output_ids == []
    for p, seq in zip(prompts, [seqs[0], seqs[2], seqs[3]]):
        assert seq.output_ids == alone(p, 8)
    assert_blocks_returned(eng)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_engine):
    from llama_engine.runner import SamplingConfig
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, seed=1234)
    prompt = tiny_prompts(1, seed=6, hi=20)[0]
    solo = llm(tiny_engine).generate([prompt], 16, sampling=cfg)[0].output_ids
    others = tiny_prompts(3, seed=7, hi=30)
    eng = llm(tiny_engine, max_num_tokens=12)
    mixed = eng.generate(others[:2] + [prompt] + others[2:], 16, sampling=cfg)
    assert mixed[2].output_ids == solo
    assert len(set(solo)) > 1


def test_latency_stats(tiny_engine):
    from llama_engine.serving.llm_engine import latency_stats, percentile
    eng = llm(tiny_engine)
    seqs = eng.generate(tiny_prompts(4, seed=8, hi=16), 5)
    st = latency_stats(seqs)
    assert st["num_requests"] == 4 and st["output_tokens"] == 20
    assert 0 < st["ttft_p50_s"] <= st["ttft_p99_s"] <= st["elapsed_s"]
    assert st["tpot_p50_s"] > 0 and st["tokens_per_s"] > 0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_graph_buckets():
    from llama_engine.cuda_graphs import graph_buckets
    assert graph_buckets(1) == [1]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
