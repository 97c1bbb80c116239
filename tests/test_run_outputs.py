"""What one training run leaves behind: a log row per logged step (the probe's metrics in it), each evaluation once,
a model card, a readable loss plot."""
import csv
import os

import pytest

import train_actor
from conftest import PREPENDED

STEPS = 4


@pytest.fixture(scope="module")
def probed_run(tiny_model_dir, tmp_path_factory):
    """A 4-step run logging every step, probing every step, evaluating at steps 2 and 4."""
    from conftest import make_records, write_jsonl

    tmp = tmp_path_factory.mktemp("probed_run")
    train = write_jsonl(tmp / "train.jsonl", make_records(8, str(tmp / "latents")))
    evaluation = write_jsonl(tmp / "eval.jsonl", make_records(4, str(tmp / "latents_eval"), seed=1, prefix="e"))
    out = str(tmp / "out")
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", train, "--eval_file", evaluation,
            "--output_dir", out, "--report_to", "none", "--num_heads", "4", "--prepended_length", str(PREPENDED),
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--max_steps", str(STEPS),
            "--logging_steps", "1", "--enable_infoNCE_probe", "true", "--infoNCE_probe_interval", "1",
            "--infoNCE_probe_samples", "3", "--eval_strategy", "steps", "--eval_steps", "2",
            "--save_strategy", "no", "--eval_latent_conditions", "4", "--head_warm_start_steps", "2",
            "--disable_tqdm", "true"]
    assert train_actor.main(argv) == 0
    with open(os.path.join(out, "loss_log.csv"), newline="") as f:  # every log entry, also after the final save
        history = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]
    return out, history


def test_the_probe_logs_with_the_training_loss_of_its_step(probed_run):
    _, history = probed_run
    loss_rows = [r for r in history if "loss" in r]
    assert [r["step"] for r in loss_rows] == list(range(1, STEPS + 1))  # the probe used to take every loss row
    assert all("probe/cInfoNCE_LB" in r and "ce_loss" in r for r in loss_rows)
    assert not [r for r in history if "probe/cInfoNCE_LB" in r and "loss" not in r]  # no probe-only rows


def test_each_evaluation_runs_once(probed_run):
    _, history = probed_run
    assert [r["step"] for r in history if "eval_loss" in r] == [2, 4]  # finish_run used to evaluate step 4 again
    assert [r["step"] for r in history if "cond/true_ce_bits" in r] == [2, 4]


class _Evaluations:
    """The parts of a trainer that `finish_run` reads, counting its evaluations."""

    def __init__(self, history, global_step, best_checkpoint=None):
        from types import SimpleNamespace

        self.state = SimpleNamespace(log_history=history, global_step=global_step,
                                     best_model_checkpoint=best_checkpoint, best_global_step=None)
        self.args = SimpleNamespace(load_best_model_at_end=best_checkpoint is not None)
        self.nonfinite_guard = SimpleNamespace(stopped=False)
        self.eval_dataset, self.evaluations = object(), 0

    def evaluate(self):
        self.evaluations += 1


@pytest.mark.parametrize("history, step, best, expected", [
    ([{"loss": 1.0, "step": 4}], 4, None, 1),  # no scheduled evaluation (--eval_strategy no): the final one
    ([{"eval_loss": 1.0, "step": 2}], 4, None, 1),  # the last step's weights were never evaluated
    ([{"eval_loss": 1.0, "step": 4}], 4, None, 0),  # the schedule evaluated them
    ([{"eval_loss": 1.0, "step": 2}, {"eval_loss": 2.0, "step": 4}], 4, "out/checkpoint-2", 0),  # the best, loaded
])
def test_the_saved_model_is_evaluated_once(history, step, best, expected):
    trainer = _Evaluations(history, step, best)
    assert train_actor.finish_run(trainer, "out") == 0
    assert trainer.evaluations == expected
