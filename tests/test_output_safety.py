"""No command writes over one of its own inputs, and filesystem errors are one line before any work
(issue 14, items 2, 6 and 10): ``dynsearch.atomic.check_output`` against real files, folders,
links, devices and read-only places, then each repro through the CLI -- the output is refused
with one ``dynsearch: error:`` line and every file the user had is byte-identical afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from dynsearch import atomic
from dynsearch.cli import main
from dynsearch.errors import OutputError
from dynsearch.objectives.io.gguf_write import write_model
from dynsearch.recipes import schema
from dynsearch.recipes.schema import ModelInfo, Recipe

pytestmark = pytest.mark.timeout(300)


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` (file or folder) made unwritable for this process: immutable when running as root
    (root ignores permission bits), else without write permission."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
            pytest.skip("running as root without chattr +i: no way to make a read-only place")
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield path
        finally:
            path.chmod(mode)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert err.startswith("dynsearch: error: ") and err.count("\n") == 1, err
    for e in expected:
        assert e in err, err


# ---------------------------------------------------------------------------- check_output itself


def test_an_input_is_refused_by_any_spelling_or_link(tmp_path):
    model = tmp_path / "m" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF model")
    (tmp_path / "sym.gguf").symlink_to(model)
    os.link(model, tmp_path / "hard.gguf")
    for spelling in (model, tmp_path / "m" / ".." / "m" / "model.gguf", tmp_path / "sym.gguf",
                     tmp_path / "hard.gguf", Path(os.path.relpath(model))):
        with pytest.raises(OutputError, match="the output would overwrite the input"):
            atomic.check_output(spelling, [None, tmp_path / "other", model])
    # an input that does not exist yet (a storage to be created) is compared by resolved path
    with pytest.raises(OutputError, match="would overwrite"):
        atomic.check_output(tmp_path / "x" / ".." / "new.db", [tmp_path / "new.db"])
    # a different file, and a copy of the input, are fine
    (tmp_path / "copy.gguf").write_bytes(model.read_bytes())
    for ok in (tmp_path / "copy.gguf", tmp_path / "new" / "out.gguf"):
        assert atomic.check_output(ok, [model]) == ok
    assert model.read_bytes() == b"GGUF model"


@pytest.mark.parametrize("case,message", [
    ("folder", "is a folder; give the name of a file"),
    ("under-file", "is not a folder"),
    ("deep-under-file", "is not a folder"),
    ("device", "is not a regular file"),
    ("long-name", "a name of 300 bytes, the file system allows at most"),
    ("long-folder", "a name of 300 bytes"),
])
def test_places_that_cannot_be_written(tmp_path, case, message):
    (tmp_path / "file").write_text("mine")
    dest = {"folder": tmp_path, "under-file": tmp_path / "file" / "x.gguf",
            "deep-under-file": tmp_path / "file" / "a" / "b" / "x.gguf", "device": Path("/dev/null"),
            "long-name": tmp_path / ("n" * 300), "long-folder": tmp_path / ("n" * 300) / "x"}[case]
    with pytest.raises(OutputError, match=message) as e:
        atomic.check_output(dest)
    assert "\n" not in str(e.value)
    with pytest.raises(OutputError, match=message):  # every atomic write checks before it starts
        atomic.atomic_write_text(dest, "data")
    assert (tmp_path / "file").read_text() == "mine" and os.listdir(tmp_path) == ["file"]


def test_a_name_at_the_limit_is_written(tmp_path):
    """The temporary file's name must fit too: the longest name the file system allows works."""
    dest = tmp_path / ("n" * atomic._name_max(tmp_path))
    atomic.atomic_write_text(dest, "ok")
    assert dest.read_text() == "ok" and os.listdir(tmp_path) == [dest.name]


@pytest.mark.parametrize("what", ["file", "folder"])
def test_read_only_places_are_refused(tmp_path, what):
    folder = tmp_path / "d"
    folder.mkdir()
    dest = folder / "out.yaml"
    dest.write_text("mine")
    message = "out.yaml: is read-only" if what == "file" else "cannot write in the folder"
    with read_only(dest if what == "file" else folder):
        with pytest.raises(OutputError, match=message) as e:
            atomic.atomic_write_text(dest, "new")
        assert "\n" not in str(e.value)
        if what == "folder":  # nor a new file or folder in it
            with pytest.raises(OutputError, match=message):
                atomic.atomic_write_text(folder / "sub" / "new.yaml", "new")
    assert dest.read_text() == "mine" and os.listdir(folder) == ["out.yaml"]


def test_a_full_disk_is_one_line_and_no_temp_is_left(tmp_path, monkeypatch):
    import errno

    dest = tmp_path / "r.yaml"
    dest.write_text("old")
    with pytest.raises(OutputError, match="r.yaml: cannot write: No space left on device"):
        with atomic.atomic_path(dest) as tmp:
            tmp.write_bytes(b"part")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert dest.read_text() == "old" and os.listdir(tmp_path) == ["r.yaml"]


# ------------------------------------------------------------------------------- leftovers (item 10)


KILLED_WRITER = """
import sys, time
from dynsearch.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 100_000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_killed_writers_temp_is_removed_by_the_next_write_to_the_folder(tmp_path):
    """A writer SIGKILLed mid-write leaves its temporary file, named for what it is; the next
    atomic write of any file in that folder removes it, and leaves a live writer's alone."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out / name)], stdout=subprocess.PIPE,
                              text=True) for name in ("model-Q4.gguf", "other.yaml")]
    try:
        temps = [Path(p.stdout.readline().strip()) for p in procs]
        assert all(t.exists() for t in temps)
        assert temps[0].name.startswith(f".model-Q4.gguf.dynsearch-{atomic._host()}-{procs[0].pid}.")
        assert all(t.name.endswith(".tmp") for t in temps)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        assert temps[0].exists()  # a SIGKILL skips the cleanup
        atomic.atomic_write_text(out / "report.json", "{}")  # another file, same folder
        assert not temps[0].exists() and temps[1].exists()  # the dead writer's only
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sorted(os.listdir(out)) == sorted(["report.json", temps[1].name])


def test_temps_of_other_hosts_and_foreign_files_are_kept(tmp_path):
    dead = 2**22 + 12345  # above pid_max on Linux: no such process
    host = atomic._host()
    keep = [f".a.gguf.dynsearch-otherhost{host}-{dead}.abc123.tmp",  # another machine's writer
            f".a.gguf.{host}-{dead}.abc123.tmp",  # not named by this dynsearch
            f".a.dynsearch-{host}-{dead}.gguf",  # not a temporary name
            f".x.dynsearch-{host}-{dead}.y.dynsearch-{host}-{os.getpid()}.abc.tmp"]  # live writer
    gone = [f".a.gguf.dynsearch-{host}-{dead}.abc123.tmp", f".{'n' * 100}.dynsearch-{host}-{dead}.q_1.tmp"]
    for n in keep + gone:
        (tmp_path / n).write_text("partial")
    assert sorted(p.name for p in atomic.remove_stale_temps(tmp_path)) == sorted(gone)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


# ----------------------------------------------------------------------------- the CLI's repros


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny llama GGUF, a recipe for it, and a folder to work in."""
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    u32 = gguf.GGUFValueType.UINT32
    kv = {"llama.block_count": (1, u32), "llama.embedding_length": (64, u32),
          "llama.attention.head_count": (2, u32), "llama.feed_forward_length": (64, u32),
          "llama.attention.layer_norm_rms_epsilon": (1e-5, gguf.GGUFValueType.FLOAT32)}
    tensors = {"token_embd.weight": rng.standard_normal((32, 64)).astype(np.float32),
               "blk.0.attn_norm.weight": np.ones(64, np.float32),
               "blk.0.attn_q.weight": rng.standard_normal((64, 64)).astype(np.float32)}
    write_model(d / "model.gguf", "llama", None, kv, tensors)
    types = {"token_embd.weight": "Q8_0", "blk.0.attn_norm.weight": "F32", "blk.0.attn_q.weight": "Q8_0"}
    schema.save(Recipe(name="tiny-q8", model=ModelInfo("tiny", "llama"), tensors=types), d / "r.yaml")
    return d


@pytest.fixture
def work(files, tmp_path) -> Path:
    for f in ("model.gguf", "r.yaml"):
        shutil.copy(files / f, tmp_path / f)
    return tmp_path


def test_apply_and_export_work(work, capsys):
    """The control: the same commands with a fresh output write it."""
    assert main(["apply", str(work / "r.yaml"), str(work / "model.gguf"), "-o", str(work / "out.gguf"),
                 "--quiet"]) == 0
    assert main(["export", str(work / "r.yaml"), "--to", "llama-quantize", "--model", str(work / "model.gguf"),
                 "-o", str(work / "types.txt")]) == 0
    assert (work / "out.gguf").stat().st_size > 1000 and "^token_embd" in (work / "types.txt").read_text()


@pytest.mark.parametrize("cmd", ["apply", "export"])
@pytest.mark.parametrize("target", ["model", "model-dotdot", "model-symlink", "model-hardlink", "recipe"])
def test_an_output_onto_an_input_is_refused(work, capsys, cmd, target):
    """issue 14 item 2: ``export r.yaml --to llama-quantize --model model.gguf -o model.gguf``
    left 616 bytes of text where the model was; ``apply r.yaml model.gguf -o r.yaml`` likewise."""
    (work / "sub").mkdir()
    (work / "link.gguf").symlink_to(work / "model.gguf")
    os.link(work / "model.gguf", work / "hard.gguf")
    out = {"model": work / "model.gguf", "model-dotdot": work / "sub" / ".." / "model.gguf",
           "model-symlink": work / "link.gguf", "model-hardlink": work / "hard.gguf", "recipe": work / "r.yaml"}[target]
    before = snapshot(work)
    argv = (["apply", work / "r.yaml", work / "model.gguf", "-o", out] if cmd == "apply" else
            ["export", work / "r.yaml", "--to", "llama-quantize", "--model", work / "model.gguf", "-o", out])
    code, err = run_cli(argv, capsys)
    assert_one_line(code, err, "the output would overwrite the input")
    assert snapshot(work) == before


def test_export_refuses_a_command_that_would_overwrite_its_model(work, capsys):
    before = snapshot(work)
    code, err = run_cli(["export", work / "r.yaml", "--to", "llama-quantize", "--model", work / "model.gguf",
                         "--gguf", work / "sub" / ".." / "model.gguf"], capsys)
    assert_one_line(code, err, "would overwrite the input")
    assert snapshot(work) == before


@pytest.mark.parametrize("cmd", ["apply", "export"])
@pytest.mark.parametrize("case,message", [
    ("folder", "is a folder"), ("under-file", "is not a folder"), ("long-name", "a name of 300 bytes"),
    ("device", "is not a regular file"), ("read-only-folder", "cannot write in the folder"),
    ("read-only-file", "is read-only"),
])
def test_output_places_are_checked_before_the_work(work, capsys, monkeypatch, cmd, case, message):
    """issue 14 item 6: ``apply -o <a folder>`` raised IsADirectoryError after writing the whole
    GGUF; ``-o <file>/x``, 300-character names, read-only places and ``export -o`` the same."""
    from dynsearch.recipes import apply

    (work / "ro").mkdir()
    (work / "ro" / "old.gguf").write_bytes(b"mine")
    out = {"folder": work, "under-file": work / "r.yaml" / "x.gguf", "long-name": work / ("n" * 300),
           "device": "/dev/null", "read-only-folder": work / "ro" / "new.gguf",
           "read-only-file": work / "ro" / "old.gguf"}[case]
    planned = []  # the work: apply plans its tensors first
    monkeypatch.setattr(apply, "plan_tensors", lambda *a, **k: planned.append(1) or [])
    argv = (["apply", work / "r.yaml", work / "model.gguf", "-o", out] if cmd == "apply" else
            ["export", work / "r.yaml", "--to", "llama-quantize", "-o", out])
    with contextlib.ExitStack() as stack:
        if case.startswith("read-only"):
            stack.enter_context(read_only(work / "ro" if case == "read-only-folder" else Path(out)))
        before = snapshot(work)
        code, err = run_cli(argv, capsys)
    assert_one_line(code, err, message)
    assert not planned and snapshot(work) == before


def test_a_folder_as_the_recipe_is_one_line(work, capsys):
    code, err = run_cli(["apply", work, work / "model.gguf", "-o", work / "out.gguf"], capsys)
    assert_one_line(code, err, "is a folder, not a recipe file")
    code, err = run_cli(["export", work, "--to", "llama-quantize"], capsys)
    assert_one_line(code, err, "is a folder, not a recipe file")
    code, err = run_cli(["apply", work / "r.yaml", work / "model.gguf", "-o", work / "o.gguf", "--imatrix",
                         work], capsys)
    assert_one_line(code, err, "not a file, cannot be an imatrix")


@pytest.mark.parametrize("case,message", [
    ("root-file", "is not a folder"), ("root-devnull", "is not a folder"),
    ("root-read-only", "cannot write in the folder"), ("readme-read-only", "README.md: is read-only"),
    ("dest-folder", "is a folder"), ("long-name", "a name of 305 bytes"),
])
def test_publish_places_are_checked_before_anything_is_written(work, capsys, case, message):
    """issue 14 item 6: ``publish --root <file>``, ``/dev/null`` or a read-only root raised
    tracebacks; nothing is written, not even the README, when the recipe cannot be."""
    root = work / "collection"
    (root / "tiny").mkdir(parents=True)
    (root / "README.md").write_text("# mine\n")
    args = ["publish", work / "r.yaml"]
    if case == "root-file":
        args += ["--root", work / "r.yaml"]
    elif case == "root-devnull":
        args += ["--root", "/dev/null"]
    else:
        args += ["--root", root]
    if case == "dest-folder":
        (root / "tiny" / "tiny-q8.yaml").mkdir()
    if case == "long-name":
        args += ["--name", "n" * 300]
    with contextlib.ExitStack() as stack:
        if case == "root-read-only":
            stack.enter_context(read_only(root / "tiny"))
        if case == "readme-read-only":
            stack.enter_context(read_only(root / "README.md"))
        before = snapshot(work)
        code, err = run_cli(args, capsys)
    assert_one_line(code, err, message)
    assert snapshot(work) == before


def test_publish_does_not_rewrite_its_input_in_place(work, capsys):
    """A recipe at its own published place is not rewritten (here: into the canonical form)."""
    root = work / "collection"
    assert main(["publish", str(work / "r.yaml"), "--root", str(root)]) == 0
    published = root / "tiny" / "tiny-q8.yaml"
    assert main(["publish", str(published), "--root", str(root)]) == 0  # already canonical: fine
    published.write_text(published.read_text().replace("tensors:", "tensors:  "))  # same recipe
    before = snapshot(work)
    code, err = run_cli(["publish", work / "collection" / "tiny" / ".." / "tiny" / "tiny-q8.yaml",
                         "--root", root], capsys)
    assert_one_line(code, err, "the output would overwrite the input")
    assert snapshot(work) == before
