"""``sdxl-control batch``: a job file checked whole, then run into a folder (resumable), here or on Ray."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..base.errors import InvalidRequestError
from . import options
from .options import DTYPES, count, number

if TYPE_CHECKING:
    from ..jobs.resolvers import Resolver

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    batch = sub.add_parser(
        "batch",
        help="run a job file (JSON Lines, one recipe per line) into a folder, resumable; on a Ray cluster with --ray",
        parents=[common],
    )
    batch.add_argument("jobs", help="the job file: one JSON job per line (a PNG's recipe, or what --dry-run prints)")
    batch.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTDIR",
        help="folder for the PNGs and results.jsonl (made if missing; with --ray, a folder every worker "
        "reaches, or a pyarrow filesystem URI such as s3://bucket/run)",
    )
    batch.add_argument(
        "--skip-invalid",
        action="store_true",
        help="run the valid jobs when some lines are not (they are listed, and recorded as failed)",
    )
    batch.add_argument("--check", action="store_true", help="check the job file, list its problems, run nothing")
    batch.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: the cluster at ADDRESS (auto, ray://head:10001), or a local Ray runtime",
    )
    batch.add_argument("--workers", type=count, help="--ray: workers, each with its own models (default: one per GPU)")
    batch.add_argument("--gpus-per-worker", type=number, help="--ray: GPUs each worker takes (default 1 with GPUs)")
    batch.add_argument(
        "--inputs-from",
        metavar="FOLDER",
        action="append",
        default=[],
        help="a folder holding files the jobs' recipes name (also looked for beside the job file)",
    )
    batch.add_argument(
        "--recipe-paths",
        choices=("names", "full"),
        default="names",
        help="how the images' recipes name local files (as for generate)",
    )
    batch.add_argument("--tiny", action="store_true", help="run every job on the built-in tiny models (offline demo)")
    batch.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    batch.add_argument("--dtype", choices=DTYPES, help="default: fp16 on GPU, fp32 on CPU")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    """Check the whole job file, then run it; exit 0 when every job is done, else the exit code of the first
    failure's kind (its line in results.jsonl says what went wrong)."""
    from ..jobs.batch import Outputs, run_batch
    from ..jobs.outputs import record_problems

    if args.ray is None and (args.workers is not None or args.gpus_per_worker is not None):
        raise InvalidRequestError("--workers and --gpus-per-worker are for --ray")
    if args.check:
        return _check(args, resolver)
    jobs, problems = _read(args, resolver)
    if problems and not args.skip_invalid:
        raise InvalidRequestError(
            f"{len(problems)} of {len(jobs) + len(problems)} job(s) are not valid (listed above); nothing was run. "
            "Fix them, or --skip-invalid to run the rest"
        )
    outputs = Outputs(args.output)
    options.library_output(getattr(args, "verbose", False))
    record_problems(problems, outputs)
    given = {
        "device": args.device,
        "dtype": options.dtype(args.dtype),
        "recipe_paths": args.recipe_paths,
        "progress_bar": not args.quiet,
    }
    if args.ray is not None:
        from ..jobs.ray_batch import run_batch_ray

        summary = run_batch_ray(
            jobs, outputs, address=args.ray or None, workers=args.workers, gpus_per_worker=args.gpus_per_worker, **given
        )
    else:
        summary = run_batch(jobs, outputs, **given)
    sys.stdout.write(
        f"{summary.done} done, {summary.failed} failed, {summary.skipped} already complete, {len(problems)} invalid: "
        f"{outputs.target}\n"
    )
    failed = [r for r in summary.results if r.get("error") is not None]
    if failed:
        sys.stderr.write(f"sdxl-control: {len(failed)} job(s) failed, first {failed[0]['id']}: {failed[0]['error']}\n")
        code = failed[0].get("exit_code")
        return code if isinstance(code, int) else 1
    return InvalidRequestError.exit_code if problems else 0


def _check(args: argparse.Namespace, resolver: Resolver) -> int:
    """The job file's problems and the models its jobs need, reading remote inputs' beginnings only."""
    from ..base.errors import ModelError
    from ..jobs.batch import remote_inputs_peeked
    from ..jobs.needs import job_needs
    from ..weights.inventory import report

    with remote_inputs_peeked():
        jobs, problems = _read(args, resolver)
        sys.stdout.write(f"{len(jobs)} job(s) valid, {len(problems)} not\n")
        table, present = report(job_needs(jobs))
    sys.stdout.write(f"models: {'all present' if present else 'some missing'}\n{table}\n")
    if problems:
        return InvalidRequestError.exit_code
    return 0 if present else ModelError.exit_code


def _read(args: argparse.Namespace, resolver: Resolver) -> tuple[list[Any], list[Any]]:
    """The job file's jobs and problems, each problem said on stderr."""
    from ..jobs.batch import read_jobs

    jobs, problems = read_jobs(args.jobs, inputs_from=args.inputs_from, resolver=resolver)
    for problem in problems:
        sys.stderr.write(f"{args.jobs}: {problem}\n")
    return jobs, problems
