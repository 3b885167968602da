"""The model's tokenizer, rebuilt from GGUF metadata (or a ``tokenizer.json``), token for token as llama.cpp.

Two parts, as in llama.cpp's ``llama_vocab::tokenize``:

1. Special-token partition (:func:`split_special`): every control / user-defined / unknown token is
   cut out of the text, longest token first, over the whole text (``tokenizer_st_partition``).
2. Each remaining text fragment goes through a HF ``tokenizers.Tokenizer`` built from the vocabulary:
   gpt2-style byte-level BPE with the pre-tokenizer regexes llama.cpp uses for
   ``tokenizer.ggml.pre`` (``llm_tokenizer_bpe`` in ``src/llama-vocab.cpp``), or SentencePiece-style
   BPE (``tokenizer.ggml.model == "llama"``) whose merges are derived from the token scores.

:meth:`Tokenizer.apply_chat_template` renders ``tokenizer.chat_template`` with a sandboxed jinja2
environment, with the variables HF passes (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``) and ``raise_exception``.

Known gaps: per-model lstrip/rstrip token attributes llama.cpp sets by model name (phi-3,
jina, modern-bert) are not applied; codepoints without Unicode category are grouped by the regex
where llama.cpp's hand-written splitter keeps them single.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers

from dynsearch.errors import DynsearchError, ModelError
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.hf_source import read_json

log = logging.getLogger(__name__)

# llama.cpp token types (gguf TokenType / llama_token_type).
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_TYPES = (TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED)

# Token texts llama.cpp promotes to control type whatever the file says (EOG and FIM names).
CONTROL_LOOKING = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
    "<end_of_utterance>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>",
    "<|fim_repo|>", "<|file_sep|>", "<fim-prefix>", "<fim-suffix>", "<fim-middle>", "<fim-pad>",
    "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<PRE>", "<SUF>", "<MID>",
})

# ----------------------------------------------------------------------------- pre-tokenizer regexes
# Copied from llm_tokenizer_bpe's regex_exprs; each list is applied in turn, every match isolated.
_GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
_LLAMA3 = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
           "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2 = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
          "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN35 = ("(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+"
           "|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_GPT4O = ("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+"
          "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
          "|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*"
          "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
          "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_TEKKEN = ("[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+"
           "|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*"
           "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before BPE for one ``tokenizer.ggml.pre`` family."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole word found in the vocab is one token, merges skipped
    add_bos: bool = False        # llama.cpp's default before tokenizer.ggml.add_bos_token overrides


_DEFAULT = PreTokenizer(("[\\p{P}\\$\\+<=>\\^~\\|]+", _GPT2, "\\p{N}+", "[0-9][0-9][0-9]"))
_PRE_FAMILIES: dict[tuple[str, ...], PreTokenizer] = {
    ("default",): _DEFAULT,
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano"): PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    ("dbrx", "smaug-bpe"): PreTokenizer((_LLAMA3,)),
    ("chatglm-bpe",): PreTokenizer((_LLAMA3,)),
    ("glm4", "glm5"): PreTokenizer((_LLAMA3,), ignore_merges=True),
    ("falcon",): PreTokenizer(("[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2, "[0-9][0-9][0-9]")),
    ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"):
        PreTokenizer(("\\p{N}", _GPT2)),
    ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
     "mellum", "modern-bert", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4",
     "jina-v1-en", "jina-v2-code", "roberta-bpe"): PreTokenizer((_GPT2,)),
    ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"): PreTokenizer((_QWEN2,)),
    ("qwen35",): PreTokenizer((_QWEN35,)),
    ("gpt-4o", "llama4", "kanana2", "talkie"): PreTokenizer((_GPT4O,)),
    ("tekken",): PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    ("deepseek-coder",): PreTokenizer(("[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}")),
    ("deepseek-v3",): PreTokenizer((
        "\\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
        "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")),
}
PRE_TOKENIZERS: dict[str, PreTokenizer] = {n: p for names, p in _PRE_FAMILIES.items() for n in names}


def pre_tokenizer_for(pre: str | None) -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for a ``tokenizer.ggml.pre`` value (missing -> default)."""
    if not pre:
        log.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
        return _DEFAULT
    try:
        return PRE_TOKENIZERS[pre]
    except KeyError:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} (known: {', '.join(sorted(PRE_TOKENIZERS))})") from None


# ------------------------------------------------------------------------------------------ metadata


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The ``general.*`` and ``tokenizer.*`` key/values of a GGUF file, as plain Python values.

    The one place the GGUF is read for the tokenizer, through the validating header reader.
    """
    header = GGUFHeader(path)
    return {key: f.value for key, f in header.fields.items() if key.startswith(("tokenizer.", "general."))}


@dataclass(frozen=True, eq=False)
class Vocab:
    """The tokenizer description in a GGUF's ``tokenizer.ggml.*`` keys."""

    model: str                      # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    token_types: list[int]
    merges: list[str] = field(default_factory=list)        # "a b" pairs, rank order (gpt2)
    scores: list[float] = field(default_factory=list)      # piece scores (llama / spm)
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool | None = None     # None: llama.cpp's default for the model / pre type
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "Vocab":
        model = meta.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in meta:
            raise ValueError("GGUF has no tokenizer (tokenizer.ggml.model / tokens missing)")
        tokens = list(meta["tokenizer.ggml.tokens"])
        for key in meta:  # every special token id llama.cpp reads (unknown, padding, eot, fim_*, ...)
            if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
                _token_id(meta, key, len(tokens))
        types = list(meta.get("tokenizer.ggml.token_type") or [TT_NORMAL] * len(tokens))
        return cls(
            model=model, tokens=tokens, token_types=[int(t) for t in types],
            merges=list(meta.get("tokenizer.ggml.merges") or []),
            scores=[float(s) for s in meta.get("tokenizer.ggml.scores") or []],
            pre=meta.get("tokenizer.ggml.pre"),
            bos_id=_token_id(meta, "tokenizer.ggml.bos_token_id", len(tokens)),
            eos_id=_token_id(meta, "tokenizer.ggml.eos_token_id", len(tokens)),
            add_bos=_opt_bool(meta.get("tokenizer.ggml.add_bos_token")),
            add_eos=_opt_bool(meta.get("tokenizer.ggml.add_eos_token")),
            add_space_prefix=_opt_bool(meta.get("tokenizer.ggml.add_space_prefix")),
            chat_template=meta.get("tokenizer.chat_template"),
        )


def _token_id(meta: dict[str, Any], key: str, n_tokens: int) -> int | None:
    """A special token's id, which must name one of the ``n_tokens`` tokens (absent: None)."""
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_tokens:
        raise ModelError(f"{key} = {str(v)[:40]} is not a token id (the vocabulary has {n_tokens} tokens)")
    return v


def _opt_bool(v: Any) -> bool | None:
    return None if v is None else bool(v)


# ---------------------------------------------------------------------------- special-token partition


def split_special(text: str, specials: Sequence[tuple[str, int]]) -> list[str | int]:
    """Cut special tokens out of ``text`` the way llama.cpp's ``tokenizer_st_partition`` does.

    ``specials`` is (token text, id), longest first. Each token in turn is found in every remaining
    text fragment, left to right. Returns text fragments (str) and token ids (int) in order.
    """
    parts: list[str | int] = [text] if text else []
    for tok, tid in specials:
        if tok not in text:  # cheap filter over the whole text
            continue
        out: list[str | int] = []
        for part in parts:
            if isinstance(part, int) or tok not in part:
                out.append(part)
                continue
            pieces = part.split(tok)
            for i, piece in enumerate(pieces):
                if i:
                    out.append(tid)
                if piece:
                    out.append(piece)
        parts = out
    return parts


# ---------------------------------------------------------------------------------------- backends


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _bpe_backend(vocab: Vocab, pre: PreTokenizer):
    """Byte-level BPE over the llama.cpp regex splits (no added tokens: those are split out before)."""
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    token_to_id = {t: i for i, t in enumerate(vocab.tokens)}
    bpe = models.BPE(vocab=token_to_id, merges=merges, ignore_merges=pre.ignore_merges)
    tok = tokenizers.Tokenizer(bpe)
    regexes = [r + "|\\s+" if r == _GPT2 else r for r in pre.regexes]  # llama.cpp's splitter ends on \s+
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_backend(vocab: Vocab):
    """SentencePiece-style BPE: merges ranked by the score of the merged piece, bytes as <0xXX>."""
    token_to_id = {t: i for i, t in enumerate(vocab.tokens)}
    scores = vocab.scores or [0.0] * len(vocab.tokens)
    ranked = []
    for t, i in token_to_id.items():
        if vocab.token_types[i] != TT_NORMAL or len(t) < 2:
            continue
        for k in range(1, len(t)):
            if t[:k] in token_to_id and t[k:] in token_to_id:
                ranked.append((-scores[i], i, k, t))
    ranked.sort()
    merges = [(t[:k], t[k:]) for _, _, k, t in ranked]
    unk = next((t for t, i in token_to_id.items() if vocab.token_types[i] == TT_UNKNOWN), None)
    bpe = models.BPE(vocab=token_to_id, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    tok = tokenizers.Tokenizer(bpe)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


# --------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A llama.cpp-compatible tokenizer: ``encode``, ``decode``, ``apply_chat_template``."""

    template_name = "chat template"  # where the chat template comes from, in its errors

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.n_vocab = len(vocab.tokens)
        types = list(vocab.token_types)
        for i, t in enumerate(vocab.tokens):
            if t in CONTROL_LOOKING and types[i] not in SPECIAL_TYPES:
                types[i] = TT_CONTROL
        self._types = types
        specials = [(t, i) for i, t in enumerate(vocab.tokens) if types[i] in SPECIAL_TYPES and t]
        specials.sort(key=lambda p: -len(p[0].encode("utf-8")))  # stable: ties by id
        self.specials: list[tuple[str, int]] = specials
        if vocab.model == "gpt2":
            pre = pre_tokenizer_for(vocab.pre)
            self.backend = _bpe_backend(vocab, pre)
            self.add_bos = pre.add_bos if vocab.add_bos is None else vocab.add_bos
            self.add_space_prefix = False
        elif vocab.model == "llama":
            self.backend = _spm_backend(vocab)
            self.add_bos = True if vocab.add_bos is None else vocab.add_bos
            self.add_space_prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {vocab.model!r} (supported: gpt2, llama)")
        self.add_eos = bool(vocab.add_eos)
        self.bos_id, self.eos_id = vocab.bos_id, vocab.eos_id
        if self.add_bos and self.bos_id is None:
            raise ValueError("tokenizer adds BOS but has no tokenizer.ggml.bos_token_id")

    # -- construction
    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        meta = read_gguf_metadata(path)  # a malformed file is a GGUFError already
        try:
            tok = cls(Vocab.from_metadata(meta))
        except DynsearchError as e:
            raise ModelError(f"{path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - odd metadata; the tokenizers library raises bare Exception
            raise ModelError(f"{path}: unusable tokenizer metadata ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
        tok.template_name = f"{path}: tokenizer.chat_template"
        return tok

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "HFTokenizer":
        return HFTokenizer(path)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer | HFTokenizer":
        """From a ``.gguf`` file, a ``tokenizer.json`` file, or a HF folder holding one."""
        p = Path(path)
        if p.is_dir() or p.name.endswith(".json"):
            return HFTokenizer(p)
        return cls.from_gguf(p)

    # -- encoding
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids as ``llama_tokenize(text, add_special, parse_special)`` returns them."""
        specials = self.specials if parse_special else [s for s in self.specials if self._types[s[1]] == TT_USER_DEFINED]
        parts = split_special(text, specials)
        texts = [p for p in parts if isinstance(p, str)]
        if self.vocab.model == "llama":
            texts = self._spm_texts(parts)
        encoded = iter(self.backend.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        for p in parts:
            out.extend([p] if isinstance(p, int) else next(encoded).ids)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def encode_batch(self, texts: Iterable[str], add_special: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special) for t in texts]

    def _spm_texts(self, parts: list[str | int]) -> list[str]:
        """Text fragments as llama.cpp's SPM path feeds them: a space after a special token / at the start, spaces escaped."""
        texts, prev_special = [], True
        for p in parts:
            if isinstance(p, int):
                prev_special = True
                continue
            s = (" " + p) if (self.add_space_prefix and prev_special) else p
            texts.append(s.replace(" ", "▁"))
            prev_special = False
        return texts

    # -- decoding
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens rendered (llama.cpp ``detokenize(special=True)``, roughly)."""
        out, run = [], []
        for i in ids:
            if self._types[i] in (TT_CONTROL, TT_USER_DEFINED, TT_UNKNOWN) and self.vocab.model == "gpt2":
                if run:
                    out.append(self.backend.decode(run, skip_special_tokens=False))
                    run = []
                out.append(self.vocab.tokens[i])
            else:
                run.append(int(i))
        if run:
            out.append(self.backend.decode(run, skip_special_tokens=False))
        return "".join(out)

    # -- chat
    @property
    def chat_template(self) -> str | None:
        return self.vocab.chat_template

    def token_text(self, tid: int | None) -> str:
        return "" if tid is None else self.vocab.tokens[tid]

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """Render ``messages`` with the model's chat template (see :func:`render_chat_template`)."""
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    bos_token=self.token_text(self.bos_id), eos_token=self.token_text(self.eos_id),
                                    name=self.template_name, **kwargs)

    # -- identity
    @cached_property
    def fingerprint(self) -> str:
        """sha256 of everything that decides the token ids (vocab, merges, scores, flags, template)."""
        h = hashlib.sha256()
        v = self.vocab
        head = [v.model, v.pre, self.bos_id, self.eos_id, self.add_bos, self.add_eos, self.add_space_prefix, v.chat_template]
        for part in (head, v.tokens, v.token_types, v.merges, v.scores):
            h.update(json.dumps(part, ensure_ascii=False).encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()


class HFTokenizer(Tokenizer):
    """A tokenizer from a HF ``tokenizer.json`` (+ ``tokenizer_config.json`` for template and BOS/EOS).

    Special tokens are the file's added tokens, cut out llama.cpp's way; the rest is the HF pipeline.
    """

    def __init__(self, path: str | Path):  # noqa: D107 - overrides the GGUF constructor
        p = Path(path)
        folder, file = (p, p / "tokenizer.json") if p.is_dir() else (p.parent, p)
        if not file.is_file():
            raise ValueError(f"no tokenizer.json at {file}")
        self.backend = tokenizers.Tokenizer.from_file(str(file))
        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json(cfg_path) if cfg_path.is_file() else {}
        vocab = self.backend.get_vocab(with_added_tokens=True)
        tokens = [""] * (max(vocab.values()) + 1)
        for t, i in vocab.items():
            tokens[i] = t
        added = self.backend.get_added_tokens_decoder()
        types = [TT_NORMAL] * len(tokens)
        for i, at in added.items():
            types[i] = TT_CONTROL if at.special else TT_USER_DEFINED
        bos, eos = _cfg_token(cfg.get("bos_token")), _cfg_token(cfg.get("eos_token"))
        template = cfg.get("chat_template")
        self.template_name = f"{cfg_path}: chat_template"
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.vocab = Vocab(model="hf", tokens=tokens, token_types=types, chat_template=template,
                           bos_id=vocab.get(bos) if bos else None, eos_id=vocab.get(eos) if eos else None)
        self.vocab_file_sha = hashlib.sha256(file.read_bytes()).hexdigest()
        self.n_vocab = len(tokens)
        self._types = types
        self.specials = sorted(((t, i) for i, t in enumerate(tokens) if types[i] != TT_NORMAL and t),
                               key=lambda p: -len(p[0].encode("utf-8")))
        self.bos_id, self.eos_id = self.vocab.bos_id, self.vocab.eos_id
        self.add_bos = bool(cfg.get("add_bos_token", False)) and self.bos_id is not None
        self.add_eos = bool(cfg.get("add_eos_token", False)) and self.eos_id is not None
        self.add_space_prefix = False

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.vocab_file_sha.encode())
        h.update(json.dumps([self.add_bos, self.add_eos, self.bos_id, self.eos_id, self.chat_template]).encode())
        return h.hexdigest()


def _cfg_token(v: Any) -> str | None:
    """A token in tokenizer_config.json: a string or an AddedToken dict."""
    return v.get("content") if isinstance(v, dict) else v


# ------------------------------------------------------------------------------------- chat template

TEMPLATE_OUTPUT_CHARS = 64 << 20  # a rendered chat, and any string, list or number a template builds
TEMPLATE_SECONDS = 10.0  # wall time of one render


class _TemplateLimit(Exception):
    """A template went past TEMPLATE_OUTPUT_CHARS or TEMPLATE_SECONDS."""


def render_chat_template(template: str | None, messages: Sequence[dict], add_generation_prompt: bool = False,
                         bos_token: str = "", eos_token: str = "", name: str = "chat template", **kwargs) -> str:
    """Render a HF-style jinja2 chat template in a sandbox (templates are untrusted model metadata):
    jinja2's immutable sandbox, results of ``*``, ``**``, ``%`` and of every call bounded, the output
    bounded by TEMPLATE_OUTPUT_CHARS and the render by TEMPLATE_SECONDS. Any failure is one
    ModelError line naming the template (``name``).

    Without a template, messages are rendered as a plain transcript ("role: content" paragraphs).
    """
    if not template:
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
        return text + ("\n\nassistant:" if add_generation_prompt else "")
    try:
        compiled = _compile_template(template)
        parts, size, start = [], 0, time.monotonic()
        with _deadline(TEMPLATE_SECONDS):
            for chunk in compiled.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                           bos_token=bos_token, eos_token=eos_token, **kwargs):
                size += len(chunk)
                if size > TEMPLATE_OUTPUT_CHARS:
                    raise _TemplateLimit(f"output longer than {TEMPLATE_OUTPUT_CHARS} characters")
                if time.monotonic() - start > TEMPLATE_SECONDS:
                    raise _TemplateLimit(f"rendering took longer than {TEMPLATE_SECONDS:g} s")
                parts.append(chunk)
        return "".join(parts)
    except (_TemplateLimit, TemplateError) as e:
        raise ModelError(f"{name}: {_one_line(e)}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, MemoryError,
            RecursionError) as e:  # what a template's own expressions can raise
        raise ModelError(f"{name}: {type(e).__name__}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise _TemplateLimit in the block after ``seconds`` of this process's CPU time (a loop that
    writes nothing is stopped too). A virtual timer, so an alarm of the caller's is left alone;
    only the main thread receives signals, and a virtual timer already running is not replaced:
    there, the checks between output chunks are the only limit."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_VIRTUAL)[0]:
        yield
        return

    def expire(signum, frame):
        raise _TemplateLimit(f"rendering took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def _too_big(x: Any) -> bool:
    """A value a template must not build or pass on: a long string or sequence, a huge number."""
    if isinstance(x, (str, bytes, list, tuple, dict)):
        return len(x) > TEMPLATE_OUTPUT_CHARS
    if isinstance(x, int):
        return x.bit_length() > 64 * 8  # beyond any width, count or index a chat template needs
    if isinstance(x, float):
        return abs(x) > TEMPLATE_OUTPUT_CHARS
    return False


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, where an operator or call that would build something huge
    (``'x' * 4000000000``, ``10 ** 10 ** 9``, ``'%9999999999d' % 1``, ``'x'.ljust(10 ** 10)``)
    is refused before it runs."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
            left, right = right, left
        if operator == "*" and isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
            if left * len(right) > TEMPLATE_OUTPUT_CHARS:
                raise SecurityError(f"a repetition of {left} x {len(right)} is too long")
        elif operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
            if abs(left) > 1 and right * max(1.0, math.log2(abs(left))) > 4096:
                raise SecurityError(f"{left!r} ** {right!r} is too large")
        elif operator == "%" and isinstance(left, str) and any(c.isdigit() for c in left):
            if any(_too_big(int(w)) or int(w) > TEMPLATE_OUTPUT_CHARS for w in re.findall(r"\d+", left)):
                raise SecurityError("a format width is too large")
        result = super().call_binop(context, operator, left, right)
        if _too_big(result):
            raise SecurityError("a value built by the template is too large")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        for a in (*args, *kwargs.values()):
            if _too_big(a) or (isinstance(a, (int, float)) and abs(a) > TEMPLATE_OUTPUT_CHARS):
                raise SecurityError(f"an argument of {str(a)[:20]} is too large")
        result = super().call(__context, __obj, *args, **kwargs)
        if _too_big(result):
            raise SecurityError("a value built by the template is too large")
        return result


def _bounded_filter(f):
    """A jinja2 filter whose numeric arguments (widths, counts) are bounded like calls'."""
    @functools.wraps(f)
    def bounded(*args, **kwargs):
        for a in (*args[1:], *kwargs.values()):
            if isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) > TEMPLATE_OUTPUT_CHARS:
                raise SecurityError(f"a filter argument of {str(a)[:20]} is too large")
        result = f(*args, **kwargs)
        if _too_big(result):
            raise SecurityError("a value built by the template is too large")
        return result
    return bounded


@lru_cache(maxsize=8)
def _compile_template(template: str):
    """The jinja2 template compiled in the bounded sandbox with HF's helpers."""
    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.filters = {k: _bounded_filter(f) for k, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
