"""What users type: every bad ``dynsearch run`` input is one clear error line (exit status 2) before
any work, and a password in a storage URL never reaches the output or the logs."""

from __future__ import annotations

import logging

import pytest

from dynsearch import cli
from dynsearch.search.budget import parse_budget
from dynsearch.search.run import prepare
from dynsearch.search.run.config import RunConfig, default

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def never_runs(monkeypatch):
    """Fail the test if a bad input got past the checks into the costly part of the run."""
    def boom(*a, **k):
        raise AssertionError("the run started despite a bad input")
    monkeypatch.setattr(prepare, "open_model", boom)
    monkeypatch.setattr("dynsearch.objectives.io.resolve.open_model", boom)


def _run(capsys, *argv) -> str:
    rc = cli.main(["run", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynsearch: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv,message", [
    (["--budget", "100XB"], "invalid budget '100XB': unknown unit"),
    (["--budget=-5MB"], "invalid budget '-5MB'"),
    (["--budget", "0MB"], "must be positive"),
    (["--budget", "0.1bpw"], "bits per weight must lie in"),
    (["--budget", "lots"], "invalid budget 'lots'"),
    (["--budget", "1e400MB"], "invalid budget"),
    (["--budget", "100MB", "--keep", "token_embd"], "expected PATTERN=TYPE"),
    (["--budget", "100MB", "--keep", "([=Q8_0"], "bad pattern"),
    (["--budget", "100MB", "--keep", "token_embd=Q9_9"], "unknown GGUF type 'Q9_9'"),
    (["--budget", "100MB", "--types", "Q4_K,Q9"], "--types: 'Q9' is not a GGUF type"),
    (["--budget", "100MB", "--types", "Q4_K,IQ1_S"], "cannot write IQ1_S yet"),
    (["--budget", "100MB", "--types", "Q4_K,q4_k"], "Q4_K is listed twice"),
    (["--budget", "100MB", "--types", ","], "--types: '' is not a GGUF type"),
    (["--budget", "100MB", "--trials", "0"], "--trials must be a positive whole number, got 0"),
    (["--budget", "100MB", "--calib-tokens", "-1"], "--calib-tokens must be a positive"),
    (["--budget", "100MB", "--workers", "0"], "--workers must be a positive"),
    (["--budget", "100MB", "--timeout", "-3"], "--timeout must be a positive number"),
    (["--budget", "100MB", "--timeout", "nan"], "--timeout must be a positive number"),
    (["--budget", "100MB", "--calib", "/no/such/calib.jsonl"], "--calib /no/such/calib.jsonl: no such file"),
    (["--budget", "100MB", "--storage", "nonsense"], "not a URL"),
    (["--budget", "100MB", "--storage", "journal://"], "journal:// needs a file path"),
    (["--budget", "100MB", "--seed", "-1"], "--seed must be a whole number from 0 to 4294967295"),
    (["--budget", "100MB", "--seed", str(2**70)], "--seed must be a whole number from 0 to 4294967295"),
    (["--budget", "100MB", "--device", "nonsense"], "--device 'nonsense': not a torch device"),
    (["--budget", "100MB", "--device", "cuda:99"], "--device cuda:99: "),
    (["--budget", "100MB", "--budget", "1MB..2MB/1000000000"], "N <= 64"),
])
def test_bad_run_arguments(capsys, never_runs, argv, message):
    line = _run(capsys, "smollm2-135m", *argv)
    assert message in line


@pytest.mark.parametrize("option", ["--out", "--cache"])
def test_bad_out_folder(capsys, never_runs, tmp_path, option):
    (tmp_path / "file").write_text("x")
    line = _run(capsys, "smollm2-135m", "--budget", "100MB", option, str(tmp_path / "file"))
    assert f"{option} {tmp_path / 'file'}: exists and is not a folder" in line
    line = _run(capsys, "smollm2-135m", "--budget", "100MB", option, str(tmp_path / "file" / "a" / "b"))
    assert line.endswith(f"{tmp_path / 'file'} is not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("command", ["eval", "mmlu"])
def test_bad_device_of_eval_and_mmlu_is_one_line(capsys, tmp_path, command):
    argv = [command, str(tmp_path / "m.gguf"), "--device", "nonsense"]
    if command == "eval":
        argv += ["--ref", str(tmp_path / "ref.gguf")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dynsearch: error: --device 'nonsense': not a torch device (use cpu, cuda or cuda:N)"]


def test_bad_model_paths(capsys, tmp_path):
    assert "no such file or folder, and not a known alias" in _run(capsys, str(tmp_path / "absent.gguf"), "--budget", "1GB")
    assert "not a known alias" in _run(capsys, "no-such-alias", "--budget", "1GB")
    (tmp_path / "folder").mkdir()
    assert "needs config.json" in _run(capsys, str(tmp_path / "folder"), "--budget", "1GB")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    line = _run(capsys, str(tmp_path / "junk.gguf"), "--budget", "1GB", "--out", str(tmp_path / "runs"))
    assert "junk.gguf" in line


SECRET = "s3cr3t-Pa55"
URLS = [f"postgresql://dyn:{SECRET}@127.0.0.1:1/study",
        f"postgresql+psycopg://dyn:{SECRET}@127.0.0.1:1/study?sslmode=disable",
        f"mysql://root:{SECRET}@127.0.0.1:1/study",
        f"postgresql://127.0.0.1:1/study?user=dyn&password={SECRET}",
        f"sqlite:///{'/proc/no/such/dir'}/study.db?password={SECRET}",
        f"nosuchdialect://dyn:{SECRET}@host/db"]


@pytest.mark.parametrize("url", URLS)
def test_storage_credentials_never_printed_or_logged(capsys, caplog, never_runs, url):
    caplog.set_level(logging.DEBUG)
    line = _run(capsys, "smollm2-135m", "--budget", "100MB", "--storage", url)
    assert "storage" in line and "***" in line
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in line and SECRET not in logged


def test_redact_is_what_hides_the_password():
    """The control for the test above: the URLs do carry the secret until redacted."""
    from dynsearch.search.run.storage import redact

    for url in URLS:
        assert SECRET in url and SECRET not in redact(url)
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_valid_config_is_parsed_once_into_typed_values(tmp_path):
    cfg = RunConfig.parse("x", ["100MB", "4.5bpw", "100MB", "90MB..110MB/3"], ["Q4_K", "iq4_xs"],
                          ["token_embd=q8_0"], out=str(tmp_path / "runs"))
    assert cfg.budgets == tuple(parse_budget(b) for b in ("100MB", "4.5bpw", "90MB", "110MB"))  # repeats once
    assert cfg.types == ("Q4_K", "IQ4_XS")
    assert [(k.pattern.pattern, k.qtype) for k in cfg.keep] == [("token_embd", "Q8_0")]
    assert not (tmp_path / "runs").exists()  # parsing creates nothing


def test_storage_is_opened_before_the_model(never_runs, tmp_path):
    db = tmp_path / "study.db"
    with pytest.raises(AssertionError, match="despite a bad input"):  # never_runs: the model's opening
        cli.main(["run", "smollm2-135m", "--budget", "100MB", "--out", str(tmp_path / "runs"),
                  "--storage", f"sqlite:///{db}"])
    assert db.exists()


def test_command_line_defaults_are_the_configs():
    args = cli.build_parser().parse_args(["run", "x", "--budget", "1GB"])
    names = ("calib_tokens", "fisher_tokens", "search_tokens", "eval_tokens", "seed", "workers", "out",
             "device", "joblib_backend", "trials", "sampler", "group_experts", "search_workers")
    assert {n: getattr(args, n) for n in names} == {n: default(n) for n in names}
    cfg = cli._run_config(args)
    assert cfg == RunConfig.parse("x", ["1GB"])  # every option a user leaves out: RunConfig's default
