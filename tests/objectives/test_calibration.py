"""Calibration / evaluation token sets: counts, determinism, cache, user formats, errors, shipped data disjoint."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tracemalloc

import numpy as np
import pytest

from dynsearch.errors import CalibrationError
from dynsearch.objectives import calibration as C
from dynsearch.objectives.calibration import check_disjoint, load_calibration, load_evaluation
from dynsearch.objectives.tokenizer import Tokenizer


class CountingTokenizer:
    """The demo tokenizer, counting encode calls (to see cache hits)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, *a, **k):
        self.calls += 1
        return self.tok.encode(*a, **k)


@pytest.fixture(scope="module")
def tok(demo_model):
    return Tokenizer.from_gguf(demo_model)


def test_counts_shape_and_first_document(tok, tmp_path):
    cs = load_calibration(tok, n_tokens=5000, seq_len=256, seed=3, cache_dir=tmp_path)
    assert cs.tokens.shape == (19, 256) and cs.tokens.dtype == np.int32  # 5000 // 256 rows
    assert cs.n_tokens == 19 * 256 and 0 <= cs.tokens.min() and cs.tokens.max() < tok.n_vocab
    # the stream starts with the first shuffled document, chat-templated and tokenized
    docs = C.read_documents(C.SHIPPED["calibration"])
    first = docs[np.random.default_rng(3).permutation(len(docs))[0]]
    ids = tok.encode(C.render(first, tok))
    n = min(len(ids), cs.n_tokens)
    assert cs.tokens.ravel()[:n].tolist() == ids[:n]
    assert "shipped calibration" in cs.description and "19x256" in cs.description


def test_shipped_sets_meet_size_targets(tok, tmp_path, caplog):
    cs = load_calibration(tok, n_tokens=300_000, seq_len=1000, cache_dir=tmp_path)
    ev = load_evaluation(tok, n_tokens=50_000, seq_len=1000, cache_dir=tmp_path)
    assert cs.tokens.shape == (300, 1000) and ev.tokens.shape == (50, 1000)
    assert "instead of" not in caplog.text  # no truncation warning
    im_start = tok.encode("<|im_start|>", add_special=False)
    assert len(im_start) == 1 and (cs.tokens == im_start[0]).sum() > 100  # chat-templated conversations


def test_deterministic_and_seeded(tok, tmp_path):
    a = load_calibration(tok, n_tokens=2048, seq_len=128, seed=0, cache_dir=tmp_path / "a")
    b = load_calibration(tok, n_tokens=2048, seq_len=128, seed=0, cache_dir=tmp_path / "b")
    c = load_calibration(tok, n_tokens=2048, seq_len=128, seed=1, cache_dir=tmp_path / "a")
    assert a.content_hash == b.content_hash and np.array_equal(a.tokens, b.tokens)
    assert c.content_hash != a.content_hash


def test_cache_hit_and_corrupt_recovery(tok, tmp_path):
    t = CountingTokenizer(tok)
    first = load_calibration(t, n_tokens=2048, seq_len=128, cache_dir=tmp_path)
    assert t.calls > 0
    t.calls = 0
    again = load_calibration(t, n_tokens=2048, seq_len=128, cache_dir=tmp_path)
    assert t.calls == 0 and np.array_equal(again.tokens, first.tokens) and again.documents == first.documents
    (npy,) = (tmp_path / "tokens").glob("calibration-*.npy")
    # flip token values in place (valid .npy, wrong content), then truncate: both recomputed
    arr = np.load(npy)
    arr[0, :5] += 1
    np.save(npy, arr)
    fixed = load_calibration(t, n_tokens=2048, seq_len=128, cache_dir=tmp_path)
    assert t.calls > 0 and np.array_equal(fixed.tokens, first.tokens)
    npy.write_bytes(npy.read_bytes()[:50])
    t.calls = 0
    fixed = load_calibration(t, n_tokens=2048, seq_len=128, cache_dir=tmp_path)
    assert t.calls > 0 and np.array_equal(fixed.tokens, first.tokens)
    assert not list((tmp_path / "tokens").glob("*.tmp"))
    # different settings are a different cache entry
    load_calibration(t, n_tokens=2048, seq_len=256, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokens").glob("calibration-*.npy"))) == 2


def test_user_text_file(tok, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 200
    f = tmp_path / "calib.txt"
    f.write_text(text)
    cs = load_calibration(tok, f, n_tokens=512, seq_len=64, cache_dir=tmp_path)
    want = tok.encode(text)[:512]
    assert cs.tokens.ravel().tolist() == want
    assert str(f) in cs.description
    # changing the file's content changes the cache key
    f.write_text(text.replace("fox", "cat"))
    assert load_calibration(tok, f, n_tokens=512, seq_len=64, cache_dir=tmp_path).content_hash != cs.content_hash


@pytest.mark.parametrize("gz", [False, True])
def test_user_jsonl_messages_and_text(tok, tmp_path, gz):
    chat = {"messages": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."}]}
    lines = [json.dumps(chat), "", json.dumps({"text": "Plain prose line. " * 40})] * 20
    data = ("\n".join(lines) + "\n").encode()
    f = tmp_path / ("c.jsonl.gz" if gz else "c.jsonl")
    f.write_bytes(gzip.compress(data) if gz else data)
    cs = load_calibration(tok, f, n_tokens=1024, seq_len=128, seed=0, cache_dir=tmp_path)
    flat = cs.tokens.ravel().tolist()
    rendered = tok.encode(tok.apply_chat_template(chat["messages"]))
    assert any(flat[i:i + len(rendered)] == rendered for i in range(len(flat) - len(rendered)))
    assert tok.eos_id in flat  # plain-text documents end with EOS


def test_too_few_tokens(tok, tmp_path, caplog):
    f = tmp_path / "small.txt"
    f.write_text("word " * 300)
    cs = load_calibration(tok, f, n_tokens=10_000, seq_len=100, cache_dir=tmp_path)
    assert cs.tokens.shape[0] == 3 and "instead of" in caplog.text
    with pytest.raises(CalibrationError, match="fewer than one sequence"):
        load_calibration(tok, f, n_tokens=10_000, seq_len=5000, cache_dir=tmp_path)


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    (b"", "empty"),
    (b"   \n\n", "empty"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n', r"bad\.jsonl:2: not valid JSON"),
    (b'{"foo": 1}\n', r"bad\.jsonl:1: expected"),
    (b'{"messages": []}\n', r"bad\.jsonl:1: expected"),
    (b'{"messages": [{"role": "user"}]}\n', r"message 0 needs"),
    (b'{"text": "  "}\n', 'empty "text"'),
    (b'[1, 2]\n', r"bad\.jsonl:1: expected"),
    (b'\xff\xfe{"text": 1}\n', "not UTF-8"),
])
def test_malformed_files(tok, tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(CalibrationError, match=match) as e:
        load_calibration(tok, f, n_tokens=256, seq_len=64, cache_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_bad_gzip(tok, tmp_path):
    f = tmp_path / "c.jsonl.gz"
    f.write_bytes(b"not gzip at all")
    with pytest.raises(CalibrationError, match="gzip"):
        load_calibration(tok, f, n_tokens=256, seq_len=64, cache_dir=tmp_path)


# issue 14 items 7 and 8: unbounded reads and hostile JSONL (each was GBs of RSS or a traceback)
HOSTILE_JSONL = [
    (b'{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n", r"bad\.jsonl:1: not usable JSON \(nested too deeply\)$"),
    (b'{"text": "ok"}\n{"text": ' + b"9" * 5000 + b"}\n",
     r"bad\.jsonl:2: not usable JSON \(Exceeds the limit \(4300 digits\) for integer string conversion"),
    (b'{"text": "ok \\ud800 there"}\n', r"bad\.jsonl:1: a string holds a lone surrogate \('\\ud800'\), not text$"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}\n', r"bad\.jsonl:1: a string holds a lone surrogate"),
]


@pytest.mark.parametrize("content,match", HOSTILE_JSONL, ids=["deep-nesting", "5000-digits", "lone-surrogate",
                                                              "surrogate-in-message"])
def test_hostile_jsonl_lines(tok, tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(CalibrationError, match=match) as e:
        load_calibration(tok, f, n_tokens=256, seq_len=64, cache_dir=tmp_path)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(f))


def test_2gb_text_file_is_refused_unread(tok, tmp_path):
    f = tmp_path / "big.txt"
    with open(f, "wb") as out:  # sparse: 2 GB long, nothing on disk
        out.truncate(2 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(CalibrationError, match=r"big\.txt: it holds more than 256 MiB of text, the limit") as e:
            load_calibration(tok, f, n_tokens=256, seq_len=64, cache_dir=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(e.value) and peak < 16 << 20


def test_gzip_bomb_is_refused_streaming(tok, tmp_path, monkeypatch):
    """A gzip file that inflates past the limit is read only up to it (the limit lowered to 4 MiB
    here, the bomb 256 MiB of zeros in 256 KB)."""
    monkeypatch.setattr(C, "MAX_SOURCE_BYTES", 4 << 20)
    f = tmp_path / "bomb.jsonl.gz"
    zeros = bytes(1 << 20)
    with gzip.open(f, "wb", compresslevel=1) as out:
        for _ in range(256):
            out.write(zeros)
    assert f.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CalibrationError, match=r"bomb\.jsonl\.gz: decompressed, it holds more than 4 MiB of text"):
            load_calibration(tok, f, n_tokens=256, seq_len=64, cache_dir=tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


def test_device_is_refused(tok, tmp_path):
    """/dev/zero as a calibration file: not a regular file, a one-line error (was a MemoryError)."""
    with pytest.raises(CalibrationError, match="calibration file not found: /dev/zero"):
        load_calibration(tok, "/dev/zero", n_tokens=256, seq_len=64, cache_dir=tmp_path)


def test_shipped_sets_disjoint():
    cal = C.read_documents(C.SHIPPED["calibration"])
    ev = C.read_documents(C.SHIPPED["evaluation"])
    report = check_disjoint([C.document_text(d) for d in cal], [C.document_text(d) for d in ev])
    assert report.n_eval_docs == len(ev) > 1000 and report.disjoint, report.summary()
    ids = lambda p: {json.loads(l)["id"] for l in gzip.open(p)}  # noqa: E731
    assert not ids(C.SHIPPED["calibration"]) & ids(C.SHIPPED["evaluation"])
    kinds = {json.loads(l)["kind"] for l in gzip.open(C.SHIPPED["calibration"])}
    assert kinds == {"conversation", "prose", "code", "qa"}


def test_check_disjoint_detects_overlap():
    cal = ["the cat sat on the mat and looked out of the window at the birds in the garden today"]
    near = cal[0].replace("today", "yesterday")
    report = check_disjoint(cal, [cal[0].upper(), near, "something else entirely, short"])
    assert report.overlapping_mask == (True, True, False) and report.n_exact == 1 and not report.disjoint


def test_mc_items_and_mmlu():
    items = C.load_mc_items()
    assert len(items) > 500
    for it in items:
        assert it["question"] and len(it["choices"]) >= 2 and 0 <= it["answer"] < len(it["choices"])
    test_files = sorted((C.mmlu_dir() / "test").glob("*_test.csv.gz"))
    assert len(test_files) == 57 and len(list((C.mmlu_dir() / "dev").glob("*_dev.csv.gz"))) == 57
    rows = list(csv.reader(io.StringIO(gzip.decompress(test_files[0].read_bytes()).decode())))
    assert rows and all(len(r) == 6 and r[5] in "ABCD" for r in rows)
