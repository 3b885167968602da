"""``python -m dynsearch.bench``: one entry point for every benchmark and tool, none of them
reachable from the product."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from dynsearch.bench.__main__ import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
PRODUCT = ("dynsearch", "kernels", "objectives", "search", "recipes")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _defines(tree: ast.Module, name: str) -> bool:
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body)


def test_every_module_with_a_main_is_a_subcommand_and_none_runs_as_a_script():
    with_main = set()
    for path in BENCH.glob("*.py"):
        if path.name == "__main__.py":
            continue
        tree = _tree(path)
        if _defines(tree, "main"):
            with_main.add(path.stem)
            assert _defines(tree, "add_arguments"), f"{path.name}: main without add_arguments"
        assert "__main__" not in path.read_text(), f"{path.name} runs as a script: use python -m dynsearch.bench"
    assert with_main == {m.__name__.rsplit(".", 1)[1] for m, _ in COMMANDS.values()}
    assert set(COMMANDS) >= {"quality", "kernels", "forward", "device", "memory", "lossless", "synthetic",
                             "llamacpp"}


def test_no_product_module_imports_bench():
    offenders = []
    for pkg in PRODUCT:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(_tree(path)):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                if any(n == "dynsearch.bench" or n.startswith("dynsearch.bench.") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_cli_has_no_benchmark_subcommand():
    from dynsearch.cli import build_parser as cli_parser

    sub = next(a for a in cli_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "run" in sub.choices and not any("bench" in name for name in sub.choices)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m dynsearch.bench {name}")


def test_top_level_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert f"    {name} " in text


def test_llamacpp_actions_are_nested_subcommands(capsys):
    args = build_parser().parse_args(["llamacpp", "build", "-j", "3", "--portable"])
    assert (args.action, args.jobs, args.portable, args.force) == ("build", 3, True, False)
    assert build_parser().parse_args(["llamacpp", "where"]).action == "where"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["llamacpp"])  # an action is required
    capsys.readouterr()


def test_a_user_error_is_one_line_and_exit_1(capsys):
    assert main(["lossless"]) == 1  # neither MODEL and IMATRIX nor --share
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m dynsearch.bench: error: ") and "IMATRIX" in err


def test_bad_synthetic_shape_is_one_line(tmp_path, capsys):
    assert main(["synthetic", str(tmp_path / "m.gguf"), "--arch", "qwen3moe", "--experts", "4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n_expert_used" in err
    assert not (tmp_path / "m.gguf").exists()


def test_kernels_types_are_parsed_at_the_edge(capsys):
    from dynsearch.kernels.types import QT

    args = build_parser().parse_args(["kernels", "--types", "q4_k, Q8_0"])
    assert args.types == [QT.Q4_K, QT.Q8_0]
    assert build_parser().parse_args(["kernels"]).types == []
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["kernels", "--types", "Q4_K,Q9_X"])
    assert e.value.code == 2 and "Q9_X" in capsys.readouterr().err


def test_module_entry_point_runs():
    """The real ``python -m dynsearch.bench`` (its package import, argparse, exit status)."""
    r = subprocess.run([sys.executable, "-m", "dynsearch.bench", "--help"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert all(name in r.stdout for name in COMMANDS)
    r = subprocess.run([sys.executable, "-m", "dynsearch.bench", "no-such-benchmark"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "invalid choice" in r.stderr
