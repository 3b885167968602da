"""The ``dynsearch`` command line. Each subcommand lives in the module that implements it;
this file only maps arguments to those entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dynsearch import __version__
from dynsearch.atomic import atomic_write_text, check_output
from dynsearch.errors import DynsearchError
from dynsearch.kernels import dequantizable_types, quantizable_types, type_info
from dynsearch.objectives.compare import run_eval
from dynsearch.objectives.forward import check_device
from dynsearch.objectives.mmlu import run_file
from dynsearch.recipes import schema
from dynsearch.recipes.apply import ImatrixFile, apply_recipe
from dynsearch.recipes.export import export_llama_quantize
from dynsearch.recipes.publish import publish
from dynsearch.search.cluster import BACKENDS
from dynsearch.search.run import proxy_check
from dynsearch.search.run.config import DEFAULT_TYPES, RunConfig, default
from dynsearch.search.run.cost import estimate, format_taken
from dynsearch.search.run.pipeline import run
from dynsearch.search.run.plots import make_plots
from dynsearch.search.run.prepare import RunModel
from dynsearch.search.run.report import print_summary
from dynsearch.search.run.status import format_table, storage_status
from dynsearch.search.run.storage import open_storage, redact
from dynsearch.search.run.worker import RUN_ID_ENV, STORAGE_ENV, Local, join
from dynsearch.search.space import EXPERT_GROUPINGS
from dynsearch.search.study import SAMPLERS


def _cmd_types(args: argparse.Namespace) -> int:
    writable = set(quantizable_types())
    print(f"{'type':8} {'block':>5} {'bytes':>5} {'bpw':>6}  {'fallback':8} {'quantize':8}")
    for qt in dequantizable_types():
        info = type_info(qt)
        fb = info.fallback.name if info.fallback else "-"
        print(f"{info.name:8} {info.block_size:>5} {info.type_size:>5} {info.bits_per_weight:>6.3f}  "
              f"{fb:8} {'yes' if qt in writable else 'read-only':8}")
    return 0


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of ``run`` / ``proxy-check`` arguments, parsed and checked (options a command
    lacks: RunConfig's defaults)."""
    types = tuple(t.strip() for t in args.types.split(",")) if args.types else DEFAULT_TYPES
    extra = {k: getattr(args, k) for k in ("trials", "timeout", "sampler", "storage", "study_name",
                                           "search_workers", "group_experts") if hasattr(args, k)}
    return RunConfig.parse(args.model, args.budget, types, args.keep,
                           calib=args.calib, calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens,
                           search_tokens=args.search_tokens, fisher_tokens=args.fisher_tokens,
                           seed=args.seed, workers=args.workers, out=args.out, device=args.device,
                           write_gguf=not getattr(args, "no_gguf", False), cache=args.cache,
                           joblib_backend=args.joblib_backend, dask_scheduler=args.dask_scheduler, **extra)


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    # a bad or unreachable --storage is an error before any work (--estimate creates nothing)
    storage = open_storage(cfg.storage, create=not args.estimate) if cfg.storage else None
    model = RunModel.open(cfg.model)
    est = None
    if args.estimate or not args.no_estimate:
        est = estimate(model.source, cfg)
        print(est.format(), flush=True)
        if args.estimate:
            return 0
    result = run(cfg, model, storage, progress=not args.quiet)
    print_summary(cfg, result)
    print(format_taken(result.seconds, est))
    return 0


def _cmd_proxy_check(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    return proxy_check.main(cfg, RunModel.open(cfg.model), n=args.n, min_spearman=args.min_spearman,
                            progress=not args.quiet)


def _cmd_apply(args: argparse.Namespace) -> int:
    check_output(args.output, (args.recipe, args.model, args.imatrix))
    recipe = schema.load(args.recipe)
    imatrix = ImatrixFile.read(args.imatrix) if args.imatrix else None
    path = apply_recipe(recipe, args.model, args.output, importance=imatrix, progress=not args.quiet)
    print(f"wrote {path} ({path.stat().st_size:,} bytes; {len(recipe.tensors)} tensors, "
          f"{len(recipe.types_histogram())} types)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.output:
        check_output(args.output, (args.recipe, args.model, args.imatrix))
    recipe = schema.load(args.recipe)
    types_path = args.output or f"{recipe.name}.tensor-types.txt"
    ex = export_llama_quantize(recipe, types_path, model=args.model, output=args.gguf,
                               imatrix=args.imatrix)
    if args.output:
        atomic_write_text(args.output, ex.tensor_types)
        print(f"wrote {args.output} ({len(recipe.tensors)} tensors); reproduce the GGUF with:")
        print(ex.command_line())
    else:  # the file on stdout, the command (which names it) on stderr
        sys.stdout.write(ex.tensor_types)
        print(ex.command_line(), file=sys.stderr)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    check_device(args.device)
    cands = [Path(c) for c in ([args.candidate] if args.candidate else []) + args.compare]
    print(run_eval(cands, Path(args.ref), text=Path(args.text) if args.text else None, n_tokens=args.tokens,
                   seq_len=args.seq_len, mc_items=args.mc, device=args.device,
                   json_out=Path(args.json) if args.json else None, progress=not args.quiet))
    return 0


def _cmd_mmlu(args: argparse.Namespace) -> int:
    check_device(args.device)
    r = run_file(args.model, args.mmlu, args.subjects, args.limit, args.shots, args.device, not args.quiet)
    print(r.table())
    if args.json:
        atomic_write_text(args.json, json.dumps({"model": args.model, **r.to_dict()}, indent=2) + "\n")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    r = publish(args.recipe, name=args.name, root=args.root, force=args.force)
    print(f"published {r.path}" if r.changed else f"{r.path}: already published, unchanged")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    url = args.storage or os.environ.get(STORAGE_ENV)
    if not url:
        raise DynsearchError(f"worker: give --storage URL (or set {STORAGE_ENV})")
    r = join(url, args.study_name, max_trials=args.trials, timeout=args.timeout,
             progress=not args.quiet, local=Local(args.joblib_backend, args.dask_scheduler, args.cache),
             wait_for=args.wait_for_study, say=lambda m: print(m, file=sys.stderr, flush=True),
             run_id=os.environ.get(RUN_ID_ENV) or None)
    print(f"worker: ran {r.ran} trials on {r.study_name!r} in {redact(url)}; "
          f"{r.complete} complete of {r.requested} requested")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    print(format_table(storage_status(open_storage(args.storage, create=False), args.study_name)))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    for path in make_plots(args.study, args.output, storage=args.storage, study_name=args.study_name,
                           budget=args.budget):
        print(path)
    return 0


def _model_options(s: argparse.ArgumentParser) -> None:
    """Options shared by the commands that profile a model (run, proxy-check)."""
    s.add_argument("model", help="a .gguf file, a Hugging Face folder, or an alias (smollm2-135m, llama4, ...)")
    s.add_argument("--budget", action="append", required=True,
                   help="file size (100MB, 16GB, 15GiB) or bits per weight (4.5bpw); repeat, or give a "
                        "range LOW..HIGH/N (60MB..120MB/4), for a family of recipes")
    s.add_argument("--types", default="",
                   help="comma-separated candidate types (default: the k-quants, IQ4_XS, IQ4_NL, Q4_0, "
                        "Q5_0, Q5_1, Q8_0; Q4_1 only when named)")
    s.add_argument("--keep", action="append", default=[], metavar="PATTERN=TYPE",
                   help="hold matching tensors at a type, e.g. 'token_embd=Q8_0' (repeatable)")
    s.add_argument("--calib", help="calibration file (.txt, or .jsonl of chat messages / text)")
    s.add_argument("--calib-tokens", type=int, default=default("calib_tokens"))
    s.add_argument("--fisher-tokens", type=int, default=default("fisher_tokens"))
    s.add_argument("--search-tokens", type=int, default=default("search_tokens"))
    s.add_argument("--eval-tokens", type=int, default=default("eval_tokens"))
    s.add_argument("--seed", type=int, default=default("seed"))
    s.add_argument("--workers", type=int, default=default("workers"),
                   help="profiling threads (--joblib-backend threading) or processes (loky) "
                        "(default: every core this process may use)")
    s.add_argument("--out", default=default("out"), help="output folder (default: %(default)s)")
    s.add_argument("--cache", help="statistics and profile cache folder, shared by workers on other "
                                   "machines when on a shared disk (default: OUT/cache)")
    _cluster_options(s)
    s.add_argument("--device", default=default("device"), help="torch device: cpu, cuda, cuda:1")
    s.add_argument("--quiet", action="store_true", help="no progress bars")


def _cluster_options(s: argparse.ArgumentParser) -> None:
    """Where profiling runs (run, proxy-check, worker)."""
    s.add_argument("--joblib-backend", default=default("joblib_backend"), choices=BACKENDS,
                   help="profile tensors in threads here, in loky processes here, or on a Dask "
                        "cluster (default: %(default)s)")
    s.add_argument("--dask-scheduler", metavar="ADDRESS",
                   help="Dask scheduler for --joblib-backend dask, e.g. tcp://head:8786 "
                        "(default: $DYNSEARCH_DASK_SCHEDULER)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynsearch", description="Search-based dynamic GGUF quantization.")
    p.add_argument("--version", action="version", version=f"dynsearch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("types", help="list the GGUF types dynsearch reads and writes")
    s.set_defaults(func=_cmd_types)
    s = sub.add_parser("run", help="search per-tensor types for a model under a disk budget")
    _model_options(s)
    s.add_argument("--trials", type=int, default=default("trials"), help="Optuna trials per budget (all workers)")
    s.add_argument("--timeout", type=float, help="seconds of search per budget for this process")
    s.add_argument("--sampler", default=default("sampler"), choices=SAMPLERS)
    s.add_argument("--group-experts", default=default("group_experts"), choices=EXPERT_GROUPINGS,
                   help="MoE expert stacks (ffn_*_exps) sharing one search variable: all layers' "
                        "stacks of a kind, a layer's three stacks, or none (per kind and layer band "
                        "like other tensors) (default: %(default)s)")
    s.add_argument("--storage", help="Optuna storage URL (default: SQLite in the run folder)")
    s.add_argument("--study-name")
    s.add_argument("--search-workers", type=_positive_int, default=default("search_workers"), metavar="N",
                   help="processes scoring trials of each study together, this one included "
                        "(each loads the model; see also `dynsearch worker`)")
    s.add_argument("--no-gguf", action="store_true", help="write the recipe only")
    s.add_argument("--estimate", "--dry-run", action="store_true",
                   help="print the estimated time, memory and disk of the run on this machine, and exit")
    s.add_argument("--no-estimate", action="store_true", help="do not print the estimate before the run")
    s.set_defaults(func=_cmd_run)
    s = sub.add_parser("proxy-check", help="rank correlation of the proxy with true KL over random "
                                           "feasible assignments")
    _model_options(s)
    s.add_argument("--n", type=_positive_int, default=30, help="random assignments (default: %(default)s)")
    s.add_argument("--min-spearman", type=float, default=None,
                   help="exit with status 1 when the Spearman correlation is below this")
    s.set_defaults(func=_cmd_proxy_check)
    s = sub.add_parser("worker", help="join a study made by `dynsearch run` and score its trials")
    s.add_argument("--storage", help="the study's storage URL: sqlite:///..., postgresql://..., "
                                     "journal:///shared/study.log (default: $DYNSEARCH_STORAGE)")
    s.add_argument("--study-name", required=True)
    s.add_argument("--trials", type=_positive_int, help="at most this many trials from this process "
                                                        "(default: until the study has its count)")
    s.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    s.add_argument("--wait-for-study", type=_non_negative_float, default=0.0, metavar="SECONDS",
                   help="when the study does not exist yet, wait this long for `dynsearch run` to "
                        "create it (workers started together with the run) (default: %(default)s)")
    s.add_argument("--cache", help="the run's cache folder as this machine mounts it "
                                   "(default: the path the run stored)")
    _cluster_options(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_worker)
    s = sub.add_parser("status", help="progress and best so far of the studies in a storage")
    s.add_argument("--storage", required=True, help="storage URL (sqlite:///..., postgresql://..., "
                                                    "journal:///...)")
    s.add_argument("--study-name", help="one study (default: all)")
    s.set_defaults(func=_cmd_status)
    s = sub.add_parser("plot", help="PNG plots of a run: Pareto front of its trials, per-layer type heatmap")
    s.add_argument("study", nargs="?", help="a run folder (its study.db and recipes), or a recipe .yaml "
                                            "(heatmap only)")
    s.add_argument("--storage", help="the studies' storage URL, as for `dynsearch status`")
    s.add_argument("--study-name", help="one study (default: all in the storage)")
    s.add_argument("--budget", help="only the study of this budget (e.g. 100MB)")
    s.add_argument("-o", "--output", help="folder for the PNGs (default: the run folder, or the "
                                          "recipe's folder; the current folder with --storage alone)")
    s.set_defaults(func=_cmd_plot)
    s = sub.add_parser("apply", help="write a recipe's GGUF from a source GGUF (our kernels)")
    s.add_argument("recipe", help="recipe YAML")
    s.add_argument("model", help="source .gguf (F32/F16/BF16, or quantized: dequantized first)")
    s.add_argument("-o", "--output", required=True, help="GGUF to write")
    s.add_argument("--imatrix", help="importance matrix (llama-imatrix's GGUF or legacy .dat)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_apply)
    s = sub.add_parser("export", help="a recipe as llama-quantize's --tensor-type-file and command line")
    s.add_argument("recipe", help="recipe YAML")
    s.add_argument("--to", required=True, choices=["llama-quantize"], help="target tool")
    s.add_argument("-o", "--output", help="tensor-type file to write (default: print it to stdout)")
    s.add_argument("--model", help="source .gguf for the command line (checked against the recipe)")
    s.add_argument("--imatrix", help="imatrix file for the command line")
    s.add_argument("--gguf", help="output GGUF named in the command line (default: RECIPE_NAME.gguf)")
    s.set_defaults(func=_cmd_export)
    s = sub.add_parser("eval", help="KL statistics of GGUF files vs a reference (llama-perplexity --kl-divergence)")
    s.add_argument("candidate", nargs="?", help="candidate .gguf (or use --compare)")
    s.add_argument("--ref", required=True, help="reference .gguf (e.g. the F32/F16/BF16 model)")
    s.add_argument("--compare", nargs="+", default=[], metavar="GGUF", help="several candidates side by side")
    s.add_argument("--text", help="evaluation text, .txt or .jsonl (default: the shipped held-out set)")
    s.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (default: %(default)s)")
    s.add_argument("--seq-len", type=int, default=512, help="chunk length, second half scored (default: %(default)s)")
    s.add_argument("--mc", type=int, default=100, metavar="N",
                   help="multiple-choice items for answer flips, 0 for none (default: %(default)s)")
    s.add_argument("--json", help="also write the results to this JSON file")
    s.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_eval)
    s = sub.add_parser("mmlu", help="MMLU 5-shot accuracy of a GGUF (hendrycks/test prompt format)")
    s.add_argument("model", help="a .gguf file")
    s.add_argument("--mmlu", help="folder with dev/ and test/ CSVs as hendrycks/test publishes them "
                                  "(default: the shipped copy)")
    s.add_argument("--subjects", nargs="+", help="subjects to run (default: all)")
    s.add_argument("--limit", type=int, help="first N test questions of each subject")
    s.add_argument("--shots", type=int, default=5, help="dev-set examples in each prompt (default: %(default)s)")
    s.add_argument("--json", help="also write the results to this JSON file")
    s.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_cmd_mmlu)
    s = sub.add_parser("publish", help="validate a recipe and add it to recipes/<model>/ with the README index")
    s.add_argument("recipe", help="recipe YAML")
    s.add_argument("--name", help="publish under this name (default: the recipe's own)")
    s.add_argument("--root", default="recipes", help="collection folder (default: %(default)s)")
    s.add_argument("--force", action="store_true", help="replace a different recipe of the same name")
    s.set_defaults(func=_cmd_publish)
    return p


def _non_negative_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return x


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DynsearchError as e:
        print(f"dynsearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
