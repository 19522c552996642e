"""The output-directory decision at start-up (train/output_dir.py), on real directories:
refuse an earlier run naming the directory and both ways out, clear only the run's own
entries with run.overwrite, leave everything to --resume; and metrics rows past a resumed
step are dropped."""

import json

import pytest

from openr1_mega.config.train import RunConfig
from openr1_mega.train.output_dir import prepare_output_dir, truncate_metrics


def _earlier_run(out):
    (out / "checkpoints" / "step_000002").mkdir(parents=True)
    (out / "hf").mkdir()
    (out / "tb").mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(4)))
    (out / "notes.txt").write_text("the user's own file")


def test_a_fresh_directory_is_used_as_is(tmp_path):
    prepare_output_dir(RunConfig(output_dir=str(tmp_path / "new")), resume=False)
    (tmp_path / "recipe.json").write_text("{}")  # a run that died before any step
    prepare_output_dir(RunConfig(output_dir=str(tmp_path)), resume=False)


def test_an_earlier_run_is_refused_naming_the_directory_and_both_options(tmp_path):
    _earlier_run(tmp_path)
    with pytest.raises(FileExistsError) as err:
        prepare_output_dir(RunConfig(output_dir=str(tmp_path)), resume=False)
    message = str(err.value)
    assert str(tmp_path) in message and "--resume" in message and "run.overwrite" in message
    assert (tmp_path / "checkpoints" / "step_000002").is_dir()  # nothing touched


def test_overwrite_clears_only_the_runs_own_entries(tmp_path):
    _earlier_run(tmp_path)
    prepare_output_dir(RunConfig(output_dir=str(tmp_path), overwrite=True), resume=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_keeps_everything_and_contradicting_options_fail(tmp_path):
    _earlier_run(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    prepare_output_dir(RunConfig(output_dir=str(tmp_path)), resume=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    with pytest.raises(ValueError, match="contradict"):
        prepare_output_dir(RunConfig(output_dir=str(tmp_path), overwrite=True), resume=True)


def test_metrics_past_the_resumed_step_are_dropped(tmp_path):
    _earlier_run(tmp_path)
    truncate_metrics(tmp_path, 2)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    truncate_metrics(tmp_path, 0)  # starting from scratch: every row is logged again
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_keep_checkpoints_must_not_be_negative():
    with pytest.raises(ValueError, match="run.keep_checkpoints=-1"):
        RunConfig(keep_checkpoints=-1)
