"""The conventions Hugging Face users expect: config files, hub ids through the HF cache, pushes that carry the
head and a model card, honest inherited flags (Liger refused, TensorBoard groups, progress bars)."""
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import Future

import pytest
import torch

from common import models
from evaluation import evaluate as evaluate_actor
from evaluation import inference
from sender import train as train_sender
import train_actor
from tests.helpers import LATENT_DIM, PREPENDED, ROOT, make_records, write_jsonl
from latent_head import HEAD_FILE, HEAD_SAFETENSORS_FILE, LatentActor, load_head_file, load_head_safetensors

RECIPES = os.path.join(ROOT, "recipes")


def _tiny_overrides(model_dir, train, evaluation, out):
    """Flags that shrink a recipe to the tiny model and data (everything else comes from the recipe)."""
    return ["--model_name_or_path", model_dir, "--train_file", train, "--eval_file", evaluation, "--output_dir", out,
            "--num_heads", "4", "--prepended_length", str(PREPENDED), "--per_device_train_batch_size", "2",
            "--per_device_eval_batch_size", "4", "--disable_tqdm", "true"]


# ---------------------------------------------------------------------------------------------
# 7. Config files
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_demo_recipe_runs_and_flags_override_it(tiny_model_dir, tiny_data, tmp_path):
    train, evaluation = tiny_data
    out = str(tmp_path / "out")
    argv = [os.path.join(RECIPES, "demo.yaml"), *_tiny_overrides(tiny_model_dir, train, evaluation, out),
            "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--infoNCE_probe_interval", "1",
            "--head_warm_start_steps", "3", "--eval_latent_conditions", "4", "--report_to", "tensorboard"]
    assert train_actor.main(argv) == 0
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["global_step"] == 2  # --max_steps 2 overrode the recipe's 60
    fingerprint = json.load(open(os.path.join(out, "run_fingerprint.json")))
    # from the recipe (the defaults are 3072, 1e-3, 2e-5) ...
    assert fingerprint["model_max_length"] == 512 and fingerprint["head_warm_start_lr"] == pytest.approx(3e-3)
    assert fingerprint["learning_rate"] == pytest.approx(1e-4)  # "1e-4": YAML reads a string, the parser a float
    # ... and from the flags after it (the recipe says 64 and 800)
    assert fingerprint["prepended_length"] == PREPENDED and fingerprint["head_warm_start_steps"] == 3
    args = torch.load(os.path.join(out, "training_args.bin"), weights_only=False)
    assert args.lr_scheduler_type == "constant_with_warmup" and args.logging_steps == 5 and args.save_total_limit == 1

    # TensorBoard: cond/* and probe/* are groups of their own, not train/cond/... (the Trainer's rewrite_logs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = os.path.join(out, "runs")
    tags = set()
    for run in os.listdir(runs):
        acc = EventAccumulator(os.path.join(runs, run))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"cond/true_ce_bits", "cond/delta_bits_shuffled_minus_true", "probe/cInfoNCE_LB"} <= tags, tags
    assert {"train/train_loss", "eval/loss"} <= tags  # logging_steps 5 > 2 steps: the summary only
    assert not [t for t in tags if t.startswith(("train/cond", "train/probe"))]


def test_every_recipe_parses_with_the_repository_s_flag_names():
    model_args, data_args, args = train_actor.parse_args([os.path.join(RECIPES, "qwen2.5-7b-lora.yaml")])
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert (model_args.lora_r, model_args.lora_alpha, model_args.base_dtype) == (16, 32.0, "bfloat16")
    assert args.gradient_checkpointing is True and args.learning_rate == pytest.approx(1e-4)
    model_args, data_args, args = train_actor.parse_args([os.path.join(RECIPES, "qwen2.5-0.5b.yaml")])
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and args.per_device_train_batch_size == 32
    assert data_args.model_max_length == 3072 and model_args.lora_r == 0


def test_the_demo_recipe_holds_the_makefile_defaults():
    """`make demo` passes its variables as flags after recipes/demo.yaml: the recipe alone must be the same run."""
    import yaml

    make = open(os.path.join(ROOT, "Makefile")).read()
    default = dict(re.findall(r"^(DEMO_\w+) \?= (.*)$", make, re.M))
    recipe = yaml.safe_load(open(os.path.join(RECIPES, "demo.yaml")))
    pairs = {"max_steps": "DEMO_STEPS", "per_device_train_batch_size": "DEMO_BATCH", "learning_rate": "DEMO_LR",
             "pure_latent_prob": "DEMO_PURE", "head_warm_start_steps": "DEMO_WARM", "head_warm_start_lr": "DEMO_WARM_LR",
             "model_name_or_path": "DEMO_MODEL", "eval_steps": "DEMO_STEPS", "save_steps": "DEMO_STEPS"}
    for key, var in pairs.items():
        assert str(recipe[key]) == default[var], (key, recipe[key], default[var])
    assert recipe["head_learning_rate"] == recipe["learning_rate"]  # DEMO_HEAD_LR ?= $(DEMO_LR)
    assert recipe["infoNCE_probe_interval"] == recipe["max_steps"] // 2
    assert recipe["train_file"] == default["DEMO_DATA"] + "/train.jsonl" and recipe["output_dir"] == default["DEMO_DIR"]


@pytest.mark.parametrize("main", [train_actor.main, train_sender.main], ids=["train_actor", "train_sender"])
def test_unknown_config_keys_and_flags_are_one_line(main, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-4\nlearnig_rate: 2e-4\n")
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert str(config) in err and "unknown key learnig_rate" in err
    assert main(["--no_such_flag", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--no_such_flag" in err and "Traceback" not in err
    config.write_text("learning_rate: [1, 2\n")
    assert main([str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not valid YAML" in err
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps(["not", "a", "mapping"]))
    assert main([str(as_json)]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_a_json_config_and_flags_after_it(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"learning_rate": 3e-4, "fused_loss": False, "report_to": ["tensorboard"],
                                  "output_dir": "a", "mix_ratios": "0.5"}))
    model_args, data_args, args = train_actor.parse_args([str(config), "--output_dir", "b"])
    assert args.learning_rate == pytest.approx(3e-4) and model_args.fused_loss is False
    assert model_args.mix_ratios == "0.5" and args.output_dir == "b" and args.report_to == ["tensorboard"]


def test_a_data_source_flag_replaces_the_recipe_s(tmp_path):
    """A recipe names files; `--dataset_name` on the command line is the data instead (not "both given")."""
    recipe = os.path.join(RECIPES, "qwen2.5-0.5b.yaml")
    _, data_args, _ = train_actor.parse_args([recipe, "--dataset_name", "org/data", "--output_dir", "o"])
    assert data_args.dataset_name == "org/data" and not data_args.train_file and not data_args.eval_file
    data_args.check_source()  # one source: accepted
    config = tmp_path / "c.yaml"
    config.write_text("dataset_name: org/data\ndataset_split: train\noutput_dir: o\n")
    _, data_args, _ = train_actor.parse_args([str(config), "--train_file", "mine.jsonl"])
    assert data_args.train_file == "mine.jsonl" and not data_args.dataset_name
    _, data_args, _ = train_actor.parse_args([recipe])  # nothing typed: the recipe's files stay
    assert data_args.train_file and not data_args.dataset_name


# ---------------------------------------------------------------------------------------------
# 9. The head as safetensors; hub ids through a local folder posing as the HF cache
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF hub cache (HF_HUB_CACHE), offline: nothing can leave the machine."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def put_in_cache(cache, repo_id: str, folder: str, kind: str = "models") -> str:
    """Lay `folder` out as the hub cache holds a downloaded repo (`kind` models or datasets): refs/main ->
    snapshots/<commit>/files."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / (f"{kind}--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return str(repo / "snapshots" / commit)


def test_a_hub_dataset_id_reads_from_the_hf_cache(hf_cache, tmp_path, capsys):
    """--dataset_name owner/name: the dataset's snapshot in the local HF cache, read as a local folder (its
    latents relative to it); never a network call (offline here), one line when it is not cached."""
    from data import DatasetSource, load_samples

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", make_records(4, str(folder / "__latents_train")))  # paths: __latents_train/...
    write_jsonl(folder / "test.jsonl", make_records(2, str(folder / "__latents_test"), seed=1, prefix="t"))
    snapshot = put_in_cache(hf_cache, "someone/tiny-data", str(folder), kind="datasets")
    samples = load_samples(DatasetSource("someone/tiny-data", "test"))
    assert [s["id"] for s in samples] == ["t000", "t001"] and samples[0]["where"] == "someone/tiny-data:test[0]"
    assert all(s["hidden_state_path"].startswith(snapshot) and os.path.exists(s["hidden_state_path"]) for s in samples)
    argv = ["--dataset_name", "someone/tiny-data", "--eval_split", "test", "--validate_only", "true"]
    assert train_actor.main(argv) == 0
    assert "checked 2 file(s), 6 record(s): 0 error(s)" in capsys.readouterr().out
    assert train_actor.main(["--dataset_name", "someone/not-cached", "--validate_only", "true"]) == 1
    err = capsys.readouterr().err
    assert "someone/not-cached: not a local folder or file, not in the Hugging Face cache, and the hub cannot " \
           "be reached" in err


def test_the_head_is_also_safetensors_with_the_same_weights(actor_dir, tmp_path):
    pt = load_head_file(os.path.join(actor_dir, HEAD_FILE))
    st = load_head_safetensors(os.path.join(actor_dir, HEAD_SAFETENSORS_FILE))
    assert st["config"] == pt["config"] and st["config"]["latent_dim"] == LATENT_DIM
    assert st["state_dict"].keys() == pt["state_dict"].keys()
    assert all(torch.equal(st["state_dict"][k], pt["state_dict"][k]) for k in pt["state_dict"])
    # a folder holding the safetensors head only (as some hub tooling keeps it) loads the same actor
    only = tmp_path / "only_safetensors"
    shutil.copytree(actor_dir, only)
    os.remove(only / HEAD_FILE)
    a, b = LatentActor.from_pretrained(actor_dir), LatentActor.from_pretrained(str(only))
    assert all(torch.equal(x, y) for x, y in zip(a.head.state_dict().values(), b.head.state_dict().values()))


@pytest.mark.slow
def test_a_hub_id_round_trip_through_the_hf_cache(actor_dir, hf_cache, tmp_path, capsys):
    import numpy as np

    put_in_cache(hf_cache, "someone/tiny-actor", actor_dir)
    latents = np.random.default_rng(0).standard_normal((4, LATENT_DIM)).astype(np.float32)
    local, hub = LatentActor.from_pretrained(actor_dir), LatentActor.from_pretrained("someone/tiny-actor")
    assert all(torch.equal(x, y) for x, y in zip(local.state_dict().values(), hub.state_dict().values()))
    assert inference.generate_reply(local, [{"role": "user", "content": "Where?"}], latents, max_new_tokens=5) == \
        inference.generate_reply(hub, [{"role": "user", "content": "Where?"}], latents, max_new_tokens=5)

    np.save(tmp_path / "m.npy", latents)
    replies = []
    for model in (actor_dir, "someone/tiny-actor"):
        assert inference.main(["--model_dir", model, "--prompt", "Where is it?", "--latents", str(tmp_path / "m.npy"),
                               "--max_new_tokens", "5", "--device", "cpu"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()

    data = write_jsonl(tmp_path / "e.jsonl", make_records(3, str(tmp_path / "lat")))
    reports = []
    for i, model in enumerate((actor_dir, "someone/tiny-actor")):
        out = str(tmp_path / f"r{i}.json")
        assert evaluate_actor.main(["--model_dir", model, "--eval_file", data, "--output", out, "--device", "cpu",
                                    "--disable_tqdm", "true"]) == 0
        reports.append(json.load(open(out)))
    assert reports[1]["model_dir"] == "someone/tiny-actor"
    assert reports[0]["conditions"] == reports[1]["conditions"]

    # not cached and offline: one line naming the id, no traceback
    capsys.readouterr()
    assert inference.main(["--model_dir", "someone/not-there", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "someone/not-there" in err and err.count("\n") == 0


def test_the_embedded_model_does_not_shadow_the_hub_model(hf_cache, tiny_model_dir, caplog):
    # nothing cached, offline: the embedded copy, and a log line that says so
    with caplog.at_level(logging.WARNING, logger="models"):
        folder = models.resolve_model(models.EMBEDDED_MODEL)
    assert folder == models.embedded_model_dir()
    assert any("embedded copy" in r.getMessage() and "Q4_1" in r.getMessage() for r in caplog.records)
    # the real hub model in the HF cache (here a tiny stand-in under its id): that one, not the embedded copy
    snapshot = put_in_cache(hf_cache, models.EMBEDDED_MODEL, tiny_model_dir)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models"):
        assert models.resolve_model(models.EMBEDDED_MODEL) == snapshot
        model, _ = models.load_model_and_tokenizer(models.EMBEDDED_MODEL)
    assert model.config.hidden_size == 32  # the cached model's (the embedded one has 576)
    assert not any("embedded copy" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# 9. --push_to_hub: every push carries the head and the model card
# ---------------------------------------------------------------------------------------------
class RecordingHub:
    """Stands in for `transformers.trainer.hf_api()` (no network): records what each upload would send."""

    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, commit_message=None, run_as_future=False, path_in_repo=None,
                      **kwargs):
        files = {}
        for name in os.listdir(folder_path):
            path = os.path.join(folder_path, name)
            if os.path.isfile(path):
                files[name] = hashlib.sha256(open(path, "rb").read()).hexdigest()
        card = open(os.path.join(folder_path, "README.md")).read() \
            if os.path.exists(os.path.join(folder_path, "README.md")) else None
        self.uploads.append({"message": commit_message, "path_in_repo": path_in_repo, "files": files, "card": card})
        if run_as_future:
            future = Future()
            future.set_result(None)
            return future
        return None


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_every_push_uploads_the_head_and_a_model_card(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import transformers.trainer

    hub = RecordingHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    monkeypatch.setattr(models, "hub_unreachable_reason", lambda: None)  # the recording hub is always there
    train, evaluation = tiny_data
    out = str(tmp_path / "out")
    argv = ["--model_name_or_path", tiny_model_dir, "--train_file", train, "--eval_file", evaluation,
            "--output_dir", out, "--report_to", "none", "--num_heads", "4", "--prepended_length", str(PREPENDED),
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
            "--eval_strategy", "steps", "--eval_steps", "1", "--eval_latent_conditions", "4",
            "--head_warm_start_steps", "0", "--disable_tqdm", "true", "--learning_rate", "1e-2",
            "--push_to_hub", "true", "--hub_model_id", "someone/actor", "--hub_strategy", "every_save",
            "--sender_model_name_or_path", "someone/sender"]
    assert train_actor.main(argv) == 0
    checkpoint_pushes = [u for u in hub.uploads if u["message"].startswith("Training in progress")]
    assert [u["message"] for u in checkpoint_pushes] == ["Training in progress, step 1", "Training in progress, step 2"]
    for step, upload in zip((1, 2), checkpoint_pushes):
        checkpoint = os.path.join(out, f"checkpoint-{step}")
        # the pushed folder's base weights and head are this checkpoint's (the Trainer alone copied the weights)
        for name in ("model.safetensors", HEAD_FILE, HEAD_SAFETENSORS_FILE):
            assert upload["files"][name] == _digest(os.path.join(checkpoint, name)), (step, name)
        assert "README.md" in upload["files"]
    heads = {u["files"][HEAD_FILE] for u in checkpoint_pushes}
    assert len(heads) == 2  # the head trained between the pushes: each push carried its own
    final = hub.uploads[-1]
    assert final["message"] == "Model save" and final["files"][HEAD_FILE] == _digest(os.path.join(out, HEAD_FILE))
    card = final["card"]
    for needle in ("latent_comm_head", f"base model | {tiny_model_dir}", "someone/sender", f"| {LATENT_DIM} |",
                   f"`prepended_length` (latent rows read per message) | {PREPENDED} |",
                   'LatentActor.from_pretrained("someone/actor")', "the sample's own latents"):
        assert needle in card, needle
    # the evaluation table holds the logged held-out numbers
    cond = [r for r in json.load(open(os.path.join(out, "trainer_state.json")))["log_history"]
            if "cond/true_ce_bits" in r]
    assert f"| the sample's own latents | {cond[-1]['cond/true_ce_bits']:.4f} |" in card


def test_the_model_card_prefers_the_evaluation_report(tmp_path):
    from latent_head import HeadConfig
    from common.model_card import write_actor_card

    report = {"conditions": {"true": {"ce_bits": 0.0123, "exact_match": 1.0, "accuracy": 0.975},
                             "shuffled": {"ce_bits": 6.5, "exact_match": 0.25, "accuracy": None}}}
    (tmp_path / "eval_report.json").write_text(json.dumps(report))
    head = HeadConfig(latent_dim=576, hidden_size=896, num_heads=8, prepended_length=256)
    card = open(write_actor_card(str(tmp_path), "me/actor", head, [], base_model="Qwen/Qwen2.5-0.5B-Instruct")).read()
    assert card.startswith("---\nbase_model: Qwen/Qwen2.5-0.5B-Instruct\n") and "library_name: transformers" in card
    assert "| the sample's own latents | 0.0123 | 100.0% | 97.5% |" in card
    assert "| another sample's latents | 6.5000 | 25.0% | – |" in card
    assert "evaluation/evaluate.py" in card and "| 576 |" in card and "| 256 |" in card


# ---------------------------------------------------------------------------------------------
# 10. Inherited flags are honest
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("main", [train_actor.main, train_sender.main], ids=["train_actor", "train_sender"])
def test_use_liger_kernel_is_refused_with_its_reason(main, tiny_data, tmp_path, capsys, actor_dir):
    train, _ = tiny_data
    argv = ["--train_file", train, "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--use_liger_kernel",
            "true"] + (["--actor_dir", actor_dir] if main is train_sender.main else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--use_liger_kernel is not supported" in err and "fused linear" in err
    assert not os.path.exists(tmp_path / "o")


def test_the_tensorboard_callback_keeps_metric_groups():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from callbacks import MetricGroupTensorBoardCallback

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, key, value, step):
            self.scalars[key] = (value, step)

        def flush(self):
            pass

    callback = MetricGroupTensorBoardCallback(tb_writer=Writer())
    state = TrainerState()
    state.global_step = 7
    callback.on_log(TrainingArguments(output_dir="unused", report_to="none"), state, TrainerControl(),
                    logs={"loss": 1.5, "eval_loss": 2.0, "cond/true_ce_bits": 0.25, "probe/cInfoNCE_LB": 0.5,
                          "epoch": 0.1})
    assert callback.tb_writer.scalars == {"train/loss": (1.5, 7), "eval/loss": (2.0, 7), "cond/true_ce_bits": (0.25, 7),
                                          "probe/cInfoNCE_LB": (0.5, 7), "train/epoch": (0.1, 7)}
    # a log of grouped metrics alone (the conditions after an evaluation): its "epoch" adds nothing
    callback.tb_writer.scalars.clear()
    callback.on_log(TrainingArguments(output_dir="unused", report_to="none"), state, TrainerControl(),
                    logs={"cond/true_ce_bits": 0.5, "epoch": 0.1})
    assert callback.tb_writer.scalars == {"cond/true_ce_bits": (0.5, 7)}


def test_the_conditions_pass_shows_a_progress_bar_unless_disabled(actor, tmp_path, capsys):
    from data import ActorDataset, LatentCollator, build_hf_dataset

    data = write_jsonl(tmp_path / "e.jsonl", make_records(3, str(tmp_path / "lat")))
    dataset = ActorDataset(build_hf_dataset(data), actor.tokenizer, 256, PREPENDED)
    collator = LatentCollator(actor.pad_id, LATENT_DIM)
    quiet = evaluate_actor.evaluate_conditions(actor, dataset, collator, 2, progress=False)
    assert "latent conditions" not in capsys.readouterr().err
    shown = evaluate_actor.evaluate_conditions(actor, dataset, collator, 2, progress=True)
    err = capsys.readouterr().err
    assert "latent conditions" in err and "0/3" in err  # over the 3 samples
    assert shown == quiet  # the bar changes nothing in the numbers
