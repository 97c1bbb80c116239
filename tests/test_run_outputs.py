"""What one training run leaves behind: a log row per logged step (the probe's metrics in it), each evaluation once,
a model card, a readable loss plot."""
import csv
import os

import pytest

import train_actor
from tests.helpers import PREPENDED

STEPS = 4


@pytest.fixture(scope="module")
def probed_run(tiny_model_dir, tmp_path_factory):
    """A 4-step run logging every step, probing every step, evaluating at steps 2 and 4."""
    from tests.helpers import make_records, write_jsonl

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
    from common.cli import finish_run

    trainer = _Evaluations(history, step, best)
    assert finish_run(trainer, "out") == 0
    assert trainer.evaluations == expected


def test_every_run_writes_a_model_card_with_its_facts_in_the_front_matter(probed_run, tiny_model_dir):
    from huggingface_hub import ModelCard

    out, history = probed_run
    card = ModelCard.load(os.path.join(out, "README.md"))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"interlat", "latent-communication"} <= set(data["tags"])
    assert data["license"] == "other" and data["license_name"] == "same-as-the-base-model"  # a local model: unknown
    assert "base_model" not in data  # a local folder is not a hub id; the text names it
    assert f"| base model | {tiny_model_dir} |" in card.text
    assert data["interlat"]["prepended_length"] == PREPENDED and data["interlat"]["latent_dim"] == 24

    assert data["interlat"]["max_steps"] == STEPS and data["interlat"]["pure_latent_prob"] == 0.5
    # the last evaluation's held-out results, as the hub's model-index and as the table
    last = [r for r in history if "cond/true_ce_bits" in r][-1]
    results = {m["name"]: m["value"] for m in data["model-index"][0]["results"][0]["metrics"]}
    assert results["cross entropy bits, message: true"] == pytest.approx(last["cond/true_ce_bits"], abs=1e-6)
    assert results["exact match, message: shuffled"] == pytest.approx(last["cond/shuffled_exact_match"], abs=1e-6)
    assert data["model-index"][0]["results"][0]["dataset"]["name"] == "eval.jsonl"
    assert f"| the sample's own latents | {last['cond/true_ce_bits']:.4f} |" in card.text
    # the command line as typed, and how to load the folder
    assert "python train_actor.py --model_name_or_path" in card.text and "--infoNCE_probe_interval 1" in card.text
    assert f'LatentActor.from_pretrained("{out}")' in card.text and "from evaluation.generation import" in card.text


def test_the_card_s_command_line_hides_tokens_and_the_base_model_s_license_is_read_from_its_card(tmp_path):
    from common.model_card import base_model_license, command_line

    shown = command_line(["--hub_token", "hf_secret", "--output_dir", "out dir", "--hub_token=hf_x"], "interlat-train")
    assert shown == "interlat-train --hub_token HIDDEN --output_dir 'out dir' --hub_token=HIDDEN"
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert base_model_license(str(tmp_path)) == "mit"
    assert base_model_license("HuggingFaceTB/SmolLM2-135M-Instruct") == "apache-2.0"  # the embedded copy has no card
    assert base_model_license(str(tmp_path / "nothing")) is None


def test_pushing_offline_is_one_line_before_the_model_loads(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    import training.setup

    train, _ = tiny_data
    out = tmp_path / "out"
    loaded = []
    monkeypatch.setattr(training.setup, "build_actor", lambda *a, **k: loaded.append(1))
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", train, "--output_dir", str(out),
            "--report_to", "none", "--num_heads", "4", "--push_to_hub", "true", "--hub_model_id", "me/actor"]
    assert train_actor.main(argv) == 2  # HF_HUB_OFFLINE=1 in every test (conftest.py)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("error: --push_to_hub: the hub cannot be reached (offline: HF_HUB_OFFLINE is set)")
    assert not loaded


def test_a_hub_id_missing_offline_is_said_in_whole_words():
    from common.models import ModelNotFoundError, first_sentence, resolve_model_dir

    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_dir("someone/not-cached-actor")
    assert str(caught.value).endswith("not in the Hugging Face cache, and the hub cannot be reached "
                                      "(offline: HF_HUB_OFFLINE is set)")
    long = ValueError("Cannot find the folder on the local disk and outgoing traffic has been disabled. " * 3 +
                      "To enable repo look-ups and downloads online, pass 'local_files_only=False' as input.")
    assert first_sentence(long, 200).endswith("disabled.")
    assert first_sentence(ValueError("word " * 100), 60).endswith("word ...")


def test_a_hub_that_refuses_the_repository_is_one_line(tiny_model_dir, tiny_data, tmp_path, capsys, monkeypatch):
    import transformers.trainer

    import common.models

    class RefusingHub:
        def create_repo(self, *args, **kwargs):
            raise ConnectionError("Connection refused by huggingface.co\nand a second line")

    monkeypatch.setattr(common.models, "hub_unreachable_reason", lambda: None)  # it resolves, then refuses
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: RefusingHub())
    train, _ = tiny_data
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", train, "--output_dir", str(tmp_path / "out"),
            "--report_to", "none", "--num_heads", "4", "--head_warm_start_steps", "0", "--push_to_hub", "true",
            "--hub_model_id", "me/actor"]
    assert train_actor.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of loading
    assert err == ("error: --push_to_hub: creating the hub repository me/actor failed (ConnectionError: Connection "
                   "refused by huggingface.co)"), err


def test_the_loss_curve_has_integer_steps_and_plain_numbers():
    import matplotlib.pyplot as plt

    from callbacks import loss_curve_figure

    # three steps (matplotlib's default ticks would be 1.0, 1.5, 2.0, ...) and a nearly constant contrast term
    history = [{"step": s, "loss": 2.0 - 0.1 * s, "random_contrast": 0.68999 + 1e-6 * s} for s in (1, 2, 3)]
    fig = loss_curve_figure(history)
    fig.canvas.draw()
    try:
        for ax in fig.axes:
            if not ax.axison:
                continue
            shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert shown and all(float(t).is_integer() for t in shown), shown
            assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "1e-6+6.8999e-1" above the axis
        contrast = next(ax for ax in fig.axes if ax.get_title() == "random contrast")
        labels = [t.get_text() for t in contrast.get_yticklabels() if t.get_text()]
        assert any(label.startswith("0.68999") for label in labels), labels
    finally:
        plt.close(fig)
