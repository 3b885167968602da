"""MMLU 5-shot, as the original hendrycks/test ``evaluate.py`` runs it.

Prompt (plain text, no chat template, BOS only where the tokenizer adds one)::

    The following are multiple choice questions (with answers) about  abstract algebra.\\n\\n
    <dev question 1>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: B\\n\\n      (x 5, the subject's dev set)
    <test question>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

The two spaces after "about" are the original's (``format_subject`` prefixes every word with a
space and the template adds one more); kept so scores compare with the published harness. Where a
prompt exceeds ``max_tokens`` (2048, as the original) shots are dropped from the end until it fits.

Scoring reads the log-probabilities of the answer letters at the position after "Answer:". A
letter is written either as its own token or with a leading space (" A" vs "A": which one a model
prefers depends on its tokenizer and training), so both variants count: per letter the
**log-sum-exp** of the variants' log-probabilities, i.e. the total probability the model puts on
that letter. The prediction is the most probable letter (the first on ties). Naive harnesses that
read only one variant lose much of the accuracy.

Accuracy is reported per subject, as the macro average over subjects and as the micro average over
all questions (the original's headline "average accuracy"); Unsloth's efficiency is
``(MMLU% - 25) / disk GB`` with the micro average and GB = 1e9 bytes.

Data: hendrycks/test CSV files, no header, ``question,A,B,C,D,answer``, under ``dev/`` and ``test/``
as ``<subject>_dev.csv`` / ``<subject>_test.csv`` (gzipped ``.csv.gz`` read too);
:func:`dynsearch.objectives.calibration.mmlu_dir` is the shipped copy.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from dynsearch.errors import MMLUError
from dynsearch.objectives.calibration import mmlu_dir
from dynsearch.objectives.forward import BlockwiseForward
from dynsearch.objectives.io.gguf_source import GGUFSource
from dynsearch.objectives.scoring import gather_logprobs
from dynsearch.objectives.tokenizer import Tokenizer

LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"

# (prompts as token-id lists, candidate token ids) -> (n_prompts, n_ids) log-probabilities of those
# ids at each prompt's last position.
Scorer = Callable[[Sequence[Sequence[int]], Sequence[int]], np.ndarray]


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


# ------------------------------------------------------------------------------------------ data


def _file(root: Path, split: str, subject: str) -> Path:
    for name in (f"{subject}_{split}.csv", f"{subject}_{split}.csv.gz"):
        if (root / split / name).is_file():
            return root / split / name
    raise MMLUError(f"{root / split}: no {subject}_{split}.csv")


def list_subjects(root: str | Path) -> list[str]:
    """Subjects with a test file under ``root/test``, sorted."""
    test = Path(root) / "test"
    if not test.is_dir() or not (Path(root) / "dev").is_dir():
        raise MMLUError(f"{root}: not an MMLU folder (expected dev/ and test/ with <subject>_test.csv files)")
    names = sorted({p.name.split("_test.csv")[0] for p in test.iterdir() if "_test.csv" in p.name})
    if not names:
        raise MMLUError(f"{test}: no <subject>_test.csv files")
    return names


def read_questions(path: str | Path) -> list[Question]:
    """The rows of one hendrycks CSV file (``.csv`` or ``.csv.gz``)."""
    p = Path(path)
    raw = p.read_bytes()
    try:
        text = (gzip.decompress(raw) if p.suffix == ".gz" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise MMLUError(f"{p}: not a readable (gzipped) UTF-8 CSV file ({e})") from None
    out = []
    for i, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row:
            continue
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise MMLUError(f"{p}:{i}: expected question,A,B,C,D,answer with answer in A-D, got {len(row)} fields")
        out.append(Question(row[0], (row[1], row[2], row[3], row[4]), row[5].strip()))
    return out


def load_subject(root: str | Path, subject: str, k: int = 5, limit: int | None = None) -> tuple[list[Question], list[Question]]:
    """(the first ``k`` dev questions, the first ``limit`` test questions) of a subject."""
    root = Path(root)
    dev = read_questions(_file(root, "dev", subject))[:k]
    test = read_questions(_file(root, "test", subject))
    return dev, test[:limit] if limit is not None else test


# --------------------------------------------------------------------------------------- prompts


def format_subject(subject: str) -> str:
    """``abstract_algebra`` -> ``" abstract algebra"`` (the original's leading space)."""
    return "".join(" " + w for w in subject.split("_"))


def format_example(q: Question, include_answer: bool = True) -> str:
    s = q.question + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, q.choices)) + "\nAnswer:"
    return s + (f" {q.answer}\n\n" if include_answer else "")


def build_prompt(subject: str, shots: Sequence[Question], q: Question) -> str:
    """The k-shot prompt for ``q``: header, the shots with their answers, ``q`` ending in "Answer:"."""
    return HEADER.format(format_subject(subject)) + "".join(format_example(s) for s in shots) + format_example(q, False)


def prompt_tokens(tokenizer, subject: str, dev: Sequence[Question], q: Question, max_tokens: int = 2048) -> list[int]:
    """Token ids of the prompt (BOS as the tokenizer adds it), dropping shots from the end while it
    is longer than ``max_tokens``."""
    k = len(dev)
    while True:
        ids = tokenizer.encode(build_prompt(subject, dev[:k], q), add_special=True, parse_special=False)
        if len(ids) <= max_tokens or k == 0:
            return ids
        k -= 1


def answer_variants(tokenizer, context: str = "\nAnswer:") -> dict[str, tuple[int, ...]]:
    """Per letter, the distinct single tokens that write it after ``context``: " A" and "A"."""
    base = tokenizer.encode(context, add_special=False, parse_special=False)
    out: dict[str, tuple[int, ...]] = {}
    for letter in LETTERS:
        ids: list[int] = []
        for s in (" " + letter, letter):
            full = tokenizer.encode(context + s, add_special=False, parse_special=False)
            if full[: len(base)] == base and len(full) == len(base) + 1 and full[-1] not in ids:
                ids.append(full[-1])
        if not ids:
            raise MMLUError(f"the tokenizer writes the answer letter {letter!r} as more than one token")
        out[letter] = tuple(ids)
    return out


def letter_scores(logprobs: np.ndarray, variants: dict[str, tuple[int, ...]], ids: Sequence[int]) -> np.ndarray:
    """(n, 4) per-letter log-sum-exp of the variant log-probs; ``logprobs`` (n, len(ids)) in ``ids`` order."""
    col = {t: j for j, t in enumerate(ids)}
    per = [np.logaddexp.reduce(logprobs[:, [col[t] for t in variants[letter]]], axis=1) for letter in LETTERS]
    return np.stack(per, axis=1)


# --------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SubjectResult:
    subject: str
    n: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass(frozen=True)
class MMLUResult:
    subjects: tuple[SubjectResult, ...]
    k_shot: int
    variants: dict[str, list[str]] = field(default_factory=dict)  # letter -> token texts counted
    file_bytes: int | None = None

    @property
    def n(self) -> int:
        return sum(s.n for s in self.subjects)

    @property
    def micro(self) -> float:
        """Accuracy over all questions (the original's "average accuracy")."""
        return sum(s.correct for s in self.subjects) / self.n if self.n else 0.0

    @property
    def macro(self) -> float:
        """Mean of the per-subject accuracies."""
        return float(np.mean([s.accuracy for s in self.subjects])) if self.subjects else 0.0

    @property
    def efficiency(self) -> float | None:
        """Unsloth's ``(MMLU% - 25) / disk GB`` (micro average, GB = 1e9 bytes)."""
        if not self.file_bytes:
            return None
        return (100 * self.micro - 25) / (self.file_bytes / 1e9)

    def to_dict(self) -> dict:
        return {"k_shot": self.k_shot, "n_questions": self.n, "micro": self.micro, "macro": self.macro,
                "efficiency": self.efficiency, "file_bytes": self.file_bytes, "variants": self.variants,
                "subjects": {s.subject: {"n": s.n, "correct": s.correct, "accuracy": s.accuracy}
                             for s in self.subjects}}

    def table(self) -> str:
        w = max([len("subject")] + [len(s.subject) for s in self.subjects])
        lines = [f"{'subject':<{w}} {'n':>5} {'acc %':>7}"]
        lines += [f"{s.subject:<{w}} {s.n:>5} {100 * s.accuracy:>7.2f}" for s in self.subjects]
        lines.append(f"MMLU {self.k_shot}-shot: {100 * self.micro:.2f}% over {self.n} questions (micro), "
                     f"{100 * self.macro:.2f}% mean of {len(self.subjects)} subjects (macro)")
        if self.efficiency is not None:
            lines.append(f"efficiency (MMLU - 25) / GB: {self.efficiency:.2f} ({self.file_bytes / 1e9:.3f} GB)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- run


def evaluate(tokenizer, scorer: Scorer, root: str | Path, subjects: Sequence[str] | None = None,
             limit: int | None = None, k: int = 5, max_tokens: int = 2048,
             file_bytes: int | None = None, progress: bool = False) -> MMLUResult:
    """MMLU k-shot accuracy with ``scorer`` (see :data:`Scorer`, :func:`model_scorer`)."""
    known = list_subjects(root)
    chosen = list(subjects) if subjects else known
    for s in chosen:
        if s not in known:
            raise MMLUError(f"unknown MMLU subject {s!r} (in {root}: {', '.join(known[:4])}, ... {len(known)} subjects)")
    variants = answer_variants(tokenizer)
    ids = sorted({t for v in variants.values() for t in v})
    results = []
    for subject in tqdm(chosen, desc="mmlu", unit="subject", disable=not progress):
        dev, test = load_subject(root, subject, k, limit)
        prompts = [prompt_tokens(tokenizer, subject, dev, q, max_tokens) for q in test]
        lp = np.asarray(scorer(prompts, ids), dtype=np.float64).reshape(len(prompts), len(ids))
        pred = letter_scores(lp, variants, ids).argmax(axis=1) if prompts else np.zeros(0, dtype=int)
        correct = sum(LETTERS[p] == q.answer for p, q in zip(pred, test))
        results.append(SubjectResult(subject, len(test), int(correct)))
    texts = {letter: [tokenizer.decode([t]) for t in v] for letter, v in variants.items()}
    return MMLUResult(tuple(results), k, texts, file_bytes)


def model_scorer(forward, batch_tokens: int = 8192) -> Scorer:
    """A :data:`Scorer` running ``forward`` (a BlockwiseForward) on right-padded buckets of at most
    ``batch_tokens`` tokens."""
    def score(prompts: Sequence[Sequence[int]], ids: Sequence[int]) -> np.ndarray:
        out = gather_logprobs(forward, prompts, [[len(p) - 1] for p in prompts], [[list(ids)]] * len(prompts),
                              max_tokens=batch_tokens)
        return np.concatenate(out, axis=0) if out else np.zeros((0, len(ids)))

    return score


def run_file(model: str | Path, root: str | Path | None = None, subjects: Sequence[str] | None = None,
             limit: int | None = None, k: int = 5, device: str = "cpu", progress: bool = True) -> MMLUResult:
    """MMLU of a GGUF file with our forward pass (its weights dequantized by our kernels)."""
    path = Path(model)
    src = GGUFSource(path)
    scorer = model_scorer(BlockwiseForward(src, device=device))
    return evaluate(Tokenizer.from_gguf(path), scorer, root or mmlu_dir(), subjects, limit, k,
                    file_bytes=path.stat().st_size, progress=progress)

