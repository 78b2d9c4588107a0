"""The one incremental detokenizer (``text_stream.IncrementalText``) and run.py's
``--streaming`` printer on it: streamed text ends exactly where the final output ends, with
stop words (token ids, the engines' one stopping rule) held back until they cannot be one and
never shown once complete; log-prob offsets released with their text. A byte tokenizer makes
multi-byte characters span tokens; run.py on SmolLM2 checks it end to end."""
from __future__ import annotations

import io
import re

from llama_engine.sampling import cut_at_stop
from llama_engine.text_stream import IncrementalText, TextStream


class ByteTok:
    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def ids_of(text):
    return list(text.encode())


def test_printer_holds_back_stop_words_and_never_shows_them():
    text = "café, then: STOP and more"
    stops = [ids_of("STOP"), ids_of(": X")]        # ": X" starts like ": S" then fails
    want_ids, stopped = cut_at_stop(ids_of(text), [], stops)
    assert stopped
    buf = io.StringIO()
    s = TextStream(ByteTok(), [[0]], end_ids=[], file=buf, stop_words=stops)
    seen = []
    for step, t in enumerate(ids_of(text)):
        s.step(step, [t])
        seen.append(buf.getvalue())
        assert "S" not in buf.getvalue() and "\ufffd" not in buf.getvalue()
    s.close()
    assert buf.getvalue() == bytes(want_ids).decode() + "\n" == "café, then: \n"
    # ": " was held while it could still become ": X", then shown once "S" broke it
    at = len(ids_of("café, then:"))
    assert seen[at - 1].endswith("then") and seen[at + 1].endswith("then: ")


def test_printer_flushes_a_held_prefix_at_the_end_and_stops_at_end_ids():
    for tokens, stops, want in ((ids_of("abc ST"), [ids_of("STOP")], "abc ST"),
                                (ids_of("ab") + [0] + ids_of("cd"), [], "ab")):
        buf = io.StringIO()
        s = TextStream(ByteTok(), [[0], [1]], end_ids=[0], file=buf, stop_words=stops)
        for step, t in enumerate(tokens):
            s.step(step, [t, 65])
        s.close()
        first = "".join(re.findall(r"^\[Text 0\] (.*)$", buf.getvalue(), re.M))
        assert first == want


def test_incremental_text_offsets_release_with_their_text():
    text = "aé b"
    s = IncrementalText(ByteTok(), stop=[" b"], offsets=True)
    out = s.push(ids_of(text)[:3])          # "a", then the two bytes of "é"
    assert out == "a" and s.offsets == [0, 1, 1] and s.released() == 1
    out += s.push(ids_of(text)[3:])
    assert out == "aé" and s.stopped and s.released() == 3   # " b" cut: its bytes held


def test_run_streaming_ends_where_the_output_ends(smol_engine, capsys):
    import run
    base = ["--engine_dir", str(smol_engine), "--max_output_len", "12", "--input_text",
            "Once upon a time", "--streaming"]
    assert run.main(base) == 0
    final = capsys.readouterr().out.split('Output: "', 1)[1].split('"\n', 1)[0]
    word = final.split()[len(final.split()) // 2]              # a word from the middle
    for extra in ([], ["--use_inflight_batching"]):
        assert run.main(base + ["--stop_words", " " + word] + extra) == 0
        out = capsys.readouterr().out
        streamed, rest = out.split("\nInput: ", 1)
        cut = rest.split('Output: "', 1)[1].split('"\n', 1)[0]
        assert streamed == cut and len(cut) < len(final), (extra, streamed, cut)


def test_token_text_of_a_tokenizer_without_pieces():
    """The HTTP benchmark's id tokenizer (random weights, no SentencePiece or HF pieces) serves
    log-probs too: each token reads as its decoded text. (The GPU run found build_server
    raising on it: TokenText asked it to encode " a".)"""
    from benchmarks.http_load import IdTokenizer
    from llama_engine.server.logprobs import TokenText

    tt = TokenText(IdTokenizer(100))
    assert not tt.byte_level
    assert tt.text(5) == " 5" and tt.bytes(42) == b" 42"


def test_http_benchmark_dry_run_on_cpu(tmp_path):
    """benchmark.py --serving --http end to end on the CPU (tiny model): the client process
    streams every request through the live server, and the rows name both stacks."""
    import json

    import benchmark
    out = tmp_path / "b.json"
    assert benchmark.main(["--serving", "--http", "--device", "cpu", "--model_config", "tiny",
                           "--num_requests", "8", "--http_parts", "uniform",
                           "--out_json", str(out), "--assets", str(tmp_path)]) == 0
    srv = json.loads(out.read_text())["serving"]
    http = next(v for k, v in srv.items() if k.endswith("_http"))
    direct = next(v for k, v in srv.items() if k.endswith("_direct"))
    assert http["num_requests"] == 8 and http["failed"] == 0 and http["tokens_per_s"] > 0
    assert http["output_tokens"] == direct["output_tokens"]
    assert http["client"].split()[0] in ("aiohttp", "httpx") and http["server"].startswith("uvicorn")


def test_http_process_on_a_busy_port_is_a_one_line_error():
    """serve.py's default layout: the HTTP process cannot bind -> ConfigError (``error: ...``
    from serve.py), and the engine thread started for it is stopped again."""
    import socket
    import threading

    import pytest
    pytest.importorskip("uvicorn",
                        reason="serve.py's dependencies: pip install -r requirements.txt")
    import weight
    from benchmarks.http_load import IdTokenizer
    from llama_engine import checkpoint as ckpt
    from llama_engine.config import (PRESETS, BuildConfig, ConfigError, EngineConfig, ModelArgs,
                                     QuantConfig)
    from llama_engine.runner import Engine
    from llama_engine.server import start_http_process
    from llama_engine.serving import LLMEngine
    args = ModelArgs(**PRESETS["tiny"])
    build = BuildConfig(max_batch_size=2, max_input_len=16, max_output_len=8,
                        tokens_per_block=4, use_inflight_batching=True, paged_kv_cache=True)
    eng = Engine.from_tensors(EngineConfig(model=args, quant=QuantConfig(), build=build,
                                           dtype="float32"),
                              ckpt.hf_to_unified(weight.random_weights(args, "float32"), args),
                              "cpu")
    llm = LLMEngine(eng, max_kv_cache_tokens=64)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        with pytest.raises(ConfigError, match="could not start: OSError"):
            start_http_process(llm, (IdTokenizer, (args.vocab_size,)), "t",
                               port=busy.getsockname()[1])
    finally:
        busy.close()
    assert not any(t.name == "engine-loop" and t.is_alive() for t in threading.enumerate())
