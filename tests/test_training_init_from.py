"""`TrainingConfig.init_from`: a run that starts from another run's parameters (fine-tuning)."""

import json

import jax
import numpy as np
import pytest

from flax_transformer import TransformerConfig
from flax_transformer.data import load_task
from flax_transformer.training import TrainingConfig, init_model
from flax_transformer.training.checkpoint import NoCheckpointError
from flax_transformer.training.loop import train
from flax_transformer.training.runs import latest_state, pretrained_params

MODEL = TransformerConfig.preset("tiny", d_model=32, d_ff=64, max_len=32)


def _config(**overrides) -> TrainingConfig:
    settings = dict(task="copy", steps=8, batch_size=8, max_examples=40, num_buckets=1,
                    log_every=4, eval_every=1000, checkpoint_every=1000, eval_examples=8,
                    eval_batch_size=40, lr_schedule="constant", learning_rate=5e-3,
                    warmup_steps=0, seed=1)
    return TrainingConfig(**{**settings, **overrides})


def _params(workdir):
    return latest_state(workdir)[1].params


def _max_difference(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("source")
    train(MODEL, _config(), workdir, progress=False)
    return workdir


def test_pretrained_params_are_the_other_runs_latest(source_run):
    task = load_task("copy", max_examples=40)
    model = MODEL.replace(src_vocab_size=task.src_vocab_size, tgt_vocab_size=task.tgt_vocab_size)
    _, fresh = init_model(model, seed=7)
    params, step = pretrained_params(source_run, model, fresh)
    assert step == 8
    assert _max_difference(params, _params(source_run)) == 0.0
    assert _max_difference(params, fresh) > 0.01


def test_a_run_starts_from_the_other_runs_parameters(source_run, tmp_path):
    # A learning rate of ~0 keeps the parameters where the run started: at the source's.
    config = _config(steps=2, learning_rate=1e-12, seed=5, init_from=str(source_run))
    summary = train(MODEL, config, tmp_path / "tuned", progress=False)
    assert summary["start_step"] == 0 and summary["steps"] == 2  # a fresh step count
    # (a fresh initialisation differs from the source's by > 0.01: the test above)
    assert _max_difference(_params(tmp_path / "tuned"), _params(source_run)) < 1e-6


def test_fine_tuning_continues_to_learn(source_run, tmp_path):
    tuned = train(MODEL, _config(steps=8, init_from=str(source_run)), tmp_path / "tuned",
                  progress=False)
    source = json.loads((source_run / "summary.json").read_text())
    # 8 more steps from the source's 8 bring the training loss below the source's own.
    assert tuned["train"]["loss"] < source["train"]["loss"]


def test_init_from_reuses_the_other_runs_tokenizers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths below: the saved configs make them absolute

    def write(path, pairs):
        path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
        return str(path)

    first = write(tmp_path / "a.tsv", [("a b c", "c b a"), ("b c", "c b"), ("a a", "a a")] * 4)
    second = write(tmp_path / "b.tsv", [("x y z", "z y x"), ("y z", "z y")] * 4)  # new symbols
    options = dict(task="translate", subword_vocab_size=12, steps=2, batch_size=4,
                   num_buckets=1, eval_every=1000, checkpoint_every=1000, eval_examples=2,
                   eval_batch_size=8, lr_schedule="constant", learning_rate=1e-3,
                   warmup_steps=0)
    model = TransformerConfig.preset("tiny", d_model=16, d_ff=32, max_len=24)
    train(model, TrainingConfig(train_file=first, **options), tmp_path / "src", progress=False)
    # Alone, the second file would get its own subword vocabulary; fine-tuned, it uses the
    # first run's (whose ids the parameters were trained on).
    train(model, TrainingConfig(train_file="b.tsv", init_from="src", **options),
          tmp_path / "tuned", progress=False)
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())["training"]
    assert saved["train_file"] == second and saved["init_from"] == str(tmp_path / "src")
    alone = load_task("translate", train_file=second, vocab_size=12)
    alone.save_tokenizers(tmp_path / "alone")
    models = sorted(p.name for p in (tmp_path / "src" / "tokenizer").glob("*.model"))
    assert models
    for name in models:
        used = (tmp_path / "tuned" / "tokenizer" / name).read_bytes()
        assert used == (tmp_path / "src" / "tokenizer" / name).read_bytes()
        assert used != (tmp_path / "alone" / name).read_bytes()


def test_a_different_architecture_is_refused_by_name(source_run, tmp_path):
    with pytest.raises(ValueError, match=r"d_model 32 there vs 64"):
        train(MODEL.replace(d_model=64), _config(init_from=str(source_run)),
              tmp_path / "wide", progress=False)


def test_a_different_task_is_refused(source_run, tmp_path):
    with pytest.raises(ValueError, match="learned task 'copy', this run is 'reverse'"):
        train(MODEL, _config(task="reverse", init_from=str(source_run)), tmp_path / "r",
              progress=False)
    assert not (tmp_path / "r").exists()


def test_a_tokenizer_setting_other_than_the_sources_is_refused(source_run, tmp_path):
    # The source's tokenizer is reused: another subword_vocab_size would be ignored.
    with pytest.raises(ValueError, match=r"subword_vocab_size=100 differs from the 8000 .*"
                                         r"drop --subword-vocab-size"):
        train(MODEL, _config(subword_vocab_size=100, init_from=str(source_run)),
              tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_init_from_its_own_workdir_is_refused_and_deletes_nothing(source_run):
    before = sorted(p.name for p in source_run.iterdir())
    with pytest.raises(ValueError, match="own workdir"):
        train(MODEL, _config(init_from=str(source_run)), source_run, overwrite=True,
              progress=False)
    assert sorted(p.name for p in source_run.iterdir()) == before


def test_init_from_a_directory_without_a_run(tmp_path):
    (tmp_path / "previous").mkdir()
    (tmp_path / "previous" / "keep.txt").write_text("x")
    with pytest.raises(NoCheckpointError, match="not a training work directory"):
        train(MODEL, _config(init_from=str(tmp_path / "nothing")), tmp_path / "previous",
              overwrite=True, progress=False)
    assert (tmp_path / "previous" / "keep.txt").is_file()


def test_init_from_must_name_a_directory():
    with pytest.raises(ValueError, match="init_from must be a run's work directory"):
        TrainingConfig(init_from=" ")
