import json

from flax_transformer.training.metrics import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    MetricsWriter,
    plot_curves,
    read_metrics,
)


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write("train", 10, {"loss": 2.5, "accuracy": 0.5, "note": "kept in JSONL"})
        writer.write("valid", 10, {"loss": 2.7, "wer": 0.4})
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [(r["split"], r["step"]) for r in records] == [("train", 10), ("valid", 10)]
    assert records[0]["loss"] == 2.5 and records[0]["note"] == "kept in JSONL"
    assert any((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert plot_curves(tmp_path, "wer").stat().st_size > 0


def test_resume_drops_records_an_interrupted_run_wrote_after_its_checkpoint(tmp_path):
    with MetricsWriter(tmp_path) as writer:  # checkpoint at 20, killed after logging 40
        for step in (10, 20, 30, 40):
            writer.write("train", step, {"loss": 1.0 / step})
        writer.write("valid", 20, {"loss": 0.5})
    with MetricsWriter(tmp_path, start_step=20) as writer:  # resumed with log_every 15
        writer.write("train", 35, {"loss": 0.03})
    steps = [json.loads(line)["step"]
             for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert steps == [10, 20, 20, 35]


def test_a_line_cut_off_by_a_killed_run_is_dropped_not_glued_to_the_next(tmp_path, capsys):
    with MetricsWriter(tmp_path) as writer:
        writer.write("train", 10, {"loss": 1.0})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('not a record\n{"split": "train", "st')  # killed while writing step 20
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [10]
    warnings = capsys.readouterr().err
    assert f"{METRICS_FILE}:2: not a metrics record, skipped" in warnings
    assert f"{METRICS_FILE}:3: not a metrics record" in warnings
    with MetricsWriter(tmp_path, start_step=10) as writer:  # resumed from step 10
        writer.write("train", 20, {"loss": 0.5})
    assert "dropped" in capsys.readouterr().err
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]
    assert plot_curves(tmp_path).stat().st_size > 0


def test_non_finite_values_are_written_as_null(tmp_path):
    """A diverged loss must not make the JSONL unreadable for strict JSON parsers."""
    with MetricsWriter(tmp_path) as writer:
        writer.write("train", 10, {"loss": 2.5, "grad_norm": 1.0})
        writer.write("train", 20, {"loss": float("nan"), "grad_norm": float("inf")})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert plot_curves(tmp_path).stat().st_size > 0  # the null point is left out
