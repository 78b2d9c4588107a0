"""Tokenizer loading that gives the ids a LLaMA model was trained with.

One ``Tokenizer`` class over two back ends:

* **SentencePiece** itself (Kudo & Richardson, 2018) for LLaMA's ``tokenizer.model``. This is
  the reference: Meta's LLaMA code calls ``SentencePieceProcessor.encode`` and prepends BOS.
  A folder holding only ``tokenizer.model`` is always read this way, because ``AutoTokenizer``
  on such a folder is not reliable across transformers releases (5.17 turns "Born" into
  ``[29933, 1398]`` instead of ``[19298]``; without ``protobuf`` it fails outright).
* **Hugging Face** tokenizers (``AutoTokenizer``) for folders with ``tokenizer.json`` /
  ``tokenizer_config.json`` and for ``.gguf`` files (llama.cpp's format, which embeds the
  vocabulary). When such a folder also holds a ``tokenizer.model``, the HF tokenizer is
  cross-checked against SentencePiece on a probe text and SentencePiece wins on a mismatch.

BOS policy: ``encode(text, add_bos=True)`` prepends BOS when the tokenizer declares that it adds
one (LLaMA: always; ``tokenizer_config.json``'s ``add_bos_token``; GGUF's
``tokenizer.ggml.add_bos_token``; otherwise what the HF tokenizer is seen to do). Text is
always encoded without special tokens and BOS is added here, so a release that silently drops
BOS cannot change our ids.

``save_tokenizer`` copies the tokenizer files into an engine directory (``build.py``), so
``load_tokenizer(engine_dir)`` works later by the same rules.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Optional, Sequence, Union

from llama_engine.config import ConfigError

# Files that make up a tokenizer (and its generation defaults) in a HF / Meta folder.
TOKENIZER_FILES = (
    "tokenizer.model",          # SentencePiece (LLaMA 1/2, Mistral)
    "tokenizer.json",           # HF fast tokenizer
    "tokenizer_config.json",    # HF: class, add_bos_token, chat template (older layout)
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",      # HF >= 4.43 saves the chat template beside the config
    "chat_template.json",
    "generation_config.json",   # eos ids used to stop generation
    "vocab.json",               # GPT-2 style BPE without tokenizer.json
    "merges.txt",
)
_HF_MARKERS = ("tokenizer.json", "tokenizer_config.json")

# Text used to check a HF tokenizer against SentencePiece: spaces, digits, punctuation,
# a contraction, newlines and non-ASCII characters, where tokenizers tend to disagree.
_PROBE_TEXT = ("Born in north-east France, Soyer trained as a chef.\n\n  It's 2024: "
               "naïve café — 3.14 % ü 東京!")


def _rust_decoder(hf: Any) -> Any:
    """The ``tokenizers.Tokenizer`` a HF fast tokenizer decodes with, when its ``decode`` is
    transformers' own (which, without clean-up, is that object's ``decode``): the server
    decodes twice per streamed token, and transformers' wrapper costs three times the call.
    None when ``hf`` is anything else, so such a tokenizer keeps its own ``decode``."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(hf)
    if not isinstance(hf, TokenizersBackend) or \
            cls.decode is not PreTrainedTokenizerBase.decode or \
            cls._decode is not TokenizersBackend._decode:
        return None
    return getattr(hf, "_tokenizer", None)


class Tokenizer:
    """Text <-> ids with LLaMA's conventions. Build it with ``load_tokenizer``."""

    def __init__(self, *, sp: Any = None, hf: Any = None, kind: str, source: str,
                 add_bos_token: bool, bos_id: Optional[int], eos_id: Optional[int],
                 pad_id: Optional[int], end_ids: Sequence[int] = ()) -> None:
        if sp is None and hf is None:
            raise ValueError("Tokenizer needs a SentencePiece or a HF back end")
        self.sp = sp            # sentencepiece.SentencePieceProcessor or None
        self.hf = hf            # transformers tokenizer or None (may hold only a chat template)
        self.kind = kind        # "sentencepiece" | "hf" | "gguf"
        self.source = source    # the file or folder it was read from
        self.add_bos_token = bool(add_bos_token and bos_id is not None)
        self.bos_id = bos_id
        self.eos_id = eos_id
        # No pad token (LLaMA's SentencePiece has pad_id -1): pad with EOS, as TensorRT-LLM does.
        self.pad_id = pad_id if pad_id is not None else eos_id
        # The one stopping rule of every path (static, inflight, the TensorRT-LLM runner): the
        # ids HF's generate stops at for this model, the tokenizer's eos first, then
        # generation_config.json's eos ids. SamplingConfig.end_id (--end_id) replaces them
        # (SamplingConfig.end_ids), stop words end a request as well (sampling.cut_at_stop).
        ends = [i for i in ([eos_id] + list(end_ids)) if i is not None]
        self.end_ids = list(dict.fromkeys(ends))
        self._rust = _rust_decoder(hf) if sp is None else None

    # -- basic ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        if self.sp is not None:
            return int(self.sp.get_piece_size())
        return len(self.hf)  # includes added tokens, unlike hf.vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_bos`` and the tokenizer uses BOS."""
        ids = self._encode_text(text)
        if add_bos and self.add_bos_token:
            ids = [self.bos_id] + ids
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if self.sp is not None:
            return list(self.sp.encode(text))
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self.sp is not None:
            # SentencePiece drops control symbols (BOS/EOS) itself.
            return self.sp.decode(ids)
        if self._rust is not None:  # the same call transformers makes, minus its Python
            return self._rust.decode(ids, skip_special_tokens=skip_special_tokens)
        # Said explicitly: the clean-up step (spaces before punctuation removed) is for
        # WordPiece; LLaMA's tokenizers keep text as is, and transformers warns when unset.
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    # -- chat ----------------------------------------------------------------------------
    @property
    def chat_template(self) -> Optional[str]:
        return getattr(self.hf, "chat_template", None) if self.hf is not None else None

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> Optional[str]:
        """The prompt text for ``messages``; None when the tokenizer has no chat template."""
        if not self.has_chat_template:
            return None
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the chat prompt, tokenized as HF's ``apply_chat_template(tokenize=True)`` does:
        the template writes any BOS itself, so none is added here."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        if text is None:
            raise ConfigError(f"tokenizer {self.source} has no chat template")
        if self.sp is not None:
            # SentencePiece would spell a literal "<s>" as text: turn it back into BOS.
            bos_text = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
            if bos_text and text.startswith(bos_text):
                return [self.bos_id] + self._encode_text(text[len(bos_text):])
            return self._encode_text(text)
        return list(self.hf.encode(text, add_special_tokens=False))

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, source={self.source!r}, vocab={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, "
                f"add_bos={self.add_bos_token}, chat_template={self.has_chat_template})")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Load from an engine dir, a HF dir, a folder with only ``tokenizer.model``, a
    ``tokenizer.model`` file or a ``.gguf`` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"tokenizer path {path} does not exist")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return _load_gguf(path)
        name = os.path.basename(path)
        if name == "tokenizer.json" or name == "tokenizer_config.json":
            return load_tokenizer(os.path.dirname(path) or ".")
        if name.endswith(".model"):
            return _load_sentencepiece(path, _read_json(os.path.join(os.path.dirname(path),
                                                                     "tokenizer_config.json")))
        raise ConfigError(f"{path}: not a tokenizer (expected a folder, tokenizer.model or .gguf)")

    files = set(os.listdir(path))
    spm_path = os.path.join(path, "tokenizer.model")
    has_spm = "tokenizer.model" in files
    if any(m in files for m in _HF_MARKERS):
        return _load_hf_dir(path, spm_path if has_spm else None)
    if has_spm:
        return _load_sentencepiece(spm_path, {})
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return _load_gguf(os.path.join(path, ggufs[0]))
    raise ConfigError(f"no tokenizer in {path} (looked for tokenizer.model, tokenizer.json, "
                      "tokenizer_config.json or one .gguf); pass --tokenizer_dir")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    return d if isinstance(d, dict) else {}


def _generation_end_ids(folder: str) -> list[int]:
    """Extra stop ids from generation_config.json (LLaMA-3 lists several)."""
    eos = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list):
        return [int(i) for i in eos if isinstance(i, int)]
    return []


def _sp_processor(model_file: str):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(model_file)
    except (OSError, RuntimeError) as e:
        hint = ""
        with open(model_file, "rb") as f:
            head = f.read(64).split(b"\n")[0].split(b" ")
        if len(head) == 2 and head[1].isdigit():
            # "<base64 token> <rank>" lines: LLaMA-3's tiktoken file, not SentencePiece.
            hint = "; it looks like LLaMA-3's tiktoken file: use the HF tokenizer folder"
        raise ConfigError(f"{model_file}: not a SentencePiece model "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}){hint}"
                          ) from None
    return sp


def _load_sentencepiece(model_file: str, tok_config: dict, hf: Any = None) -> Tokenizer:
    sp = _sp_processor(model_file)

    def _id(i: int) -> Optional[int]:
        return i if i >= 0 else None

    folder = os.path.dirname(model_file) or "."
    return Tokenizer(sp=sp, hf=hf, kind="sentencepiece", source=model_file,
                     # LLaMA prepends BOS unless a tokenizer_config says otherwise.
                     add_bos_token=bool(tok_config.get("add_bos_token", True)),
                     bos_id=_id(sp.bos_id()), eos_id=_id(sp.eos_id()), pad_id=_id(sp.pad_id()),
                     end_ids=_generation_end_ids(folder))


def _hf_adds_bos(hf: Any) -> bool:
    """Whether the HF tokenizer puts BOS first when asked for special tokens."""
    bos = hf.bos_token_id
    if bos is None:
        return False
    ids = hf.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def _load_hf_dir(folder: str, spm_path: Optional[str]) -> Tokenizer:
    tok_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder, clean_up_tokenization_spaces=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        if spm_path:
            _warn(f"AutoTokenizer cannot read {folder} ({type(e).__name__}); "
                  "using SentencePiece on tokenizer.model")
            return _load_sentencepiece(spm_path, tok_config)
        raise ConfigError(f"{folder}: AutoTokenizer cannot load it "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                          ) from None

    # A declared add_bos_token wins over what this transformers release happens to do.
    if "add_bos_token" in tok_config:
        add_bos = bool(tok_config["add_bos_token"])
        if add_bos and not _hf_adds_bos(hf) and hf.bos_token_id is not None:
            _warn(f"{folder}: tokenizer declares add_bos_token but transformers does not add "
                  "BOS; adding it ourselves")
    else:
        add_bos = _hf_adds_bos(hf)

    if spm_path:
        sp = _sp_processor(spm_path)
        hf_ids = list(hf.encode(_PROBE_TEXT, add_special_tokens=False))
        sp_ids = list(sp.encode(_PROBE_TEXT))
        if hf_ids != sp_ids:
            _warn(f"{folder}: AutoTokenizer disagrees with tokenizer.model on a probe text; "
                  "using SentencePiece")
            # Keep the HF object for its chat template only.
            return _load_sentencepiece(spm_path, {"add_bos_token": add_bos}, hf=hf)

    return Tokenizer(hf=hf, kind="hf", source=folder, add_bos_token=add_bos,
                     bos_id=hf.bos_token_id, eos_id=hf.eos_token_id, pad_id=hf.pad_token_id,
                     end_ids=_generation_end_ids(folder))


def _gguf_metadata(gguf_file: str) -> dict:
    """The tokenizer.ggml.* scalar fields of a GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_file)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{gguf_file}: not a readable GGUF file ({e})") from None
    meta = {}
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token"):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            meta[key] = field.contents()
    return meta


def _load_gguf(gguf_file: str) -> Tokenizer:
    from transformers import AutoTokenizer

    meta = _gguf_metadata(gguf_file)
    folder, name = os.path.split(os.path.abspath(gguf_file))
    try:
        hf = AutoTokenizer.from_pretrained(folder, gguf_file=name,
                                           clean_up_tokenization_spaces=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{gguf_file}: transformers cannot read its tokenizer "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                          ) from None
    # transformers 5.17's GGUF converter sets eos_token to tokens[bos_token_id]; the file's own
    # metadata is the truth. Fix the HF object too, so save_pretrained writes the right ids.
    vocab = hf.convert_ids_to_tokens
    if meta.get("eos_token_id") is not None:
        hf.eos_token = vocab(int(meta["eos_token_id"]))
    if meta.get("bos_token_id") is not None:
        hf.bos_token = vocab(int(meta["bos_token_id"]))
    if meta.get("padding_token_id") is not None and hf.pad_token_id is None:
        hf.pad_token = vocab(int(meta["padding_token_id"]))
    add_bos = bool(meta["add_bos_token"]) if "add_bos_token" in meta else _hf_adds_bos(hf)
    return Tokenizer(hf=hf, kind="gguf", source=gguf_file, add_bos_token=add_bos,
                     bos_id=hf.bos_token_id, eos_id=hf.eos_token_id, pad_id=hf.pad_token_id)


# ---------------------------------------------------------------------------------------------
# Saving (build.py copies the tokenizer into the engine dir)
# ---------------------------------------------------------------------------------------------
def find_tokenizer_source(path: Union[str, os.PathLike, None]) -> Optional[str]:
    """The tokenizer beside a checkpoint: the folder itself (or the folder of a file) when it
    holds tokenizer files, or a ``.gguf`` file; None when there is none."""
    if path is None:
        return None
    path = os.fspath(path)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return path
        path = os.path.dirname(path) or "."
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                   for f in ("tokenizer.model",) + _HF_MARKERS):
        return path
    return None


def save_tokenizer(tok_or_path: Union[Tokenizer, str, os.PathLike], engine_dir: str) -> list[str]:
    """Put the tokenizer into ``engine_dir``; returns the file names written.

    Folders are copied file by file (TOKENIZER_FILES that exist); a GGUF tokenizer, which has
    no files of its own, is written with ``save_pretrained`` (tokenizer.json and config).
    """
    os.makedirs(engine_dir, exist_ok=True)
    if isinstance(tok_or_path, Tokenizer):
        tok = tok_or_path
        if tok.kind == "gguf":
            before = set(os.listdir(engine_dir))
            tok.hf.save_pretrained(engine_dir)
            return sorted(set(os.listdir(engine_dir)) - before) or ["tokenizer.json"]
        src = tok.source if os.path.isdir(tok.source) else os.path.dirname(tok.source)
    else:
        src = os.fspath(tok_or_path)
        if os.path.isfile(src) and src.endswith(".gguf"):
            return save_tokenizer(load_tokenizer(src), engine_dir)
        if os.path.isfile(src):
            src = os.path.dirname(src) or "."
    written = []
    for name in TOKENIZER_FILES:
        s = os.path.join(src, name)
        if os.path.isfile(s):
            _check_link_stays_inside(s, src)
            d = os.path.join(engine_dir, name)
            if os.path.abspath(s) != os.path.abspath(d):
                shutil.copyfile(s, d)  # a link's target, as a plain file
            written.append(name)
    if not written:
        raise ConfigError(f"no tokenizer files in {src}")
    return written


def _check_link_stays_inside(path: str, src: str) -> None:
    """A tokenizer file that is a symbolic link is copied as the file it names only when that
    file lies inside the source folder; a link out of it (to /etc/passwd, a key) is refused."""
    if not os.path.islink(path):
        return
    target, root = os.path.realpath(path), os.path.realpath(src)
    if not target.startswith(root.rstrip(os.sep) + os.sep):
        raise ConfigError(f"tokenizer file {path} is a symbolic link to {target}, outside "
                          f"{src}; refusing to copy it (copy the file itself into {src})")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)
