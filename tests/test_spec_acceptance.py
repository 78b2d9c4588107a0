"""tools/spec_acceptance.py's simulation: the verify steps it computes from one plain greedy
run (prompt lookup) or one teacher-forced draft forward (a draft model) equal the steps the
real speculative loop takes, on tiny random float64 engines."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from llama_engine.speculative import SpeculativeConfig

REPO = Path(__file__).resolve().parent.parent
MAX_IN, MAX_OUT = 48, 24


def _tool():
    spec = importlib.util.spec_from_file_location("spec_acceptance",
                                                  REPO / "tools" / "spec_acceptance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny(seed=0):
    import weight
    from llama_engine import checkpoint as ckpt
    from llama_engine.config import BuildConfig, EngineConfig, ModelArgs, PRESETS, QuantConfig
    from llama_engine.runner import Engine
    args = ModelArgs(**PRESETS["tiny"])
    sd = weight.random_weights(args, "float64", seed=seed)
    sd = {k: (v * 4 if v.dim() == 2 else v) for k, v in sd.items()}
    build = BuildConfig(max_batch_size=1, max_input_len=MAX_IN, max_output_len=MAX_OUT,
                        tokens_per_block=4)
    cfg = EngineConfig(model=args, quant=QuantConfig(), build=build, dtype="float64")
    torch.set_num_threads(1)
    return Engine.from_tensors(cfg, ckpt.hf_to_unified(sd, args), "cpu")


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.mark.parametrize("agree, k, steps", [
    ([None, True, True, False, True, True, True, False], 2, 3),
    ([None, True, True, False, True, True, True, False], 8, 2),  # the last: kmax caps it
    ([None] + [False] * 9, 4, 9),           # never right: one token per step
    ([None] + [True] * 9, 8, 1),            # always right, k covers it: one step
    ([None] + [True] * 9, 2, 3),            # always right: k + 1 tokens per step
    ([None], 4, 0),                         # the prefill's token only
])
def test_simulate_draft_on_hand_made_runs(tool, agree, k, steps):
    assert tool.simulate_draft(agree, k) == steps


def test_simulate_prompt_lookup_on_a_hand_made_sequence(tool):
    # prompt 1 2 3 4 5; output 1 2 3 9 ...: after "1" lookup proposes 2 3 4 (2 3 right)
    prompt, output = [1, 2, 3, 4, 5], [1, 2, 3, 9, 8]
    assert tool.simulate_prompt_lookup(prompt, output, 3) == 2   # +3 (2 3 9), +1 (8)


@pytest.mark.parametrize("draft_seed", [0, 1], ids=["same-weights", "other-weights"])
def test_simulation_equals_the_real_loop(tool, draft_seed):
    target, draft = _tiny(), _tiny(seed=draft_seed)
    rng = random.Random(3)
    for _ in range(3):
        prompt = [rng.randrange(3, 40) for _ in range(rng.randint(8, MAX_IN - 4))]
        out = target.generate([prompt], MAX_OUT - 6).output_ids[0]
        agree = tool.draft_agreement(draft, prompt, out)
        if draft_seed == 0:
            assert all(agree[1:])
        for k in (2, 4):
            r = target.generate([prompt], MAX_OUT - 6, speculative=SpeculativeConfig(
                "draft_tokens_external", k, draft))
            assert r.output_ids[0] == out
            assert r.num_steps == tool.simulate_draft(agree, k)
            r = target.generate([prompt], MAX_OUT - 6,
                                speculative=SpeculativeConfig(max_draft_len=k))
            assert r.num_steps == tool.simulate_prompt_lookup(prompt, out, k)
