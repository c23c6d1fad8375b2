"""Entry point: a worker when horovodrun (or the comparison) started this process, else the comparison."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from hvdmri.bench.options import build_parser, check_config, config_from_args, parse_named_configs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker or "HOROVOD_RANK" in os.environ:
        # Started by horovodrun, every process is one worker of one configuration.
        if args.config or args.ratio or args.repeats != 1 or args.memory_fit:
            parser.error("--config, --ratio, --repeats and --memory-fit compare configurations in separate "
                         "runs; start the comparison without horovodrun (it starts horovodrun itself for "
                         "--np N)")
        config = config_from_args(args)
        check_config(parser, config)
        if args.out and not args.worker:
            check_output_file(parser, args.out)
        return run_as_worker(config, args.result, None if args.worker else args.out)

    from hvdmri.bench.compare import describe_run, pair_ratio_table, parse_ratio, ratio_table, run_rounds

    configs = parse_named_configs(parser, _without_compare_flags(argv), args.config) or [config_from_args(args)]
    for config in configs:
        check_config(parser, config)
    names = [config.name for config in configs]
    if args.out:
        check_output_file(parser, args.out)
    try:
        pairs = [parse_ratio(spec, names) for spec in args.ratio]
    except ValueError as error:
        parser.error(str(error))
    # SIGTERM ends the comparison like Ctrl-C, so the running child is stopped and the
    # temporary folder removed instead of both outliving this process.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        lines = run_rounds(configs, args.repeats, args.out)
    except KeyboardInterrupt as interrupt:
        finished_runs = f"; the finished runs are in {args.out}" if args.out else ""
        print(f"python -m hvdmri.bench: interrupted{finished_runs}", file=sys.stderr)
        return 128 + (interrupt.args[0] if interrupt.args else signal.SIGINT)
    if len(configs) > 1:
        print(ratio_table(lines, names))
    else:
        for line in lines:
            print(describe_run(line))
    if pairs:
        print(pair_ratio_table(lines, pairs))
    if args.memory_fit:
        from hvdmri.bench.results import single_worker_runs
        from hvdmri.memory import describe_fit

        # The same runs as python -m hvdmri.memory would fit from the --out file.
        print(describe_fit(single_worker_runs(lines)))
    return 1 if any("error" in line for line in lines) else 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signum)


def check_output_file(parser, out: str) -> None:
    """Reject an --out file that cannot be appended to, before any run spends minutes."""
    try:
        with open(out, "a"):
            pass
    except OSError as error:
        parser.error(f"--out {out}: cannot write: {error.strerror}")


def run_as_worker(config, result: str | None, out: str | None = None) -> int:
    """Run one configuration here; rank 0 writes the JSON line (MWMS: every worker its own)."""
    from hvdmri.bench.compare import combine
    from hvdmri.bench.worker import run_worker

    measured = run_worker(config)
    if config.mode == "mwms":
        if result:
            Path(f"{result}.{measured['rank']}").write_text(json.dumps(measured))
        else:
            print(json.dumps(measured))
        return 0
    workers = [measured]
    if measured["world_size"] > 1:
        import horovod.tensorflow as hvd

        workers = hvd.allgather_object(measured, name="bench_results")
    if measured["rank"] == 0:
        # Under a horovodrun started by hand, --np keeps its default of 1, so record horovodrun's -np.
        config = dataclasses.replace(config, np=measured["world_size"])
        line = json.dumps(combine(config, workers))
        if result:
            Path(result).write_text(line)
        if out:
            with open(out, "a") as stream:
                stream.write(line + "\n")
        print(line, flush=True)
    return 0


def _without_compare_flags(argv: list[str]) -> list[str]:
    """Drop --config/--repeats/--out/--memory-fit so each configuration re-parses only run flags."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in ("--config", "--repeats", "--ratio", "--out"):
            skip = "=" not in item
            continue
        if name == "--memory-fit":
            continue
        kept.append(item)
    return kept


if __name__ == "__main__":
    sys.exit(main())
