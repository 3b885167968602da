"""The tokenizer rebuilt from GGUF metadata gives llama.cpp's token ids; chat templates render as llama-cpp-python's."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType as VT

from dynsearch.errors import ModelError
from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_write import write_model
from dynsearch.objectives.tokenizer import TEMPLATE_SECONDS, Tokenizer, render_chat_template, split_special

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?\nAnswer with a number."},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Und auf Deutsch? 🙂"},
]

TEXTS = [
    "Hello world", " leading space", "trailing space ", "multiple   spaces   here", "\t\ttabs\tand\nnewlines\n\n\n",
    "Numbers: 1234567890 3.14159 -42 1e10 0x1F 1,000,000", "café naïve résumé 日本語のテキスト 中文 한국어 Ελληνικά русский",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷", "def f(x):\n    return x**2  # square\n\nfor i in range(10):\n\tprint(i)\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "text<|im_end|>glued<|endoftext|><|im_start|>", "<<|im_start|>|>", "I'm, you're, they've, he'd, she'll, it's, we'RE",
    "   \n  \n ", "", " ", "\n", "a\u00a0b\u2003c\u3000d", "Ünïcödé ÅÄÖ ß ﬁ", "Mr. O'Neil's $100.00 (approx.) -- ~50% off!!! ???",
    "https://example.com/path?q=1&x=y#frag", "1 2 3  4   5    6", "２０２４年", "x" * 300, "ab" * 200 + " " + "123" * 50,
    "{\"key\": [1, 2.5, null], \"nested\": {\"a\": \"b\"}}", "SELECT * FROM t WHERE x >= 10 AND y <> 'z';",
    "Ṱ̺̺̕o͞ ̷i̲̬͇̪͙n̝̗͕v̟̜̘̦͟o̶̙̰̠kè͚̮̺̪̹̱̤ ̖t̝͕̳̣̻̪͞h̼͓̲̦̳̘̲e͇̣̰̦̬͎ ̢̼̻̱̘h͚͎͙̜̣̲ͅi̦̲̣̰̤v̻͍e̺̭̳̪̰-m̢iͅn̖̺̞̲̯̰d̵̼̟͙̩̼̘̳",
    "\r\nWindows\r\nline\r\nends\r\n", "a" + "\u200b" + "b\ufeffc", "٠١٢٣ ١٢٣٤ Arabic-Indic digits",
]


@pytest.fixture(scope="module")
def demo(demo_model):
    return demo_model, Tokenizer.from_gguf(demo_model)


@pytest.fixture(scope="module")
def llama(demo):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install .[oracle])")
    return llama_cpp.Llama(model_path=str(demo[0]), vocab_only=True, verbose=False)


def test_demo_metadata(demo):
    _, tok = demo
    assert tok.vocab.model == "gpt2" and tok.vocab.pre == "smollm"
    assert tok.n_vocab == len(tok.vocab.tokens) > 1000
    assert tok.chat_template and "im_start" in tok.chat_template
    assert any(t == "<|im_start|>" for t, _ in tok.specials)


@pytest.mark.parametrize("add_special", [False, True])
def test_ids_match_llama_cpp(demo, llama, add_special):
    _, tok = demo
    texts = TEXTS + [tok.apply_chat_template(CHAT), tok.apply_chat_template(CHAT, add_generation_prompt=True)]
    for text in texts:
        want = llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)
        assert tok.encode(text, add_special=add_special) == want, repr(text[:80])


def test_parse_special_off_matches_llama_cpp(demo, llama):
    _, tok = demo
    text = "<|im_start|>user\nHi<|im_end|>"
    assert tok.encode(text, add_special=False, parse_special=False) == llama.tokenize(text.encode(), add_bos=False, special=False)
    assert tok.encode(text, add_special=False, parse_special=False) != tok.encode(text, add_special=False)


def test_decode_round_trip(demo):
    _, tok = demo
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special=False)) == text


def test_chat_template_matches_llama_cpp_python(demo):
    _, tok = demo
    fmt = pytest.importorskip("llama_cpp.llama_chat_format", reason="llama-cpp-python is not installed")
    for gen in (False, True):
        ref = fmt.Jinja2ChatFormatter(tok.chat_template, eos_token=tok.token_text(tok.eos_id),
                                      bos_token=tok.token_text(tok.bos_id), add_generation_prompt=gen)
        assert tok.apply_chat_template(CHAT, add_generation_prompt=gen) == ref(messages=CHAT).prompt
    # the demo template inserts its default system prompt when the first message is not a system one
    assert "You are a helpful AI assistant" in tok.apply_chat_template(CHAT[1:])


def test_chat_template_sandbox_and_raise_exception():
    with pytest.raises(ModelError, match="^chat template: roles must alternate$"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", CHAT)
    with pytest.raises(ModelError, match="^chat template: access to attribute '__class__' of 'str' object is unsafe"):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", CHAT)
    assert render_chat_template("{{ bos_token }}{{ messages[0]['content'] }}", CHAT, bos_token="<s>") == "<s>You are terse."
    assert render_chat_template(None, CHAT[:2]).startswith("system: You are terse.")


# issue 14 item 4: hostile templates (each ran out of memory or time, or surfaced a raw jinja2 error)
HOSTILE_TEMPLATES = [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}",
     r"output longer than|took longer than"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "took longer than"),
    ("{{ 'x' * 4000000000 }}", "repetition of 4000000000 x 1 is too long"),
    ("{{ 4000000000 * 'x' }}", "repetition of 4000000000 x 1 is too long"),
    ("{{ [1] * 4000000000 }}", "repetition of 4000000000 x 1 is too long"),
    ("{{ 10 ** 100000000 }}", r"10 \*\* 100000000 is too large"),
    ("{{ '%999999999999d' % 1 }}", "format width is too large"),
    ("{{ 'x'.ljust(4000000000) }}", "argument of 4000000000 is too large"),
    ("{{ 'x'|center(4000000000) }}", "filter argument of 4000000000 is too large"),
    ("{{ ('x' * 60000000) ~ ('x' * 60000000) }}", "output longer than"),
    ("{% for x in messages %}{{ x.content", "unexpected end of template"),
    ("{{ messages[0].__class__ }}", None),  # the sandbox hides it
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ messages[99] }}", None),  # an undefined prints as nothing, as in HF
    ("{{ undefined_name.attr }}", "'undefined_name' is undefined"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError|maximum recursion"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("template,message", HOSTILE_TEMPLATES)
def test_hostile_chat_templates_are_one_line(template, message):
    """Each renders (bounded) or is one ModelError line naming the template, within the limits."""
    t0 = time.process_time()  # the limit is on CPU time: the shared machine's load is not ours
    try:
        out = render_chat_template(template, CHAT, name="m.gguf: tokenizer.chat_template")
    except ModelError as e:
        assert message is not None and re.search(message, str(e)), str(e)
        assert str(e).startswith("m.gguf: tokenizer.chat_template: ") and "\n" not in str(e)
    else:
        assert message is None and out == ""
    assert time.process_time() - t0 < TEMPLATE_SECONDS + 5


def test_hostile_template_in_a_model_names_the_file(demo, tmp_path):
    """apply_chat_template of a GGUF's template: the error names the file and the key."""
    path, _ = demo
    header = GGUFHeader(path)
    bad = write_model(tmp_path / "t.gguf", "llama", header, {"tokenizer.chat_template": ("{{ 'x' * 4000000000 }}", VT.STRING)},
                      {"token_embd.weight": np.zeros((len(header.get("tokenizer.ggml.tokens")), 8), np.float32)},
                      keep=lambda k: k.startswith("tokenizer.") and k != "tokenizer.chat_template")
    with pytest.raises(ModelError, match=f"^{re.escape(str(bad))}: tokenizer.chat_template: a repetition"):
        Tokenizer.from_gguf(bad).apply_chat_template(CHAT)


@pytest.mark.parametrize("key,value", [("tokenizer.ggml.bos_token_id", 2**32 - 1), ("tokenizer.ggml.eos_token_id", 49152),
                                       ("tokenizer.ggml.padding_token_id", -1), ("tokenizer.ggml.eot_token_id", "x")])
def test_special_token_ids_outside_the_vocabulary(demo, tmp_path, key, value):
    """issue 14 item 3: bos_token_id 2**32-1 was an IndexError; every special id is checked."""
    path, _ = demo
    header = GGUFHeader(path)
    vt = VT.STRING if isinstance(value, str) else VT.INT64 if value < 0 else VT.UINT32
    bad = write_model(tmp_path / "t.gguf", "llama", header, {key: (value, vt)},
                      {"token_embd.weight": np.zeros((len(header.get("tokenizer.ggml.tokens")), 8), np.float32)},
                      keep=lambda k: k.startswith("tokenizer.") and k != key)
    with pytest.raises(ModelError) as e:
        Tokenizer.from_gguf(bad)
    assert str(e.value) == f"{bad}: {key} = {value} is not a token id (the vocabulary has 49152 tokens)"


def test_split_special_longest_first():
    specials = sorted([("<a>", 1), ("<a><b>", 2), ("<b>", 3)], key=lambda p: -len(p[0]))
    assert split_special("x<a><b>y<b><a>", specials) == ["x", 2, "y", 3, 1]
    assert split_special("", specials) == []
    assert split_special("plain", specials) == ["plain"]


def test_tokenizer_json_folder(demo, tmp_path):
    """A HF folder (tokenizer.json + tokenizer_config.json) built from the same vocab gives the same ids."""
    _, tok = demo
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    hf = Tokenizer.load(tmp_path)
    # the saved backend holds no added tokens: declare the specials as the GGUF does
    hf.specials = tok.specials
    for text in TEXTS:
        assert hf.encode(text, add_special=False) == tok.encode(text, add_special=False)
    assert hf.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT)
    assert hf.fingerprint != tok.fingerprint


VOCAB_DIR = os.environ.get("LLAMA_CPP_VOCAB_DIR")  # llama.cpp's models/ folder with ggml-vocab-*.gguf(.inp)


@pytest.mark.skipif(not VOCAB_DIR, reason="set LLAMA_CPP_VOCAB_DIR to llama.cpp's models/ folder to test more vocabularies")
@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe", "qwen2", "starcoder", "llama-spm", "phi-3", "command-r", "falcon"])
def test_other_vocabs_match_llama_cpp(name):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = Path(VOCAB_DIR) / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    texts = TEXTS + path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.from_gguf(path)
    for text in texts:
        for add in (False, True):
            assert tok.encode(text, add_special=add) == ref.tokenize(text.encode(), add_bos=add, special=True), repr(text[:80])
