"""MMLU 5-shot on a small synthetic set in the hendrycks/test layout: the prompt is exactly the
original's, scoring counts both " A" and "A" (log-sum-exp per letter), accuracies and efficiency
add up; the shipped copy reads; the demo model runs end to end from the CLI."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest

from dynsearch.cli import main
from dynsearch.objectives import mmlu
from dynsearch.objectives.calibration import mmlu_dir

DEV = [("What is 1+1?", "1", "2", "3", "4", "B"),
       ('Pick the "quoted", comma one', "x, y", 'say "hi"', "z", "w", "A"),
       ("Third?", "a", "b", "c", "d", "C"),
       ("Fourth?", "a", "b", "c", "d", "D"),
       ("Fifth?", "a", "b", "c", "d", "A")]
TEST = [("Capital of France?", "Rome", "Paris", "Oslo", "Bern", "B"),
        ("2*3?", "5", "9", "6", "8", "C"),
        ("Largest planet?", "Jupiter", "Mars", "Venus", "Earth", "A"),
        ("Colour of the sky?", "green", "red", "pink", "blue", "D")]


def _csv(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


@pytest.fixture
def data(tmp_path) -> Path:
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
    (tmp_path / "dev" / "high_school_geography_dev.csv").write_bytes(_csv(DEV))
    (tmp_path / "test" / "high_school_geography_test.csv").write_bytes(_csv(TEST))
    (tmp_path / "dev" / "astronomy_dev.csv.gz").write_bytes(gzip.compress(_csv(DEV)))  # gzipped read too
    (tmp_path / "test" / "astronomy_test.csv.gz").write_bytes(gzip.compress(_csv(TEST[:2])))
    return tmp_path


EXPECTED = (
    "The following are multiple choice questions (with answers) about  high school geography.\n\n"
    "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
    'Pick the "quoted", comma one\nA. x, y\nB. say "hi"\nC. z\nD. w\nAnswer: A\n\n'
    "Third?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
    "Fourth?\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"
    "Fifth?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"
    "Capital of France?\nA. Rome\nB. Paris\nC. Oslo\nD. Bern\nAnswer:"
)


def test_prompt_is_the_original_format(data):
    dev, test = mmlu.load_subject(data, "high_school_geography")
    assert len(dev) == 5 and test[0] == mmlu.Question("Capital of France?", ("Rome", "Paris", "Oslo", "Bern"), "B")
    assert mmlu.build_prompt("high_school_geography", dev, test[0]) == EXPECTED
    assert mmlu.list_subjects(data) == ["astronomy", "high_school_geography"]
    assert len(mmlu.load_subject(data, "astronomy", k=2, limit=1)[1]) == 1


class CharTokenizer:
    """Stand-in tokenizer: " A".." D" and "A".."D" are single tokens (ids 1-8), other characters
    are 100 + code point; BOS is 0."""

    add_bos, bos_id = True, 0
    SPACED = {" " + c: 1 + i for i, c in enumerate(mmlu.LETTERS)}
    BARE = {c: 5 + i for i, c in enumerate(mmlu.LETTERS)}

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        out, i = ([self.bos_id] if add_special else []), 0
        while i < len(text):
            if text[i:i + 2] in self.SPACED:
                out.append(self.SPACED[text[i:i + 2]])
                i += 2
                continue
            out.append(self.BARE.get(text[i], 100 + ord(text[i])))
            i += 1
        return out

    def decode(self, ids) -> str:
        inv = {v: k for k, v in {**self.SPACED, **self.BARE}.items()}
        return "".join(inv.get(t, chr(t - 100) if t >= 100 else "<s>") for t in ids)


def _stub_scorer(tok: CharTokenizer, answers: dict[str, str], split: bool):
    """Log-probs at the last position: the right letter gets 0.25 as " X" and 0.25 as "X" (0.5 in
    all); one wrong letter 0.3 as " W" only, another 0.3 as "V" only. Only log-sum-exp over both
    variants picks the right letter (the spaced variant alone, the bare one alone or the max do not)."""
    calls = []

    def score(prompts, ids):
        calls.append(list(ids))
        out = np.full((len(prompts), len(ids)), -30.0)
        col = {t: j for j, t in enumerate(ids)}
        for r, p in enumerate(prompts):
            assert p[0] == tok.bos_id
            text = tok.decode(p[1:])
            assert text.endswith("\nAnswer:")
            q = text.rsplit("\n\n", 1)[-1].split("\n")[0]
            right = answers[q]
            wrong = [c for c in mmlu.LETTERS if c != right]
            probs = {(right, " "): 0.25, (right, ""): 0.25, (wrong[0], " "): 0.3, (wrong[1], ""): 0.3} if split \
                else {(right, " "): 0.9}
            for (letter, sp), pr in probs.items():
                out[r, col[(tok.SPACED if sp else tok.BARE)[sp + letter]]] = np.log(pr)
        return out

    return score, calls


def test_scoring_counts_both_variants(data):
    tok = CharTokenizer()
    variants = mmlu.answer_variants(tok)
    assert variants == {c: (1 + i, 5 + i) for i, c in enumerate(mmlu.LETTERS)}
    answers = {q[0]: q[5] for q in TEST}
    scorer, calls = _stub_scorer(tok, answers, split=True)
    r = mmlu.evaluate(tok, scorer, data, file_bytes=2_000_000_000)
    assert [(s.subject, s.n, s.correct) for s in r.subjects] == [("astronomy", 2, 2), ("high_school_geography", 4, 4)]
    assert r.micro == 1.0 and r.macro == 1.0 and r.efficiency == pytest.approx((100 - 25) / 2.0)
    assert sorted(calls[0]) == list(range(1, 9))
    # the alternatives a naive harness would use pick the wrong letter here
    lp = np.log(np.array([[0.25, 0.3, 1e-13, 1e-13, 0.25, 1e-13, 0.3, 1e-13]]))  # right = A
    ids = list(range(1, 9))
    assert mmlu.letter_scores(lp, variants, ids).argmax() == 0
    assert lp[0, :4].argmax() == 1 and lp[0, 4:].argmax() == 2 and np.maximum(lp[0, :4], lp[0, 4:]).argmax() == 1
    assert mmlu.letter_scores(lp, variants, ids)[0, 0] == pytest.approx(np.log(0.5))


def test_wrong_answers_and_averages(data):
    tok = CharTokenizer()
    # the stub believes the answer of "2*3?" is A: one miss in each subject that has it
    answers = {q[0]: q[5] for q in TEST} | {"2*3?": "A"}
    scorer, _ = _stub_scorer(tok, answers, split=False)
    r = mmlu.evaluate(tok, scorer, data, subjects=["astronomy", "high_school_geography"])
    assert [s.correct for s in r.subjects] == [1, 3]
    assert r.micro == pytest.approx(4 / 6) and r.macro == pytest.approx((0.5 + 0.75) / 2) and r.efficiency is None
    d = r.to_dict()
    assert d["subjects"]["astronomy"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert "MMLU 5-shot: 66.67%" in r.table()


def test_long_prompts_drop_shots():
    tok = CharTokenizer()
    dev = [mmlu.Question(*q[:1], tuple(q[1:5]), q[5]) for q in DEV]
    q = mmlu.Question("Capital of France?", ("Rome", "Paris", "Oslo", "Bern"), "B")
    full = mmlu.prompt_tokens(tok, "x", dev, q, max_tokens=10_000)
    two = len(tok.encode(mmlu.build_prompt("x", dev[:2], q)))
    cut = mmlu.prompt_tokens(tok, "x", dev, q, max_tokens=two)
    assert len(cut) == two < len(full)
    assert tok.decode(cut[1:]) == mmlu.build_prompt("x", dev[:2], q)


def test_bad_data_is_one_clear_error(data, tmp_path):
    with pytest.raises(mmlu.MMLUError, match="not an MMLU folder"):
        mmlu.list_subjects(tmp_path / "nowhere")
    with pytest.raises(mmlu.MMLUError, match="unknown MMLU subject 'anatomy'"):
        mmlu.evaluate(CharTokenizer(), lambda p, i: None, data, subjects=["anatomy"])
    (data / "test" / "bad_test.csv").write_bytes(_csv([("q", "a", "b", "c", "d", "E")]))
    with pytest.raises(mmlu.MMLUError, match=r"bad_test.csv:1: expected question,A,B,C,D,answer"):
        mmlu.read_questions(data / "test" / "bad_test.csv")


def test_shipped_copy_reads():
    subjects = mmlu.list_subjects(mmlu_dir())
    assert len(subjects) == 57
    dev, test = mmlu.load_subject(mmlu_dir(), "abstract_algebra")
    assert len(dev) == 5 and len(test) == 100 and dev[0].answer == "B"
    assert sum(len(mmlu.load_subject(mmlu_dir(), s, k=0)[1]) for s in subjects) == 14042


def test_demo_model_variants_and_cli(tmp_path, capsys, demo_model):
    from dynsearch.objectives.tokenizer import Tokenizer

    demo = demo_model
    tok = Tokenizer.from_gguf(demo)
    v = mmlu.answer_variants(tok)
    assert all(len(ids) == 2 for ids in v.values())
    assert [tok.decode([t]) for t in v["C"]] == [" C", "C"]
    out = tmp_path / "m.json"
    assert main(["mmlu", str(demo), "--subjects", "world_religions", "--limit", "2", "--json", str(out), "--quiet"]) == 0
    assert "MMLU 5-shot:" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["n_questions"] == 2 and doc["subjects"]["world_religions"]["n"] == 2
    assert doc["file_bytes"] == demo.stat().st_size and doc["variants"]["A"] == [" A", "A"]
    assert main(["mmlu", str(demo), "--subjects", "nope", "--quiet"]) == 2
    assert "unknown MMLU subject 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_letter_logprobs_match_llama_cpp(demo_model):
    """Our scorer's answer-token log-probs for a real 5-shot prompt equal llama.cpp's (F32 copy of the
    demo model and an F32 KV cache, so no rounding on llama.cpp's side: its default F16 cache alone
    moves these log-probs by 3e-3)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference")
    from dynsearch.bench.forward import f32_copy
    from dynsearch.objectives.forward import BlockwiseForward
    from dynsearch.objectives.io.gguf_source import GGUFSource
    from dynsearch.objectives.tokenizer import Tokenizer

    path = f32_copy(demo_model)
    tok = Tokenizer.from_gguf(path)
    variants = mmlu.answer_variants(tok)
    ids = sorted({t for v in variants.values() for t in v})
    dev, test = mmlu.load_subject(mmlu_dir(), "world_religions", limit=1)
    prompt = mmlu.prompt_tokens(tok, "world_religions", dev, test[0])
    ours = mmlu.model_scorer(BlockwiseForward(GGUFSource(path)))([prompt], ids)[0]
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=2,
                          type_k=f32, type_v=f32)
    llm.eval(prompt)
    logits = np.asarray(llm.scores[len(prompt) - 1], dtype=np.float64)
    ref = logits[ids] - np.logaddexp.reduce(logits)
    np.testing.assert_allclose(ours, ref, atol=2e-4)  # 3.2e-5 measured
