"""Tests of weight.py: every checkpoint format loads to the same HF-named state dict.

Tiny random Hugging Face ``LlamaForCausalLM`` models (GQA and MHA, tied and untied) are saved
as safetensors (single and sharded) and ``.bin`` (single and sharded), and re-written as Meta
checkpoints with two tensor-parallel shards (interleaved RoPE, LLaMA-2 and LLaMA-3 embedding
sharding); each must load back to tensors equal to the model's own. CPU only, a few seconds.
"""
import glob
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import weight  # noqa: E402
from llama_engine.config import ConfigError, ModelArgs  # noqa: E402

transformers = pytest.importorskip("transformers")

# intermediate_size 192 = Meta's rule for dim 64 with multiple_of 32, so that the same model
# can be written as a Meta checkpoint whose params.json derives the same FFN width.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_theta=10000.0)
VARIANTS = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
}


def make_hf_model(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**TINY, **VARIANTS[variant])
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Norm gains are ones at init; make them distinct so that mix-ups would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def reference_sd(model) -> dict:
    sd = {k: v.detach() for k, v in model.state_dict().items() if "inv_freq" not in k}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def assert_sd_equal(got: dict, want: dict):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k].to(v.dtype), v), k


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_model(request):
    return make_hf_model(request.param)


# ---------------------------------------------------------------------------------------------
# Hugging Face directories
# ---------------------------------------------------------------------------------------------
def write_bin(model, out_dir: str, shards: int = 1):
    """pytorch_model.bin (or sharded with its index), as transformers 4.x wrote them."""
    model.config.save_pretrained(out_dir)
    sd = reference_sd(model)
    if shards == 1:
        torch.save(sd, os.path.join(out_dir, "pytorch_model.bin"))
        return
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(out_dir, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_load_hf_formats(hf_model, tmp_path, fmt):
    d = str(tmp_path)
    if fmt == "safetensors":
        hf_model.save_pretrained(d)
        assert os.path.isfile(os.path.join(d, "model.safetensors"))
    elif fmt == "safetensors-sharded":
        hf_model.save_pretrained(d, max_shard_size="40KB")
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
        assert len(glob.glob(os.path.join(d, "*.safetensors"))) > 1
    else:
        write_bin(hf_model, d, shards=1 if fmt == "bin" else 3)
    args, sd = weight.load_hf(d)
    assert args.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert args.num_key_value_heads == hf_model.config.num_key_value_heads
    assert_sd_equal(sd, reference_sd(hf_model))
    assert sum(t.numel() for t in sd.values()) == args.num_params()


def test_load_hf_dtype_and_source_info(tmp_path):
    model = make_hf_model("gqa-untied")
    model.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    args, sd, info = weight.load_source(model_dir=str(tmp_path), dtype="float16")
    assert all(t.dtype == torch.float16 for t in sd.values())
    assert info == {"kind": "hf", "path": str(tmp_path), "tokenizer_dir": str(tmp_path)}


def test_load_hf_legacy_bin_and_tied_with_lm_head(tmp_path):
    """A pre-zip (torch < 1.6) .bin cannot be mmap'd but still loads; a tied checkpoint that
    stores lm_head anyway loads without it (HF ignores it too)."""
    model = make_hf_model("gqa-tied")
    model.config.save_pretrained(str(tmp_path))
    ref = reference_sd(model)
    stored = dict(ref, **{"lm_head.weight": ref["model.embed_tokens.weight"].clone()})
    torch.save(stored, str(tmp_path / "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    _, sd = weight.load_hf(str(tmp_path))
    assert "lm_head.weight" not in sd
    assert_sd_equal(sd, ref)


def test_load_hf_without_model_prefix(tmp_path):
    from safetensors.torch import save_file
    model = make_hf_model("gqa-untied")
    model.config.save_pretrained(str(tmp_path))
    ref = reference_sd(model)
    # As saved from LlamaModel: no "model." prefix; plus a stale rotary buffer to drop.
    bare = {k.removeprefix("model."): v.contiguous() for k, v in ref.items()}
    bare["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(bare, str(tmp_path / "model.safetensors"))
    _, sd = weight.load_hf(str(tmp_path))
    assert_sd_equal(sd, ref)


def test_load_hf_ambiguous_prefix(tmp_path):
    from safetensors.torch import save_file
    model = make_hf_model("gqa-untied")
    model.config.save_pretrained(str(tmp_path))
    ref = {k: v.contiguous() for k, v in reference_sd(model).items()}
    ref["norm.weight"] = ref["model.norm.weight"].clone()
    save_file(ref, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.norm.weight.*ambiguous"):
        weight.load_hf(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Meta checkpoints
# ---------------------------------------------------------------------------------------------
def write_meta(model, out_dir: str, shards: int = 2, llama3_embedding: bool = False,
               vocab_in_params: bool = True, rope_freqs: bool = True):
    """Write ``model`` as Meta's ``consolidated.NN.pth`` shards, split as Meta's
    model-parallel layers split them (ColumnParallel: dim 0; RowParallel: dim 1)."""
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_heads
    ref = reference_sd(model)
    meta = {"tok_embeddings.weight": ref["model.embed_tokens.weight"],
            "norm.weight": ref["model.norm.weight"],
            "output.weight": ref.get("lm_head.weight", ref["model.embed_tokens.weight"])}
    if rope_freqs:  # LLaMA-1 checkpoints carry this buffer
        meta["rope.freqs"] = torch.ones(head_dim // 2)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        meta.update({
            f"layers.{i}.attention.wq.weight": weight.permute_rope_half_to_interleaved(
                ref[p + "self_attn.q_proj.weight"], n_heads, head_dim),
            f"layers.{i}.attention.wk.weight": weight.permute_rope_half_to_interleaved(
                ref[p + "self_attn.k_proj.weight"], n_kv, head_dim),
            f"layers.{i}.attention.wv.weight": ref[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": ref[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": ref[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": ref[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": ref[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": ref[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": ref[p + "post_attention_layernorm.weight"],
        })

    def split_dim(key):
        if key.endswith(("norm.weight", "rope.freqs")):
            return None
        if key.endswith(("wo.weight", "w2.weight")):
            return 1
        if key == "tok_embeddings.weight":
            return 0 if llama3_embedding else 1
        return 0

    for r in range(shards):
        shard = {}
        for k, v in meta.items():
            dim = split_dim(k)
            shard[k] = v.clone() if dim is None else v.chunk(shards, dim=dim)[r].clone()
        torch.save(shard, os.path.join(out_dir, f"consolidated.{r:02d}.pth"))
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": n_heads,
              "multiple_of": 32, "norm_eps": cfg.rms_norm_eps, "max_seq_len": 128,
              "vocab_size": cfg.vocab_size if vocab_in_params else -1}
    if n_kv != n_heads:
        params["n_kv_heads"] = n_kv
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(params, f)


@pytest.mark.parametrize("variant", ["gqa-untied", "mha-untied"])
@pytest.mark.parametrize("llama3_embedding", [False, True], ids=["emb-dim1", "emb-dim0"])
def test_load_meta_two_shards(tmp_path, variant, llama3_embedding):
    model = make_hf_model(variant)
    write_meta(model, str(tmp_path), shards=2, llama3_embedding=llama3_embedding)
    args, sd = weight.load_meta(str(tmp_path))
    assert (args.vocab_size, args.hidden_size, args.intermediate_size) == (128, 64, 192)
    assert args.num_key_value_heads == model.config.num_key_value_heads
    assert_sd_equal(sd, reference_sd(model))


def test_load_meta_vocab_from_embedding(tmp_path):
    model = make_hf_model("gqa-untied")
    write_meta(model, str(tmp_path), vocab_in_params=False)
    args, sd, info = weight.load_source(meta_ckpt_dir=str(tmp_path))
    assert args.vocab_size == 128 and info["kind"] == "meta" and info["tokenizer_dir"] is None
    assert_sd_equal(sd, reference_sd(model))


def train_sentencepiece(path_prefix: str, vocab_size: int) -> str:
    spm = pytest.importorskip("sentencepiece")
    words = [f"w{a}{b}" for a in "abcdefghij" for b in "klmnopqrst"]
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=path_prefix,
                                   vocab_size=vocab_size, model_type="bpe",
                                   minloglevel=2)
    return path_prefix + ".model"


def test_load_meta_vocab_from_tokenizer(tmp_path):
    model = make_hf_model("gqa-untied")
    ckpt = tmp_path / "7B"
    ckpt.mkdir()
    write_meta(model, str(ckpt), vocab_in_params=False)
    # LLaMA-1 layout: tokenizer.model beside the size folders, one level up.
    os.rename(train_sentencepiece(str(tmp_path / "sp"), 128), tmp_path / "tokenizer.model")
    args, sd, info = weight.load_source(meta_ckpt_dir=str(ckpt))
    assert args.vocab_size == 128 and info["tokenizer_dir"] == str(tmp_path)
    # A tokenizer that disagrees with the embedding is the checkpoint disagreeing with its
    # config (and shows the tokenizer, not the shape, was asked).
    os.rename(train_sentencepiece(str(tmp_path / "sp2"), 100), tmp_path / "tokenizer.model")
    with pytest.raises(ConfigError, match=r"model.embed_tokens.weight has shape \[128, 64\], "
                                          r"expected \[100, 64\]"):
        weight.load_meta(str(ckpt))


def test_rope_permutation_is_the_layout_change():
    """Meta's interleaved RoPE on Meta rows == HF's rotate-half RoPE on permuted rows: the
    attention scores q.k agree exactly (up to float rounding)."""
    torch.manual_seed(0)
    n_heads, head_dim, dim, T = 2, 8, 16, 5
    wq, wk = torch.randn(n_heads * head_dim, dim), torch.randn(n_heads * head_dim, dim)
    x = torch.randn(T, dim)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))  # [D/2]
    angles = torch.outer(torch.arange(T).float(), freqs)                           # [T, D/2]

    def meta_rope(t):  # t [T, H, D], pairs (2i, 2i+1) as complex numbers
        tc = torch.view_as_complex(t.reshape(T, n_heads, head_dim // 2, 2))
        return torch.view_as_real(tc * torch.polar(torch.ones_like(angles), angles)[:, None])\
            .reshape(T, n_heads, head_dim)

    def hf_rope(t):  # pairs (i, i + D/2)
        cos = torch.cat([angles.cos()] * 2, -1)[:, None]
        sin = torch.cat([angles.sin()] * 2, -1)[:, None]
        half = torch.cat([-t[..., head_dim // 2:], t[..., :head_dim // 2]], -1)
        return t * cos + half * sin

    q_meta = meta_rope((x @ wq.T).view(T, n_heads, head_dim))
    k_meta = meta_rope((x @ wk.T).view(T, n_heads, head_dim))
    wq_hf = weight.permute_rope_interleaved_to_half(wq, n_heads, head_dim)
    wk_hf = weight.permute_rope_interleaved_to_half(wk, n_heads, head_dim)
    q_hf = hf_rope((x @ wq_hf.T).view(T, n_heads, head_dim))
    k_hf = hf_rope((x @ wk_hf.T).view(T, n_heads, head_dim))
    scores_meta = torch.einsum("thd,shd->hts", q_meta, k_meta)
    scores_hf = torch.einsum("thd,shd->hts", q_hf, k_hf)
    torch.testing.assert_close(scores_hf, scores_meta, rtol=1e-5, atol=1e-4)
    # And the inverse really is the inverse.
    assert torch.equal(weight.permute_rope_half_to_interleaved(wq_hf, n_heads, head_dim), wq)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_paths(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as e:
        weight.load_hf(str(tmp_path / "nope"))
    one_line(e)
    with pytest.raises(ConfigError, match="does not exist"):
        weight.load_meta(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="does not exist"):
        weight.load_gguf(str(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError, match="no config.json"):
        weight.load_hf(str(tmp_path))


def test_no_weights_found(tmp_path):
    make_hf_model("gqa-untied").config.save_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="no weights found"):
        weight.load_hf(str(tmp_path))
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises(ConfigError, match="no weights found"):
        weight.load_meta(str(tmp_path))


def test_corrupt_safetensors(tmp_path):
    model = make_hf_model("gqa-untied")
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header" + b"\0" * 64)
    with pytest.raises(ConfigError, match="model.safetensors: cannot read") as e:
        weight.load_hf(str(tmp_path))
    one_line(e)


def test_truncated_safetensors(tmp_path):
    model = make_hf_model("gqa-untied")
    model.save_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ConfigError, match="model.safetensors: cannot read"):
        weight.load_hf(str(tmp_path))


def test_corrupt_and_wrong_pth(tmp_path):
    model = make_hf_model("gqa-untied")
    write_meta(model, str(tmp_path))
    shard = tmp_path / "consolidated.01.pth"
    shard.write_bytes(b"garbage" * 100)
    with pytest.raises(ConfigError, match="consolidated.01.pth: cannot read") as e:
        weight.load_meta(str(tmp_path))
    one_line(e)
    torch.save({"weights": [1, 2, 3]}, str(shard))
    with pytest.raises(ConfigError, match="consolidated.01.pth: not a dict of tensors"):
        weight.load_meta(str(tmp_path))
    torch.save(torch.zeros(3), str(shard))
    with pytest.raises(ConfigError, match="not a dict of tensors"):
        weight.load_meta(str(tmp_path))


def test_missing_tensor(tmp_path):
    from safetensors.torch import save_file
    model = make_hf_model("gqa-untied")
    model.config.save_pretrained(str(tmp_path))
    sd = {k: v.contiguous() for k, v in reference_sd(model).items()
          if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"checkpoint disagrees with its config: missing tensor "
                                          r"model.layers.1.mlp.up_proj.weight \(expected shape "
                                          r"\[192, 64\]\)"):
        weight.load_hf(str(tmp_path))


def test_wrong_shape(tmp_path):
    model = make_hf_model("gqa-untied")
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.gate_proj.weight has shape "
                                          r"\[192, 64\], expected \[256, 64\]") as e:
        weight.load_hf(str(tmp_path))
    one_line(e)


def test_extra_tensor_and_extra_layers(tmp_path):
    model = make_hf_model("gqa-untied")
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unexpected tensor model.layers.1."):
        weight.load_hf(str(tmp_path))


def test_meta_replicated_norm_must_agree(tmp_path):
    model = make_hf_model("gqa-untied")
    write_meta(model, str(tmp_path))
    shard = torch.load(str(tmp_path / "consolidated.01.pth"), weights_only=True)
    shard["norm.weight"] = shard["norm.weight"] + 1
    torch.save(shard, str(tmp_path / "consolidated.01.pth"))
    with pytest.raises(ConfigError, match="replicated tensor norm.weight differs"):
        weight.load_meta(str(tmp_path))


def test_load_source_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        weight.load_source(model_config="nope")
    with pytest.raises(ConfigError, match="no weights given"):
        weight.load_source()
    with pytest.raises(ConfigError, match="only one weight source"):
        weight.load_source(model_dir=str(tmp_path), gguf_file="x.gguf")
    with pytest.raises(ConfigError, match="model_config is only for random"):
        weight.load_source(model_dir=str(tmp_path), model_config="tiny")
    with pytest.raises(ConfigError, match="unknown dtype"):
        weight.load_source(model_config="tiny", dtype="float8")


# ---------------------------------------------------------------------------------------------
# Random weights
# ---------------------------------------------------------------------------------------------
def test_random_weights_tiny():
    args = ModelArgs.from_preset("tiny")
    sd = weight.random_weights(args, torch.float16, seed=0)
    weight.validate_state_dict(args, sd)
    assert all(t.dtype == torch.float16 for t in sd.values())
    assert {k: tuple(v.shape) for k, v in sd.items()} == weight.expected_shapes(args)
    assert sum(t.numel() for t in sd.values()) == args.num_params()
    assert torch.equal(sd["model.norm.weight"], torch.ones(64, dtype=torch.float16))
    std = sd["model.layers.0.mlp.gate_proj.weight"].float().std().item()
    assert 0.018 < std < 0.022
    again = weight.random_weights(args, torch.float16, seed=0)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    other = weight.random_weights(args, torch.float16, seed=1)
    assert not torch.equal(sd["lm_head.weight"], other["lm_head.weight"])


def test_random_weights_forward_is_sane():
    """HF's own LlamaForCausalLM accepts the names and gives finite, moderate logits."""
    args = ModelArgs.from_preset("tiny")
    args_dict = args.to_hf_config()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args_dict)).eval()
    sd = weight.random_weights(args, torch.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    with torch.no_grad():
        logits = model(torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all() and logits.abs().max() < 100


def test_random_weights_source_and_7b_count():
    args, sd, info = weight.load_source(model_config="tiny", dtype="bfloat16")
    assert info == {"kind": "random", "path": "tiny", "tokenizer_dir": None}
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    # LLaMA-7B: the shapes random_weights would generate, counted without materializing them.
    big = ModelArgs.from_preset("llama-7b")
    n = sum(torch.Size(s).numel() for s in weight.expected_shapes(big).values())
    assert n == big.num_params() == 6_738_415_616


# ---------------------------------------------------------------------------------------------
# GGUF (the real SmolLM2-135M-Instruct, Q4_1)
# ---------------------------------------------------------------------------------------------
def find_smollm2_gguf():
    path = os.environ.get("SMOLLM2_GGUF")
    if path and os.path.isfile(path):
        return path
    cache = os.environ.get("SMOLLM2_DIR") or os.path.expanduser("~/.cache/llama_engine/smollm2")
    found = sorted(glob.glob(os.path.join(cache, "*.gguf")))  # where tools/fetch_smollm2.py puts it
    return found[0] if found else None


def test_load_gguf_smollm2():
    path = find_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: set SMOLLM2_GGUF or run tools/fetch_smollm2.py "
                    "(caches it in $SMOLLM2_DIR or ~/.cache/llama_engine/smollm2)")
    pytest.importorskip("gguf", reason="the gguf package is needed to read GGUF files")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
    args, sd, info = weight.load_source(gguf_file=path)
    assert info["kind"] == "gguf" and info["tokenizer_dir"] == os.path.abspath(path)
    assert (args.vocab_size, args.hidden_size, args.num_hidden_layers) == (49152, 576, 30)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (9, 3, 64)
    assert args.tie_word_embeddings and "lm_head.weight" not in sd
    assert args.rope_theta == 100000.0
    weight.validate_state_dict(args, sd)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd.values())
