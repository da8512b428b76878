"""Train the Transformer: `python train.py` trains CMUdict G2P with the CPU-sized preset.

Every field of `TransformerConfig` and `TrainingConfig` is a flag (`d_model` -> `--d-model`,
`lr_schedule` -> `--lr-schedule`, booleans as `--flag/--no-flag`); a value given on the
command line overrides the preset, which overrides the dataclass default.

    python train.py                                   # g2p, preset "g2p", workdir runs/g2p
    python train.py --preset g2p-long                 # workdir runs/g2p-long
    python train.py --task translate                  # needs: pip install -e .[translate]
    python train.py --task translate --train-file pairs.tsv --workdir runs/mine
    python train.py --resume --steps 8000             # continue runs/g2p to step 8000
    python train.py --predict hello world            # pronunciations from runs/g2p
    python train.py --evaluate --workdir runs/g2p-long --rescore-with runs/g2p-long-r2l
    python train.py --evaluate --workdir runs/g2p-long --average-checkpoints 3  # mean weights
    python train.py --evaluate --workdir runs/g2p-long --ensemble-with runs/g2p-long-seed1
    python train.py --predict hello --workdir runs/g2p-long --ensemble-with runs/g2p-long-seed1
    python train.py --init-from runs/g2p-long --reverse-target --steps 12000 --lr-cycles 1 \
        --workdir runs/g2p-long-r2l         # fine-tune: starts from another run's weights

With --init-from WORKDIR the model settings, the task and (unless --preset names others) the
training settings are that run's; its tokenizers are reused (so is its --subword-vocab-size,
which may not be set to another value).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from flax_transformer.runtime import keep_freed_memory

keep_freed_memory()  # before JAX runs anything: ~2x faster steps on CPU

from flax_transformer.config import TransformerConfig  # noqa: E402
from flax_transformer.training.config import (  # noqa: E402
    DATA_PATH_FIELDS,
    PATH_FIELDS,
    RUN_PRESETS,
    TOKENIZER_FIELDS,
    TrainingConfig,
)

# Model fields that come from the data, not from the command line.
DERIVED_MODEL_FIELDS = ("src_vocab_size", "tgt_vocab_size")
# Training fields that define what a run learns: --resume refuses to change them.
RUN_DEFINING_FIELDS = ("task", "reverse_target", "train_file", "valid_file", "test_file",
                       "corpus", "data_dir", "max_examples", "subword_vocab_size")
# Training fields accepted when reading a finished run (--evaluate, --predict); "task" only
# picks the default work directory, and "keep_checkpoints" changes nothing there (every kept
# checkpoint may be averaged).
READING_FIELDS = ("decode", "beam_size", "length_penalty", "eval_batch_size", "eval_buckets",
                  "average_checkpoints", "keep_checkpoints", "data_dir", "train_file",
                  "valid_file", "test_file", "task", "devices", "bleu_tokenize")


def default_workdir(preset: str | None, task: str | None) -> str:
    """runs/<preset> for a run preset (e.g. runs/g2p-long), else runs/<task>."""
    if preset in RUN_PRESETS:
        return f"runs/{preset}"
    return f"runs/{task or TrainingConfig.task}"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line `error: ...` on stderr, exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def _flag_type(hint: Any) -> tuple[Any, bool]:
    """(base type, accepts None) of a dataclass field's type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _converter(base: type, optional: bool):
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {base.__name__}, got {text!r}"
            ) from None

    convert.__name__ = base.__name__  # argparse names the type in its messages
    return convert


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str,
                     skip: tuple[str, ...] = ()) -> list[str]:
    """One `--kebab-case` flag per dataclass field (default SUPPRESS: absent unless given);
    returns the field names."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    names = []
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        base, optional = _flag_type(hints[field.name])
        help_text = f"{field.metadata['help']} (default: {field.default}, or the preset's)"
        if optional:  # `none` unsets the field; a path really named so is given as ./none
            help_text += "; none unsets it" + (
                " (a file named none: ./none)" if field.name in PATH_FIELDS else "")
        if base is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=field.name, type=_converter(base, optional),
                               default=argparse.SUPPRESS, metavar=base.__name__.upper(),
                               help=help_text)
        names.append(field.name)
    return names


def build_parser() -> tuple[argparse.ArgumentParser, list[str], list[str]]:
    presets = ", ".join(f"{k} ({v.about})" for k, v in RUN_PRESETS.items())
    parser = OneLineParser(
        allow_abbrev=False,  # --over is not --overwrite: a typo must not delete a run
        description="Train an encoder-decoder Transformer (Flax NNX + Optax) and report the "
                    "task metric on the test split.",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--preset", default=None,
                     help=f"run preset: {presets}; or a model preset tiny/small/base/big "
                          "(default: the task's preset)")
    run.add_argument("--workdir", default=None,
                     help="where checkpoints, metrics and the plot go (default: "
                          "runs/<preset> with a run --preset, else runs/<task>)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the latest checkpoint in --workdir")
    run.add_argument("--overwrite", action="store_true",
                     help="delete a previous run's files in --workdir and start again")
    run.add_argument("--predict", nargs="+", metavar="TEXT", default=None,
                     help="load the latest checkpoint in --workdir and print each text and "
                          "its output, tab-separated; '-' reads the texts from standard "
                          "input, one per line (blank lines skipped)")
    run.add_argument("--evaluate", action="store_true",
                     help="score the latest checkpoint in --workdir on all valid and test "
                          "examples (decoding flags such as --beam-size apply, and "
                          "--average-checkpoints)")
    run.add_argument("--rescore-with", nargs="+", metavar="WORKDIR", default=None,
                     help="with --evaluate and --decode beam (the G2P and translate presets' "
                          "default): rerank the beam's hypotheses by the mean "
                          "log-probability under this run's model and these runs' models "
                          "(same task; e.g. one trained with --reverse-target)")
    run.add_argument("--ensemble-with", nargs="+", metavar="WORKDIR", default=None,
                     help="with --evaluate or --predict, and --decode beam: decode with this "
                          "run's model and these runs' models together, each token scored by "
                          "the mean of their probabilities (same task, targets read the same "
                          "way)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    training = add_config_flags(parser, TrainingConfig, "training (TrainingConfig)")
    model = add_config_flags(parser, TransformerConfig, "model (TransformerConfig)",
                             skip=DERIVED_MODEL_FIELDS)
    clash = set(training) & set(model)
    assert not clash, f"flag names defined twice: {clash}"
    return parser, training, model


def stdin_texts() -> list[str]:
    """`--predict -`: the non-blank lines of standard input (UTF-8), without their line ends."""
    texts = []
    for number, line in enumerate(getattr(sys.stdin, "buffer", sys.stdin), start=1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"--predict -: line {number} of standard input is not UTF-8 "
                                 f"text ({err.reason} at byte {err.start})") from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # the byte order mark some editors write
        if line.strip():
            texts.append(line.rstrip("\r\n"))
    if not texts:
        raise ValueError("--predict -: standard input held no text; give one input per line")
    return texts


def run(args: argparse.Namespace, training_fields: list[str], model_fields: list[str]) -> int:
    from flax_transformer.data import available_tasks
    from flax_transformer.data.fingerprint import DATA_FILE
    from flax_transformer.training.checkpoint import load_run_config, tokenizer_dir
    from flax_transformer.training.config import resolve_preset
    from flax_transformer.training.loop import train
    from flax_transformer.training.runs import evaluate_run, predict

    given = vars(args)
    training_overrides = {k: given[k] for k in training_fields if k in given}
    model_overrides = {k: given[k] for k in model_fields if k in given}
    task = training_overrides.get("task")
    if task is not None and task not in available_tasks():
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(available_tasks())}")
    if args.workdir is not None and not args.workdir.strip():
        raise ValueError("--workdir is blank; give a directory (or leave the flag out for "
                         f"{default_workdir(args.preset, task)})")
    workdir = args.workdir or default_workdir(args.preset, task)

    if args.evaluate or args.predict is not None:
        # A finished run is read with its saved settings; only decoding flags apply.
        ignored = sorted({*model_overrides, *training_overrides} - set(READING_FIELDS))
        if ignored:
            flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
            allowed = ", ".join("--" + name.replace("_", "-") for name in READING_FIELDS)
            raise ValueError(f"{flags}: not used by --evaluate/--predict, which read the run's "
                             f"saved settings; drop them (these apply: {allowed})")
        if args.resume:
            raise ValueError("--resume trains; --evaluate and --predict read a run: drop one")
        if "keep_checkpoints" in training_overrides:
            TrainingConfig(keep_checkpoints=training_overrides["keep_checkpoints"])  # a check
        if task is not None:
            saved_task = load_run_config(workdir)[1].task
            if saved_task != task:
                raise ValueError(f"the run in {workdir} learned task {saved_task!r}, not "
                                 f"{task!r}; drop --task or point --workdir at a {task} run")
    decoding = {k: v for k, v in training_overrides.items()
                if k not in ("task", "keep_checkpoints")}
    if args.rescore_with is not None and not args.evaluate:
        raise ValueError("--rescore-with works with --evaluate; add --evaluate")
    if args.ensemble_with is not None and not (args.evaluate or args.predict is not None):
        raise ValueError("--ensemble-with works with --evaluate or --predict; add one")
    if args.overwrite and (args.evaluate or args.predict is not None):
        raise ValueError("--overwrite deletes a run; --evaluate and --predict read one: drop "
                         "--overwrite")
    if args.evaluate:
        if args.predict is not None or args.resume:
            raise ValueError("--evaluate cannot be combined with --predict or --resume")
        results = evaluate_run(workdir, rescore_with=args.rescore_with or (),
                               ensemble_with=args.ensemble_with or (),
                               config_overrides=decoding)
        if not results:
            raise ValueError(f"the run in {workdir} has no valid or test examples to score")
        for split, scores in results.items():
            line = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "num_examples")
            print(f"{split} ({scores['num_examples']:.0f} examples): {line}")
        return 0

    if args.predict is not None:
        texts = stdin_texts() if args.predict == ["-"] else args.predict
        outputs = predict(workdir, texts, config_overrides=decoding,
                          ensemble_with=args.ensemble_with or ())
        for text, output in zip(texts, outputs):
            print(f"{text}\t{output}")
        return 0

    if args.resume:
        if args.preset is not None:
            raise ValueError("--preset cannot be combined with --resume (the run's saved "
                             "config is used); drop --preset")
        model_config, config = load_run_config(workdir)
        wanted = model_config.replace(**model_overrides)  # resolves e.g. --dtype auto
        changed = sorted(k for k in model_overrides
                         if getattr(model_config, k) != getattr(wanted, k))
        if changed:
            raise ValueError(f"model setting(s) {changed} cannot change when resuming; drop "
                             "them or train in a new --workdir")
        wanted = config.replace(**training_overrides).with_absolute_paths()
        # Where the data is (not what it is) may change when the run saved a fingerprint of
        # its data, which must then match (training/loop.py).
        movable = DATA_PATH_FIELDS if (tokenizer_dir(workdir) / DATA_FILE).is_file() else ()
        redefined = sorted(k for k in RUN_DEFINING_FIELDS if k in training_overrides
                           and k not in movable and getattr(wanted, k) != getattr(config, k))
        if redefined:
            raise ValueError(f"setting(s) {redefined} define what the run learns and cannot "
                             "change when resuming; drop them or train in a new --workdir")
        config = config.replace(**training_overrides)
        if missing := config.missing_data():
            raise ValueError(missing)
    elif training_overrides.get("init_from") is not None:
        # Fine-tuning: the model is the other run's; so are the task and training settings
        # unless --preset names others (train() refuses another task). Flags override either.
        model_config, config = load_run_config(training_overrides["init_from"])
        if args.preset is not None:  # but the tokenizer settings stay (its tokenizers do)
            config = resolve_preset(args.preset, task)[1].replace(
                **{name: getattr(config, name) for name in TOKENIZER_FIELDS})
        model_config = model_config.replace(**model_overrides)
        config = config.replace(**training_overrides)
    else:
        model_config, config = resolve_preset(args.preset, task)
        model_config = model_config.replace(**model_overrides)
        config = config.replace(**training_overrides)
    if "min_lr_ratio" in training_overrides and config.lr_schedule != "cosine":
        raise ValueError(f"--min-lr-ratio is where the cosine schedule ends; --lr-schedule is "
                         f"{config.lr_schedule!r}, which never reads it: drop --min-lr-ratio or "
                         "add --lr-schedule cosine")
    for name in DATA_PATH_FIELDS:
        path = training_overrides.get(name)
        want = "directory" if name == "data_dir" else "file"
        if path is None:
            continue
        if not Path(path).exists():
            raise ValueError(f"--{name.replace('_', '-')} {path}: no such {want}")
        if (Path(path).is_dir()) != (name == "data_dir"):
            raise ValueError(f"--{name.replace('_', '-')} {path} is not a {want}; give a "
                             + ("directory that holds the task's data file" if name == "data_dir"
                                else "source<TAB>target file"))

    summary = train(model_config, config, workdir, resume=args.resume,
                    overwrite=args.overwrite, progress=not args.no_progress)
    test = summary["test"]
    metric = summary["metric_name"]
    report = f"{metric} {test[metric]:.4f}" if metric in test else "no test split"
    for name in ("per", "wer_no_stress", "per_no_stress"):
        if name in test:
            report += f", {name} {test[name]:.4f}"
    print(f"done: {summary['steps']} steps in {summary['wall_seconds']:.0f} s; test {report}; "
          f"workdir {workdir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, training_fields, model_fields = build_parser()
    args = parser.parse_args(argv)
    from flax_transformer.data import MissingDependencyError

    try:
        return run(args, training_fields, model_fields)
    except (ValueError, OSError, MissingDependencyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    except Exception as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"error: out of memory ({str(err).strip().splitlines()[0][:200]}); lower "
              "--batch-size, --eval-batch-size or the model size", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
