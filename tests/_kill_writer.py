"""A writer process for tests/test_atomic_outputs.py, which kills its children at random points.

``python tests/_kill_writer.py KIND DEST [SOURCE]`` (KIND: ``recipe``, ``report``, ``gguf``, or the
control ``plain-report`` that writes in place; SOURCE:
the model GGUF that ``gguf`` applies recipes to) imports everything, writes both versions of DEST
once (printing ``ready`` with their SHA-256 and how long one write takes), then serves stdin:

* ``kill SECONDS``: fork a child that writes DEST over and over (versions B, A, B, ...), SIGKILL it
  after SECONDS, reap it, print ``killed``;
* ``kill-at-commit``: the same, but the child stops its first write where the temporary file is
  complete and about to be renamed over DEST (``os.replace``), and is SIGKILLed there: a kill
  inside a write on every machine, however fast its writes;
* ``final``: fork a child that writes DEST once and exits normally, print ``done``;
* ``quit``.

Forking from this warmed-up process makes a kill cost milliseconds instead of a new interpreter.
It needs numba's ``workqueue`` threading layer (the test sets NUMBA_THREADING_LAYER): GNU OpenMP
does not survive a fork. And tqdm's default write lock is a cross-process semaphore that forked
children share: a child SIGKILLed while holding it (tqdm takes it even with ``disable=True``) would
block every later child forever, so each process gets a lock of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import tqdm

from dynsearch.atomic import atomic_write_text
from dynsearch.recipes import schema
from dynsearch.recipes.schema import ModelInfo, Recipe

N_RECIPE_TENSORS = 600
SOURCE_TYPES = {"A": {"token_embd.weight": "Q4_K", "blk.0.attn_q.weight": "Q5_K", "blk.0.ffn_up.weight": "IQ4_XS"},
                "B": {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q3_K", "blk.0.ffn_up.weight": "Q4_0"}}


def recipe(version: str, tensors: dict[str, str] | None = None) -> Recipe:
    if tensors is None:
        t = ("Q4_K", "Q6_K") if version == "A" else ("Q8_0", "Q3_K")
        tensors = {f"blk.{i // 8}.t{i % 8}.weight": t[i % 2] for i in range(N_RECIPE_TENSORS)}
    return Recipe(name=f"kill-{version}", model=ModelInfo("tiny", "llama"), tensors=tensors,
                  search={"version": version})


def report(version: str) -> str:
    rows = [{"budget": f"{i}MB", "kl": i * 1e-3, "version": version, "types": {"Q4_K": i}} for i in range(20_000)]
    return json.dumps(rows, indent=1)


def writer(kind: str, dest: Path, source: str):
    if kind == "recipe":
        docs = {v: recipe(v) for v in "AB"}
        return lambda v: schema.save(docs[v], dest)
    if kind == "report":
        docs = {v: report(v) for v in "AB"}
        return lambda v: atomic_write_text(dest, docs[v])
    if kind == "plain-report":  # the control: an ordinary, non-atomic write of the same report
        docs = {v: report(v) for v in "AB"}
        return lambda v: dest.write_text(docs[v])
    if kind == "gguf":
        from dynsearch.objectives.io.gguf_header import GGUFHeader
        from dynsearch.recipes.apply import apply_recipe

        names = list(GGUFHeader(source).tensors)
        docs = {v: recipe(v, {n: SOURCE_TYPES[v].get(n, "F32") for n in names}) for v in "AB"}
        return lambda v: apply_recipe(docs[v], source, dest, progress=False)
    raise SystemExit(f"unknown kind {kind!r}")


def main() -> None:
    tqdm.tqdm.set_lock(threading.RLock())  # per process: a fork copies it, nothing is shared
    kind, dest = sys.argv[1], Path(sys.argv[2])
    write = writer(kind, dest, sys.argv[3] if len(sys.argv) > 3 else "")
    hashes, took = {}, []
    for v in "BA":  # ends with A in place
        t0 = time.perf_counter()
        write(v)
        took.append(time.perf_counter() - t0)
        hashes[v] = hashlib.sha256(dest.read_bytes()).hexdigest()
    print("ready", json.dumps({"hashes": hashes, "seconds": min(took)}), flush=True)
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "quit":
            return
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: write until killed (or once, for "final")
            os.close(ready_r)
            if cmd == "kill-at-commit":  # stop where the temporary file is complete but not yet renamed
                def replace(*_args, _ready=ready_w, **_kwargs):
                    os.write(_ready, b"x")
                    time.sleep(600)
                os.replace = replace
            try:
                if cmd == "final":
                    write("A")
                else:
                    k = 0
                    while True:
                        write("BA"[k % 2])
                        k += 1
            finally:
                os._exit(0)
        os.close(ready_w)
        if cmd == "kill":
            time.sleep(float(arg[0]))
            os.kill(pid, signal.SIGKILL)
        elif cmd == "kill-at-commit":
            if not os.read(ready_r, 1):  # the child wrote, or died without reaching the rename
                raise SystemExit("the writer never reached os.replace")
            os.kill(pid, signal.SIGKILL)
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
        print(f"done {status}" if cmd == "final" else "killed", flush=True)


if __name__ == "__main__":
    main()
