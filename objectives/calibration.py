"""Calibration and evaluation token sets: documents -> chat template -> token ids -> (n_seq, seq_len).

Sources: the data shipped in ``objectives/data`` (default; see its README for origins and licenses)
or a user file:

- ``.txt`` (any non-JSON suffix): UTF-8 text, one document, tokenized as is (like llama-imatrix);
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, ``{"messages": [{"role", "content"}, ...]}``
  (rendered with the model's chat template) or ``{"text": "..."}`` (tokenized as is).

Documents are shuffled with ``seed``, tokenized one by one (BOS where the model adds one; an EOS
after plain-text documents as a boundary) and concatenated until ``n_tokens`` are reached, then cut
into rows of ``seq_len``. The token array is cached under ``$DYNSEARCH_CACHE/tokens`` (default
``~/.cache/dynsearch``) keyed by the hash of the source bytes, the tokenizer and the settings;
written atomically, checked against its sha256 on read, recomputed when missing or corrupt.

:func:`check_disjoint` measures calibration/evaluation overlap (exact documents and word 13-grams).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dynsearch.atomic import atomic_write_bytes
from dynsearch.errors import CalibrationError

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
SHIPPED = {"calibration": DATA_DIR / "calib.jsonl.gz", "evaluation": DATA_DIR / "eval.jsonl.gz"}
CACHE_VERSION = 1  # bump when the way token arrays are built changes
MAX_SOURCE_BYTES = 256 << 20  # text of one calibration / evaluation file (decompressed)


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """Token ids ready for a model, with where they came from."""

    tokens: np.ndarray             # (n_seq, seq_len) int32
    description: str               # one line: source, shape, documents, seed
    content_hash: str              # sha256 of the token array (shape + bytes)
    source_hash: str               # sha256 of the source file's bytes
    documents: tuple[str, ...]     # template-free text of the documents the tokens came from (overlap checks)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


# --------------------------------------------------------------------------------------- documents


def document_text(record: dict) -> str:
    """Plain content of a document record (chat turns as "role: content" paragraphs), template-free."""
    if "messages" in record:
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    return record["text"]


def read_documents(path: str | Path) -> list[dict]:
    """Document records of a source file (``{"messages": [...]}`` or ``{"text": ...}``)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file not found: {p}")
    raw = _read_bounded(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise CalibrationError(f"calibration file is empty: {p}")
    if ".jsonl" not in p.suffixes and ".json" not in p.suffixes:
        return [{"text": text}]
    docs = [_parse_line(p, i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    return docs


def _read_bounded(p: Path) -> bytes:
    """The file's bytes (a ``.gz`` file's decompressed), read up to MAX_SOURCE_BYTES: a larger
    file, a device or a gzip bomb is a one-line error, never gigabytes of memory."""
    gz = p.suffix == ".gz"
    try:
        size = p.stat().st_size
        raw = b""
        if gz or size <= MAX_SOURCE_BYTES:  # a larger plain file is refused unread
            with (gzip.open(p, "rb") if gz else open(p, "rb")) as f:
                raw = f.read(MAX_SOURCE_BYTES + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CalibrationError(f"{p}: not a valid gzip file ({e})") from None
    except OSError as e:
        raise CalibrationError(f"{p}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_SOURCE_BYTES or size > MAX_SOURCE_BYTES and not gz:
        what = "decompressed, it holds" if gz else "it holds"
        raise CalibrationError(f"{p}: {what} more than {MAX_SOURCE_BYTES >> 20} MiB of text, the limit "
                               "for a calibration or evaluation source (a few MB make millions of tokens)")
    return raw


def _file_hash(p: Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise CalibrationError(f"{where}: not usable JSON (nested too deeply)") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise CalibrationError(f"{where}: not usable JSON ({str(e).splitlines()[0][:80]})") from None
    if isinstance(rec, dict) and isinstance(rec.get("text"), str) and "messages" not in rec:
        if not rec["text"].strip():
            raise CalibrationError(f"{where}: empty \"text\"")
        return {"text": _unicode(where, rec["text"])}
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise CalibrationError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} or {{"text": ...}}')
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CalibrationError(f"{where}: message {j} needs string \"role\" and \"content\"")
    return {"messages": [{"role": _unicode(where, m["role"]), "content": _unicode(where, m["content"])} for m in msgs]}


def _unicode(where: str, s: str) -> str:
    """``s``, unless JSON's ``\\uXXXX`` escapes made it a lone surrogate (not text a tokenizer takes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CalibrationError(f"{where}: a string holds a lone surrogate ({s[e.start]!r}), not text") from None
    return s


def render(record: dict, tokenizer) -> str:
    """The text the model sees: chat records through the model's template, plain text as is."""
    if "messages" in record:
        return tokenizer.apply_chat_template(record["messages"])
    return record["text"]


# -------------------------------------------------------------------------------------------- load


def load_calibration(tokenizer, source: str | Path | None = None, n_tokens: int = 262_144, seq_len: int = 512,
                     seed: int = 0, cache_dir: str | Path | None = None) -> CalibrationSet:
    """Calibration tokens (``n_tokens`` rounded down to whole rows of ``seq_len``) from ``source``.

    ``source``: None for the shipped calibration set, else a .txt or .jsonl file (see module doc).
    """
    return _load("calibration", tokenizer, source, n_tokens, seq_len, seed, cache_dir)


def load_evaluation(tokenizer, source: str | Path | None = None, n_tokens: int = 65_536, seq_len: int = 512,
                    seed: int = 0, cache_dir: str | Path | None = None) -> CalibrationSet:
    """Evaluation tokens, disjoint from the shipped calibration set; same rules as :func:`load_calibration`."""
    return _load("evaluation", tokenizer, source, n_tokens, seq_len, seed, cache_dir)


def load_mc_items(path: str | Path | None = None) -> list[dict]:
    """Shipped multiple-choice items ``{"id", "source", "question", "choices", "answer"}`` (eval split)."""
    p = Path(path) if path else DATA_DIR / "eval_mc.jsonl.gz"
    return [json.loads(line) for line in gzip.decompress(p.read_bytes()).decode("utf-8").splitlines() if line]


def mmlu_dir() -> Path:
    """Shipped MMLU in hendrycks layout: ``dev/<subject>_dev.csv.gz``, ``test/<subject>_test.csv.gz``."""
    return DATA_DIR / "mmlu"


def _load(kind: str, tokenizer, source, n_tokens: int, seq_len: int, seed: int, cache_dir) -> CalibrationSet:
    if seq_len < 1 or n_tokens < seq_len:
        raise CalibrationError(f"need n_tokens >= seq_len >= 1, got n_tokens={n_tokens} seq_len={seq_len}")
    path = Path(source) if source is not None else SHIPPED[kind]
    docs = read_documents(path)  # also raises the one-line errors for missing / large / malformed files
    source_hash = _file_hash(path)
    order = np.random.default_rng(seed).permutation(len(docs))
    rendered = [render(docs[i], tokenizer) for i in order]
    plain = [("text" in docs[i]) for i in order]
    key = _cache_key(kind, source_hash, tokenizer.fingerprint, n_tokens, seq_len, seed)
    name = "shipped " + kind if source is None else str(path)
    cache = _cache_path(cache_dir, kind, key)
    hit = _read_cache(cache, key)
    if hit is None:
        tokens, n_docs = _tokenize(tokenizer, rendered, plain, n_tokens, seq_len, name)
        _write_cache(cache, key, tokens, n_docs)
    else:
        tokens, n_docs = hit
        log.info("%s tokens from cache %s", kind, cache)
    desc = f"{name}: {tokens.shape[0]}x{tokens.shape[1]} tokens from {n_docs} of {len(docs)} documents (seed {seed})"
    used = tuple(document_text(docs[i]) for i in order[:n_docs])
    return CalibrationSet(tokens, desc, _array_hash(tokens), source_hash, used)


def _doc_tokens(tokenizer, text: str, plain: bool) -> list[int]:
    ids = tokenizer.encode(text, add_special=True)
    if plain and tokenizer.eos_id is not None and not tokenizer.add_eos:
        ids.append(tokenizer.eos_id)
    return ids


def _tokenize(tokenizer, rendered: Sequence[str], plain: Sequence[bool], n_tokens: int, seq_len: int,
              name: str) -> tuple[np.ndarray, int]:
    """(n_seq, seq_len) int32 tokens from the documents in order, and how many documents were used."""
    want = (n_tokens // seq_len) * seq_len
    stream: list[int] = []
    n_docs = 0
    for text, is_plain in zip(rendered, plain):
        stream.extend(_doc_tokens(tokenizer, text, is_plain))
        n_docs += 1
        if len(stream) >= want:
            break
    n_seq = min(want, len(stream)) // seq_len
    if n_seq == 0:
        raise CalibrationError(f"{name}: only {len(stream)} tokens, fewer than one sequence of {seq_len}")
    if n_seq * seq_len < want:
        log.warning("%s has %d tokens: using %d sequences of %d instead of %d tokens", name, len(stream), n_seq, seq_len, want)
    return np.asarray(stream[: n_seq * seq_len], dtype=np.int32).reshape(n_seq, seq_len), n_docs


# ------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("DYNSEARCH_CACHE") or Path.home() / ".cache" / "dynsearch")


def _cache_key(kind: str, source_hash: str, tok_fp: str, n_tokens: int, seq_len: int, seed: int) -> str:
    spec = json.dumps([CACHE_VERSION, kind, source_hash, tok_fp, n_tokens, seq_len, seed])
    return hashlib.sha256(spec.encode()).hexdigest()


def _cache_path(cache_dir, kind: str, key: str) -> Path:
    return Path(cache_dir or default_cache_dir()) / "tokens" / f"{kind}-{key[:32]}.npy"


def _array_hash(a: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps([list(a.shape), str(a.dtype)]).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _read_cache(path: Path, key: str) -> tuple[np.ndarray, int] | None:
    meta_path = path.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if meta.get("key") != key or meta.get("sha256") != _array_hash(arr) or arr.dtype != np.int32 or arr.ndim != 2:
        log.warning("cache entry %s is corrupt or stale; recomputing", path)
        return None
    return arr, int(meta.get("n_docs", 0))


def _write_cache(path: Path, key: str, arr: np.ndarray, n_docs: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
        atomic_write_bytes(path.with_suffix(".json"), json.dumps({"key": key, "sha256": _array_hash(arr), "n_docs": n_docs}).encode())
    except OSError as e:  # a read-only cache is not fatal
        log.warning("could not write token cache %s: %s", path, e)


# ----------------------------------------------------------------------------------------- overlap


@dataclass(frozen=True)
class OverlapReport:
    """How much of an evaluation set also appears in a calibration set."""

    n_eval_docs: int
    n_exact: int                       # eval documents identical (normalised) to a calibration document
    n_overlapping: int                 # eval documents with >= threshold of their n-grams in calibration (incl. exact)
    ngram_fraction: float              # share of all eval n-grams found in calibration
    overlapping_mask: tuple[bool, ...]

    @property
    def disjoint(self) -> bool:
        return self.n_overlapping == 0

    def summary(self) -> str:
        return (f"{self.n_overlapping} of {self.n_eval_docs} evaluation documents overlap calibration "
                f"({self.n_exact} exact); {100 * self.ngram_fraction:.2f}% of evaluation 13-grams occur in calibration")


def _words(text: str) -> list[str]:
    return text.lower().split()


def _ngrams(words: list[str], n: int) -> set[int]:
    if len(words) < n:
        return {hash(" ".join(words))} if words else set()
    return {hash(" ".join(words[i:i + n])) for i in range(len(words) - n + 1)}


def check_disjoint(calib: CalibrationSet | Iterable[str], evaluation: CalibrationSet | Iterable[str],
                   n: int = 13, threshold: float = 0.5) -> OverlapReport:
    """Exact-document and word n-gram overlap of ``evaluation`` documents with ``calib`` documents."""
    cal_docs = calib.documents if isinstance(calib, CalibrationSet) else list(calib)
    ev_docs = evaluation.documents if isinstance(evaluation, CalibrationSet) else list(evaluation)
    cal_exact = {" ".join(_words(d)) for d in cal_docs}
    cal_grams: set[int] = set()
    for d in cal_docs:
        cal_grams |= _ngrams(_words(d), n)
    mask, n_exact, hit, total = [], 0, 0, 0
    for d in ev_docs:
        words = _words(d)
        exact = " ".join(words) in cal_exact
        grams = _ngrams(words, n)
        common = len(grams & cal_grams)
        hit, total = hit + common, total + len(grams)
        n_exact += exact
        mask.append(exact or (bool(grams) and common / len(grams) >= threshold))
    return OverlapReport(len(ev_docs), n_exact, sum(mask), hit / total if total else 0.0, tuple(mask))
