"""Outputs survive kill -9: a writer of a recipe (``schema.save``), a report (``atomic_write_text``)
or a GGUF (``apply_recipe``) is SIGKILLed at random points, over and over; each time the file is
the previous version or a complete new one (byte-identical to a full write, and valid by its own
reader), never partial, and nothing left in the folder looks like an output: a killed writer's
temporary file is hidden, ends in ``.tmp``, and is removed by the next write into the folder
(which temporary files are removed, and which kept: tests/test_output_safety.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from dynsearch.objectives.io.gguf_header import GGUFHeader
from dynsearch.objectives.io.gguf_write import write_model
from dynsearch.recipes import schema

pytestmark = pytest.mark.timeout(300)

HELPER = Path(__file__).with_name("_kill_writer.py")
TEMP = re.compile(r"^\..+\.tmp$")


def tiny_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    kv = {"llama.block_count": (1, u32), "llama.embedding_length": (256, u32),
          "llama.attention.head_count": (4, u32), "llama.feed_forward_length": (512, u32),
          "llama.attention.layer_norm_rms_epsilon": (1e-5, f32)}
    tensors = {"token_embd.weight": rng.standard_normal((64, 256)).astype(np.float32),
               "blk.0.attn_norm.weight": np.ones(256, np.float32),
               "blk.0.attn_q.weight": rng.standard_normal((256, 256)).astype(np.float32),
               "blk.0.ffn_up.weight": rng.standard_normal((512, 256)).astype(np.float32)}
    return write_model(path, "llama", None, kv, tensors)


class Writer:
    def __init__(self, kind: str, dest: Path, source: Path | None = None):
        env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
        self.p = subprocess.Popen([sys.executable, str(HELPER), kind, str(dest), str(source or "")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline()
        assert line.startswith("ready "), f"writer did not start: {line!r}"
        info = json.loads(line[len("ready "):])
        self.hashes, self.seconds = set(info["hashes"].values()), info["seconds"]
        assert len(self.hashes) == 2

    def ask(self, command: str) -> str:
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.flush()
                self.p.wait(timeout=60)
            finally:  # a writer stuck on a child must not outlive the test, nor its child
                if self.p.poll() is None:
                    subprocess.run(["pkill", "-KILL", "-P", str(self.p.pid)], check=False)
                    self.p.kill()
                    self.p.wait()


READERS = {"recipe": schema.load, "report": lambda p: json.loads(p.read_text()), "gguf": GGUFHeader}


@pytest.mark.parametrize("kind,kills", [("recipe", 40), ("report", 40), ("gguf", 30)])
def test_killed_writer_leaves_old_or_new_file(tmp_path, kind, kills):
    (tmp_path / "src").mkdir()
    source = tiny_model(tmp_path / "src" / "model.gguf") if kind == "gguf" else None
    out = tmp_path / "out"
    dest = out / {"recipe": "r.yaml", "report": "report.json", "gguf": "r.gguf"}[kind]
    w = Writer(kind, dest, source)
    rng = random.Random(5)
    mid_write = 0
    try:
        span = max(3 * w.seconds, 0.005)  # kills land anywhere in the first few writes
        for i in range(kills):
            at_commit = i % 10 == 3  # some kills sure to land inside a write; random ones may miss
            assert w.ask("kill-at-commit" if at_commit else f"kill {rng.uniform(0, span):.6f}") == "killed"
            assert hashlib.sha256(dest.read_bytes()).hexdigest() in w.hashes  # old or complete new
            READERS[kind](dest)
            others = [p.name for p in out.iterdir() if p != dest]
            assert all(TEMP.match(n) for n in others), others  # nothing that looks like an output
            assert len(others) <= 1, others  # the next write removed the previous kill's file
            assert len(others) == 1 or not at_commit, "a kill before the rename left no temporary file"
            mid_write += len(others)
        assert w.ask("final") == "done 0"
        assert sorted(p.name for p in out.iterdir()) == [dest.name]
        assert hashlib.sha256(dest.read_bytes()).hexdigest() in w.hashes
    finally:
        w.close()
    print(f"{kind}: {kills} kills within {span * 1e3:.0f} ms of a start (one write {w.seconds * 1e3:.1f} ms), "
          f"{mid_write} left a temporary file (killed mid-write), 0 partial outputs")
    assert mid_write >= kills // 10  # at least the kills at the rename landed inside a write


def test_control_plain_writes_are_caught(tmp_path):
    """The same kills on an ordinary in-place write: the check above finds partial files."""
    dest = tmp_path / "report.json"
    w = Writer("plain-report", dest)
    rng, partial = random.Random(5), 0
    try:
        for _ in range(20):
            assert w.ask(f"kill {rng.uniform(0, 3 * w.seconds):.6f}") == "killed"
            partial += hashlib.sha256(dest.read_bytes()).hexdigest() not in w.hashes
    finally:
        w.close()
    print(f"control: 20 kills of an in-place writer left {partial} partial files")
    assert partial > 0
