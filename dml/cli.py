"""`dml` command line: train, eval, export, runs, list, bench, app."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from dml.config import ConfigError, RunConfig, load_config
from dml.runs import DEFAULT_RUNS_ROOT, RunFormatError


def _runs_root(args) -> str:
    return args.runs_dir or os.environ.get("DML_RUNS", DEFAULT_RUNS_ROOT)


def build_config(args) -> RunConfig:
    """Config file (if any), then the explicit flags, then --set overrides."""
    cfg = load_config(args.config) if args.config else RunConfig()
    flags = []
    for flag, key in (("dataset", "data.name"), ("data_root", "data.root"),
                      ("loss", "loss.name"), ("mixing", "mixing.name"),
                      ("model", "model.name"), ("epochs", "train.epochs"),
                      ("seed", "train.seed"), ("device", "train.device"),
                      ("lr", "train.lr"), ("name", "name")):
        value = getattr(args, flag, None)
        if value is not None:
            flags.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return cfg.with_overrides(flags + list(args.set or []))


def cmd_train(args) -> int:
    from dml.config import resolve_versions, validate
    from dml.train import train

    if args.nproc is not None and not (args.print_config or args.dry_run):
        return _torchrun(args)
    if args.resume:
        if args.print_config or args.dry_run:
            raise ConfigError("--print-config and --dry-run describe a new run; a resumed run's "
                              "config is its config.json")
        from dml.train import resume

        path = resume(args.resume, progress=not args.quiet)
        print(path)
        return 0
    from dml.train import check_config

    cfg = build_config(args)
    check_config(cfg)
    if args.print_config:
        print(json.dumps(resolve_versions(cfg).to_dict(), indent=2))
        return 0
    if args.dry_run:
        validate(cfg)
        print(f"config valid: {cfg.data.name} / {cfg.model.name} / {cfg.loss.name} / "
              f"{cfg.mixing.name}, {cfg.train.epochs} epochs (nothing trained; the data set is "
              f"checked when training starts)")
        return 0
    path = train(cfg, _runs_root(args), progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:    # one line from a torchrun job, rank 0's
        print(path)
    return 0


def _torchrun(args) -> int:
    """``dml train --nproc N ...``: the same command under PyTorch's own launcher, one
    process per rank on this machine (``torchrun --standalone``)."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc inside a torchrun job: drop --nproc (torchrun already "
                          "started the processes)")
    argv, rest = list(args.argv or sys.argv[1:]), []
    while argv:                                 # the arguments without --nproc N
        a = argv.pop(0)
        if a == "--nproc":
            argv.pop(0)
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "dml.cli", *rest]
    return subprocess.call(cmd)


def cmd_list(args) -> int:
    """What can be named in a run config, with parameters and defaults."""
    from dml.data import DATASETS
    from dml.losses import LOSSES, loss_defaults
    from dml.mixing import MIXINGS, compatible_losses, mixing_params
    from dml.models import model_params

    def params_text(params: dict) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in params.items()) or "(none)"

    def doc(obj) -> str:   # the docstring's first sentence
        first = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
        return first.split(". ")[0].rstrip(".").replace("``", "")

    if args.what == "losses":
        for name, cls in LOSSES.items():
            strategies = [m for m in MIXINGS if name in compatible_losses(m)]
            print(f"{name}  ({doc(cls)})\n    parameters: {params_text(loss_defaults(name))}\n"
                  f"    mixing: {', '.join(strategies)}")
    elif args.what == "mixings":
        for name, cls in MIXINGS.items():
            print(f"{name}  ({doc(cls)})\n    parameters: {params_text(mixing_params(name))}\n"
                  f"    losses ({cls.requires}): {', '.join(compatible_losses(name))}"
                  + ("; needs the model" if cls.needs_model else ""))
    elif args.what == "models":
        for name, params in model_params().items():
            print(f"{name}\n    parameters: {params_text(params)}")
    else:
        for name, spec in DATASETS.items():
            print(f"{name}  ({spec.description})\n    {spec.channels} channel(s), default "
                  f"{spec.default_image_size} px, split: {spec.default_split}"
                  + ("" if spec.needs_root else ", built in"))
    return 0


def cmd_eval(args) -> int:
    from dml.evaluation import evaluate_run

    result = evaluate_run(args.run, runs_root=_runs_root(args), tag=args.checkpoint,
                          device=args.device or "auto", dataset=args.dataset,
                          data_root=args.data_root)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"run {result['run']}  checkpoint {result['checkpoint']} (epoch {result['epoch']})"
              f"  data {result['dataset']}")
        for split, metrics in result["metrics"].items():
            print(f"  {split:>5}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_export(args) -> int:
    """``dml export RUN --format ...``: notes on stderr, then the check's ``ok: ...`` line and
    the export's folder on stdout (the folder last, as ``dml train`` prints its run)."""
    from dml.export import export_run

    result = export_run(args.run, args.format, args.out, epoch=args.epoch, split=args.split,
                        synthetic=not args.no_synthetic, sprite=not args.no_sprite,
                        max_points=args.max_points, data_root=args.data_root, force=args.force,
                        runs_root=_runs_root(args),
                        log=lambda m: print(f"dml export: {m}", file=sys.stderr, flush=True))
    print(result.check)
    print(result.path)
    return 0


def cmd_runs(args) -> int:
    """The table of runs under the runs root. A run that cannot be read (a garbage config.json,
    status.json or metrics.jsonl, another format version) gets a row marked 'unreadable' and,
    after the table, a line naming the file and the error; the other runs are listed as
    usual."""
    from dml.runs import summarize_runs

    from dml.maps import maps_text

    summaries, unreadable = summarize_runs(_runs_root(args))
    rows = []
    for s in summaries:
        prog = s["progress"] if isinstance(s["progress"], dict) else {}
        state = str(s["state"])
        if state == "finished" and maps_text(s.get("maps")):
            state += f" ({maps_text(s.get('maps'))})"
        val = s["val"] if isinstance(s["val"], dict) else {}
        test = s["test"] if isinstance(s["test"], dict) else {}
        rows.append([s["id"], str(s["dataset"]), str(s["loss"]), str(s["mixing"]),
                     str(s["seed"]),
                     state + (f" {prog.get('epoch')}/{prog.get('epochs')}"
                              if state == "running" and prog else ""),
                     _fmt(val.get("recall@1")), _fmt(test.get("recall@1")),
                     _fmt(test.get("map@r")), _fmt_time(s["elapsed_s"])])
    for exc in unreadable:
        rows.append([exc.parts()["run"] or "?", "", "", "", "", "unreadable", "", "", "", ""])
    rows.sort(key=lambda r: r[0], reverse=True)     # newest first, unreadable runs in place
    if not rows:
        print(f"no runs under {_runs_root(args)}")
        return 0
    head = ["run", "data", "loss", "mixing", "seed", "state", "val R@1", "test R@1",
            "test MAP@R", "time"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if unreadable:
        print(f"\n{len(unreadable)} unreadable run(s):")
        for exc in unreadable:
            part = exc.parts()
            where = f"{part['run']}/{part['file']}" if part["file"] else part["run"]
            print(f"  {where}: {part['error']}")
    return 0


def _fmt_time(seconds) -> str:
    try:
        return f"{float(seconds):.0f}s" if seconds else "-"
    except (TypeError, ValueError):
        return "-"


def _fmt(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def cmd_bench_claims(args) -> int:
    from dml.claims import GRIDS, run_grid
    from dml.report import report, write_section

    if args.grid not in GRIDS:
        raise ValueError(f"unknown grid {args.grid!r}; valid: {', '.join(GRIDS)}")
    backend = make_backend(args)
    seeds = list(range(args.seeds))
    base = list(args.set or [])
    result = run_grid(GRIDS[args.grid], args.dataset, seeds, args.runs_dir, base=base,
                      backend=backend, log=lambda m: print(m, file=sys.stderr, flush=True))
    if result.failed:
        print(f"dml bench: error: {len(result.failed)} of {len(result.failed) + result.trained}"
              f" runs failed (above); the finished ones are kept under {args.runs_dir}: rerun "
              "the same command to train only the missing runs", file=sys.stderr)
        return 1
    result.command = "dml " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    text = report(result, args.grid, args.dataset, seeds, base)
    if args.out:
        write_section(args.out, f"{args.grid}-{args.dataset}", text)
        print(f"wrote {args.out}", file=sys.stderr)
    print(text)
    return 0


BACKENDS = ("local", "ray")


def make_backend(args):
    """The grid backend of ``dml bench claims``: local processes (--jobs) or Ray tasks
    (--address, --cpus-per-run, --gpus-per-run); a wrong combination is a one-line error."""
    from dml.claims import BackendError, LocalBackend, RayBackend

    if args.backend not in BACKENDS:
        raise BackendError(f"unknown backend {args.backend!r}; valid: {', '.join(BACKENDS)}")
    ray_flags = [f for f, v in (("--address", args.address), ("--cpus-per-run", args.cpus_per_run),
                                ("--gpus-per-run", args.gpus_per_run)) if v is not None]
    if args.backend == "local":
        if ray_flags:
            raise BackendError(f"{', '.join(ray_flags)}: only with --backend ray")
        return LocalBackend(1 if args.jobs is None else args.jobs)
    if args.jobs is not None:
        raise BackendError("--jobs is for --backend local; with ray the runs at a time follow "
                           "--cpus-per-run, --gpus-per-run and the cluster's resources")
    return RayBackend(args.address or os.environ.get("RAY_ADDRESS") or "local",
                      cpus_per_run=1 if args.cpus_per_run is None else args.cpus_per_run,
                      gpus_per_run=0 if args.gpus_per_run is None else args.gpus_per_run)


def make_parser() -> argparse.ArgumentParser:
    from dml import __version__
    from dml.data import list_datasets
    from dml.losses import list_losses
    from dml.mixing import list_mixings
    from dml.models import list_models

    p = argparse.ArgumentParser(prog="dml", description="Tango: mixing for deep metric learning")
    p.add_argument("--version", action="version", version=f"tango-dml {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one run; prints its directory when done")
    t.add_argument("--config", help="TOML or JSON file with any RunConfig keys (e.g. the "
                   "papers' settings in configs/)")
    t.add_argument("--dataset", choices=list_datasets(), metavar="NAME",
                   help=f"data set: {', '.join(list_datasets())} (dml list datasets)")
    t.add_argument("--data-root", help="folder holding the data set's files")
    t.add_argument("--loss", choices=list_losses(), metavar="NAME",
                   help=f"loss: {', '.join(list_losses())} (dml list losses)")
    t.add_argument("--mixing", choices=list_mixings(), metavar="NAME",
                   help=f"mixing strategy: {', '.join(list_mixings())} (dml list mixings)")
    t.add_argument("--model", choices=list_models(), metavar="NAME",
                   help=f"model: {', '.join(list_models())} (dml list models)")
    t.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    t.add_argument("--seed", type=int, help="random seed (train.seed)")
    t.add_argument("--lr", type=float, help="learning rate (train.lr)")
    t.add_argument("--device", help="auto (default), cpu, cuda or cuda:N (train.device)")
    t.add_argument("--name", help="a label for the run (any text, e.g. 2024)")
    t.add_argument("--runs-dir", help=f"runs root (default $DML_RUNS or {DEFAULT_RUNS_ROOT})")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set loss.params.beta=40 (repeatable)")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last "
                   "complete epoch")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (with the method versions) and exit")
    t.add_argument("--dry-run", action="store_true",
                   help="check the config, every name and parameter, and exit without "
                        "training")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel in N processes on this machine (one per GPU, or "
                        "CPU processes with gloo): runs torchrun --standalone --nproc-per-node "
                        "N -m dml.cli train with the other arguments")
    t.set_defaults(func=cmd_train, argv=None)

    li = sub.add_parser("list", help="what a run config can name, with parameters and "
                        "defaults")
    li.add_argument("what", choices=("losses", "mixings", "models", "datasets"))
    li.set_defaults(func=cmd_list)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on its test split")
    e.add_argument("run", help="run directory or run id")
    e.add_argument("--checkpoint", default="best", choices=("best", "last", "untrained"),
                   help="which weights: best on validation, last, or the same architecture "
                   "freshly initialised with the run's seed (the untrained reference)")
    e.add_argument("--dataset", help="evaluate on another data set (same image format)")
    e.add_argument("--data-root", help="folder holding that data set's files")
    e.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    e.add_argument("--runs-dir", help=f"runs root (default $DML_RUNS or {DEFAULT_RUNS_ROOT})")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="export a run: TensorBoard projector folder, Hugging "
                       "Face-style model folder, torch.export (.pt2) or ONNX file")
    x.add_argument("run", help="run directory or run id")
    x.add_argument("--format", required=True, choices=("projector", "hf", "pt2", "onnx"),
                   help="projector: an evaluation's embeddings + metadata + sprite for "
                        "TensorBoard's projector; hf: config.json + model.safetensors; pt2: "
                        "torch.export program; onnx: ONNX model (pip install -e '.[export]')")
    x.add_argument("--out", metavar="DIR",
                   help="folder to write (default exports/<run id>-<format>-<which>)")
    x.add_argument("--epoch", default="best", metavar="N|best|last",
                   help="projector: the evaluation of that epoch; model formats: the "
                        "checkpoint (best on validation, last, or the epoch of one of them)")
    x.add_argument("--split", default="test", metavar="SPLIT",
                   help="projector: the real points, test (default), train, val, gallery, a "
                        "comma list or all; model formats: the split whose images check the "
                        "export")
    x.add_argument("--no-synthetic", action="store_true",
                   help="projector: leave out the mixing strategy's synthetic points")
    x.add_argument("--no-sprite", action="store_true",
                   help="projector: no sprite image (then the data set is not needed)")
    x.add_argument("--max-points", type=int, metavar="N",
                   help="projector: a seeded random subsample of at most N points")
    x.add_argument("--data-root", help="folder holding the run's data set (images, "
                   "normalisation)")
    x.add_argument("--force", action="store_true", help="replace an existing --out folder")
    x.add_argument("--runs-dir", help=f"runs root (default $DML_RUNS or {DEFAULT_RUNS_ROOT})")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="benchmarks that train grids of runs")
    bsub = b.add_subparsers(dest="bench", required=True)
    c = bsub.add_parser("claims", help="grid of losses x mixing strategies over seeds, "
                        "compared with each loss's baseline (paired CIs)")
    c.add_argument("--dataset", default="omniglot")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    c.add_argument("--grid", default="claims",
                   help="claims, official, ee-n, sensitivity, long, followup or smoke "
                        "(dml/claims.py GRIDS)")
    c.add_argument("--backend", default="local", metavar="NAME",
                   help="local: processes of this machine (default); ray: Ray tasks on a "
                        "local Ray instance or a cluster (pip install -e '.[cluster]')")
    c.add_argument("--jobs", type=int, help="local: runs trained at the same time (default 1)")
    c.add_argument("--address", metavar="ADDR",
                   help="ray: local (a new Ray instance on this machine; default unless "
                        "$RAY_ADDRESS is set), auto (the cluster this machine belongs to), "
                        "ray://HOST:10001 (Ray Client) or HOST:PORT; on a cluster --runs-dir "
                        "must be a shared file system at the same path on every node")
    c.add_argument("--cpus-per-run", type=float, metavar="N",
                   help="ray: CPUs each run reserves, also its threads (default 1)")
    c.add_argument("--gpus-per-run", type=float, metavar="G",
                   help="ray: GPUs each run reserves, fractions share one (default 0: the run "
                        "sees no GPU)")
    c.add_argument("--runs-dir", default=os.path.join("data", "bench"),
                   help="where the grid's runs live (finished ones are reused)")
    c.add_argument("--out", help="markdown file to write the table into (e.g. docs/RESULTS.md)")
    c.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="settings shared by every cell, e.g. --set train.epochs=20")
    c.set_defaults(func=cmd_bench_claims, argv=None)

    sub.add_parser("app", help="start the Streamlit app (dml app --help for its options)",
                   add_help=False)

    r = sub.add_parser("runs", help="table of runs")
    r.add_argument("--runs-dir", help=f"runs root (default $DML_RUNS or {DEFAULT_RUNS_ROOT})")
    r.set_defaults(func=cmd_runs)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["app"]:                     # everything after `app` belongs to the launcher
        from dml.launch import main as launch_app
        return launch_app(argv[1:])
    args = make_parser().parse_args(argv)
    if hasattr(args, "argv"):
        args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                     # e.g. dml list losses | head
        sys.stderr.close()
        return 0
    except (ConfigError, RunFormatError, ValueError, FileNotFoundError) as exc:
        if os.environ.get("DML_DEBUG"):
            raise
        print(f"dml {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
