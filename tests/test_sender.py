"""The compression stage: the sender's batched rollout, its loss, its training CLI and its messages."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, make_records, save_tiny_actor, write_jsonl
from latent_head import LatentActor
from losses import alignment_loss, distillation_kl, first_rows_per_sample, token_entropy, uncertainty_weights
from sender.model import SENDER_FILE, CompressionModel, LatentSender, SenderConfig, fit_rows

WIDTH = 32  # the tiny model's hidden size: the student's latents are the actor's input
K = 5  # the tiny actor reads up to 6 rows; make_records writes 3-8: some data latents are cut, some tiled


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """(student folder, actor folder, train.jsonl, eval.jsonl): an actor whose head reads WIDTH-wide latents."""
    root = tmp_path_factory.mktemp("sender")
    actor_dir = save_tiny_actor(tiny_model_dir, str(root / "actor"), latent_dim=WIDTH)
    train = write_jsonl(root / "train.jsonl", make_records(12, str(root / "latents"), latent_dim=WIDTH))
    evaluation = write_jsonl(root / "eval.jsonl", make_records(4, str(root / "latents_eval"), seed=1,
                                                               latent_dim=WIDTH, prefix="e"))
    return tiny_model_dir, actor_dir, train, evaluation


def new_sender(student_dir: str, k: int = K, seed: int = 0) -> LatentSender:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    return LatentSender(AutoModelForCausalLM.from_pretrained(student_dir), AutoTokenizer.from_pretrained(student_dir),
                        SenderConfig(num_latents=k)).eval()


CONVERSATIONS = [
    [{"role": "user", "content": "Where is the key?"}, {"role": "assistant", "content": "Kitchen."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "The lamp, the scarf and the teapot: where did you leave all of them yesterday?"}],
    [{"role": "user", "content": "Hi"}],
]


# -- the rollout ------------------------------------------------------------------------------------
def test_batched_rollout_equals_one_sample_at_a_time(setup):
    sender = new_sender(setup[0])
    ids, mask = sender.encode_contexts(CONVERSATIONS)
    assert len(set(mask.sum(1).tolist())) == 3  # three different lengths: rows 0 and 2 are left-padded
    with torch.no_grad():
        batched = sender.rollout(ids, mask)
        alone = torch.cat([sender.rollout(*sender.encode_contexts([c])) for c in CONVERSATIONS])
    assert batched.shape == (3, K, WIDTH)
    assert (batched - alone).abs().max() < 1e-5
    assert (batched[:, 0] - batched[:, 1]).abs().max() > 1e-3  # the steps differ: step 2 reads h2e(z_1)


def test_context_is_the_request_then_the_conversation_up_to_the_first_user_message_end(setup):
    sender = new_sender(setup[0])
    tok = sender.tokenizer
    text = tok.decode(sender.context_ids(CONVERSATIONS[0]))
    assert text.startswith(sender.config.request)
    assert text.endswith("Where is the key?")  # no end-of-turn, no reply: the actor's latent block goes here


def test_fit_rows_cuts_or_tiles_to_k():
    latents = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)
    out = fit_rows(latents, torch.tensor([5, 2]), 4)
    assert out[0, :, 0].tolist() == [0, 1, 2, 3]  # cut
    assert out[1, :, 0].tolist() == [5, 6, 5, 6]  # tiled


def test_saved_sender_reloads_and_produces_the_same_latents(setup, tmp_path):
    sender = new_sender(setup[0])
    with torch.no_grad():  # make the bridge and start vector differ from any fresh initialisation
        sender.lat_bos.normal_()
        sender.h2e[1].weight.mul_(3.0)
    sender.save_pretrained(str(tmp_path))
    reloaded = LatentSender.from_pretrained(str(tmp_path))
    assert reloaded.config.num_latents == K
    before, after = sender.messages(CONVERSATIONS), reloaded.messages(CONVERSATIONS)
    for a, b in zip(before, after):
        assert a.shape == (K, WIDTH)
        np.testing.assert_array_equal(a, b)
    # The bridge file loads without pickles.
    assert "lat_bos" in torch.load(tmp_path / SENDER_FILE, weights_only=True)["state_dict"]


# -- the loss terms against hand computations -----------------------------------------------------------
def test_entropy_and_window_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]])
    # uniform over 4: ln 4; (3/4, 1/4): -(0.75 ln 0.75 + 0.25 ln 0.25)
    expected = [math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert token_entropy(logits).tolist() == pytest.approx(expected, abs=1e-6)
    window = first_rows_per_sample(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]), 2)
    assert window.tolist() == [True, True, False, True, True, True, True, False, False]


def test_uncertainty_weights_by_hand():
    h_none = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0])
    h_data = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5])
    # relu(diff) = [2, 1, 0, 0, 2.5]; 0.95 quantile of the positive ones (1, 2, 2.5), linear: 2 + 0.9 * 0.5
    cap = 2.45
    clipped = [2.0, 1.0, 0.0, 0.0, cap]
    mean = sum(clipped) / 5
    assert uncertainty_weights(h_none, h_data, 0.95).tolist() == pytest.approx([c / mean for c in clipped], abs=1e-6)
    assert uncertainty_weights(h_none, h_none + 1, 0.95).tolist() == [0.0] * 5  # latents that never help


def test_distillation_kl_and_alignment_by_hand():
    student = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    weights = torch.tensor([1.5, 0.5])
    t = 4.0

    def kl_by_hand(s, q):
        ps = [math.exp(x / t) / sum(math.exp(y / t) for y in s) for x in s]
        pt = [math.exp(x / t) / sum(math.exp(y / t) for y in q) for x in q]
        return t * t * sum(a * math.log(a / b) for a, b in zip(pt, ps))

    expected = (1.5 * kl_by_hand([2, 0], [0, 2]) + 0.5 * kl_by_hand([0, 0], [4, 0])) / 2.0
    assert distillation_kl(student, teacher, weights, t).item() == pytest.approx(expected, rel=1e-5)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert alignment_loss(a, b).item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 0.0) / 2, abs=1e-6)


def build(setup, tmp_path, *extra):
    """A `SenderTrainer` as sender/train.py builds it."""
    from sender import train as train_sender

    student_dir, actor_dir, train, evaluation = setup
    sender_args, data_args, args = train_sender.parse_args(
        ["--actor_dir", actor_dir, "--model_name_or_path", student_dir, "--train_file", train, "--eval_file",
         evaluation, "--output_dir", str(tmp_path / "out"), "--num_latents", str(K), "--report_to", "none",
         "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", *extra])
    head, _ = train_sender.check_inputs(sender_args, data_args, args)
    model = train_sender.build_model(sender_args, head, args.seed)
    return train_sender.build_trainer(model, sender_args, data_args, args)


def reference_loss(model: CompressionModel, items: list[dict], window: int, temperature: float = 4.0,
                   quantile: float = 0.95) -> dict[str, float]:
    """The loss computed sample by sample with plain torch: one rollout, three actor passes per sample."""
    sender, actor = model.sender, model.actor
    ce, s_win, d_win, n_win, student_pool, data_pool = [], [], [], [], [], []
    for item in items:
        ids = torch.tensor([item["context_ids"]])
        z = sender.rollout(ids, torch.ones_like(ids))
        lat = torch.as_tensor(item["latents"])
        data = torch.stack([lat[j % len(lat)] for j in range(K)])[None]
        text = dict(input_ids=torch.as_tensor(item["input_ids"])[None], labels=torch.as_tensor(item["labels"])[None],
                    attention_mask=torch.ones(1, len(item["input_ids"]), dtype=torch.long),
                    marker_index=torch.tensor([item["marker_index"]]))
        rows = torch.tensor([K])
        logits = {name: actor.logits(actor.branch(**text, latents=x, latent_lengths=r, latent_rows=r).hidden)
                  for name, x, r in (("student", z, rows), ("data", data, rows), ("none", None, None))}
        labels = actor.branch(**text).labels
        ce.append(F.cross_entropy(logits["student"], labels, reduction="none"))
        s_win.append(logits["student"][:window])
        d_win.append(logits["data"][:window])
        n_win.append(logits["none"][:window])
        student_pool.append(actor.head(z, rows)[0].mean(0))
        data_pool.append(actor.head(data, rows)[0].mean(0))
    ce = torch.cat(ce).mean()
    s, d, n = torch.cat(s_win), torch.cat(d_win), torch.cat(n_win)
    entropy = lambda x: -(x.softmax(-1) * x.log_softmax(-1)).sum(-1)
    w = (entropy(n) - entropy(d)).clamp_min(0)
    w = w.clamp(max=torch.quantile(w[w > 0], quantile))
    w = w / w.mean()
    log_t, log_s = (d / temperature).log_softmax(-1), (s / temperature).log_softmax(-1)
    kl = temperature ** 2 * (log_t.exp() * (log_t - log_s)).sum(-1)
    distill = (w * kl).sum() / w.sum()
    align = (1 - F.cosine_similarity(torch.stack(student_pool), torch.stack(data_pool), dim=-1)).mean()
    return {"ce_loss": ce.item(), "distill_kl": distill.item(), "alignment": align.item(),
            "loss": (ce + 0.1 * distill + 0.1 * align).item()}


def test_the_loss_equals_a_sample_by_sample_hand_computation(setup, tmp_path):
    trainer = build(setup, tmp_path, "--distill_window", "2")  # a window shorter than the two-turn replies
    model = trainer.model.eval()
    everything = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    # A batch with contexts of different lengths (left padding) and data latents both cut and tiled.
    items = [max(everything, key=lambda it: len(it["context_ids"])), min(everything, key=lambda it: len(it["latents"]))]
    items += [it for it in everything if len(it["latents"]) >= K][:2]
    assert len({len(it["context_ids"]) for it in items}) > 1 and min(len(it["latents"]) for it in items) < K
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer.data_collator(items))
        logged = trainer._pop_metrics("train" if model.training else "eval")
        expected = reference_loss(model, items, window=2)
    assert expected["distill_kl"] > 1e-3 and expected["alignment"] > 1e-3  # the terms are not vacuous here
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-5)
    for key in ("ce_loss", "distill_kl", "alignment"):
        assert logged[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_gradients_reach_only_the_student_bridge_and_start_vector(setup, tmp_path):
    trainer = build(setup, tmp_path)
    model = trainer.model.train()
    actor_before = {k: v.clone() for k, v in model.actor.state_dict().items()}
    sender_before = {k: v.clone() for k, v in model.sender.state_dict().items()}
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(model, batch).backward()
    assert all(p.grad is None for p in model.actor.parameters())
    assert model.sender.lat_bos.grad.abs().sum() > 0  # through the actor's base model and head, into the sender
    assert model.sender.h2e[1].weight.grad.abs().sum() > 0 and model.sender.h2e[0].weight.grad.abs().sum() > 0
    assert model.sender.student.get_decoder().layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    optimizer = trainer.create_optimizer()
    optimizer.step()
    assert not model.actor.training and not model.actor.head.training  # no head dropout, whatever the mode
    for k, v in model.actor.state_dict().items():
        assert torch.equal(v, actor_before[k]), k
    changed = [k for k, v in model.sender.state_dict().items() if not torch.equal(v, sender_before[k])]
    assert "lat_bos" in changed and "h2e.1.weight" in changed and any(k.startswith("student.") for k in changed)


# -- the command line -------------------------------------------------------------------------------------
def test_help_shows_num_latents():
    out = subprocess.run([sys.executable, "-m", "sender.train", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0 and "--num_latents" in out.stdout and "--actor_dir" in out.stdout


def _losses(path: str) -> dict[int, float]:
    import csv

    with open(path) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


def test_a_tiny_cpu_run_trains_saves_and_resumes(setup, tmp_path):
    from sender import train as train_sender

    student_dir, actor_dir, train, evaluation = setup
    out = tmp_path / "out"
    argv = ["--actor_dir", actor_dir, "--model_name_or_path", student_dir, "--train_file", train,
            "--eval_file", evaluation, "--output_dir", str(out), "--num_latents", str(K), "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--save_steps", "2", "--save_strategy", "steps", "--eval_strategy", "no", "--report_to", "none"]
    actor_files = {f: open(os.path.join(actor_dir, f), "rb").read() for f in ("model.safetensors",
                                                                                "latent_comm_head.pt")}
    assert train_sender.main(argv) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", SENDER_FILE, "loss_log.csv", "loss_curve.png",
                 "trainer_state.json", "checkpoint-2/" + SENDER_FILE, "checkpoint-4/optimizer.pt"):
        assert (out / name).exists(), name
    with open(out / "loss_log.csv") as f:
        header = f.readline().strip().split(",")
    assert {"loss", "ce_loss", "distill_kl", "alignment"} <= set(header)
    losses = _losses(str(out / "loss_log.csv"))
    assert sorted(losses) == [1, 2, 3, 4] and len(set(losses.values())) > 1
    # The saved sender is trained (not its initialisation) and reloads; the actor's files are untouched.
    trained = LatentSender.from_pretrained(str(out))
    fresh = new_sender(student_dir)
    assert not torch.equal(trained.student.get_input_embeddings().weight, fresh.student.get_input_embeddings().weight)
    for f, content in actor_files.items():
        assert open(os.path.join(actor_dir, f), "rb").read() == content

    # Resume from step 2: the same losses at steps 3 and 4.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    argv_resumed = [a if a != str(out) else str(resumed) for a in argv] + ["--resume_from_checkpoint", "latest"]
    assert train_sender.main(argv_resumed) == 0
    again = _losses(str(resumed / "loss_log.csv"))
    for step in (3, 4):
        assert again[step] == pytest.approx(losses[step], abs=1e-5)


def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys):
    from sender import train as train_sender

    student_dir, actor_dir, train, _ = setup
    base = ["--model_name_or_path", student_dir, "--train_file", train, "--output_dir", str(tmp_path / "o"),
            "--report_to", "none"]
    assert train_sender.main(base + ["--actor_dir", str(tmp_path)]) == 2
    assert "no latent_comm_head.pt" in capsys.readouterr().err
    assert train_sender.main(base + ["--actor_dir", actor_dir, "--num_latents", "99"]) == 2
    assert "--num_latents 99" in capsys.readouterr().err
    # The data are checked before any model is loaded, with train_actor.py's validation.
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"id": "x", "conversations": [{"from": "gpt", "value": "hi"}]}])
    broken_args = [a if a != train else broken for a in base] + ["--actor_dir", actor_dir, "--num_latents", str(K)]
    assert train_sender.main(broken_args + ["--validate_only"]) == 1
    assert "no_human_turn" in capsys.readouterr().err
    assert train_sender.main(base + ["--actor_dir", actor_dir, "--num_latents", str(K), "--validate_only"]) == 0


def test_collect_compressed_without_a_sender_is_one_line_error(tmp_path, capsys):
    from sender import collect as collect_hidden_states

    raw = write_jsonl(tmp_path / "raw.jsonl", [{"id": "a", "conversations": [{"from": "human", "value": "Hi"}]}])
    assert collect_hidden_states.main(["--mode", "compressed", "--sender_dir", str(tmp_path), "--input_file", raw,
                                       "--output_file", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no latent_sender.pt" in err and str(tmp_path) in err


# -- compressed messages for evaluation/evaluate.py / evaluation/inference.py -------------------------------------------------
def test_collect_compressed_writes_k_row_latents_that_the_actor_reads(setup, tmp_path):
    from sender import collect as collect_hidden_states
    from data import ActorDataset, build_hf_dataset

    sender = new_sender(setup[0])
    with torch.no_grad():
        sender.lat_bos.normal_()
    sender.save_pretrained(str(tmp_path / "sender"))
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Where is object {i}? " * (i + 1)},
                                                 {"from": "gpt", "value": "In the attic."}],
                "plan": "It is in the attic.", "answer": "attic"} for i in range(3)]
    raw = write_jsonl(tmp_path / "raw.jsonl", records)
    out = tmp_path / "compressed.jsonl"
    assert collect_hidden_states.main(["--mode", "compressed", "--sender_dir", str(tmp_path / "sender"),
                                       "--input_file", raw, "--output_file", str(out), "--dtype", "float32",
                                       "--batch_size", "2"]) == 0
    written = [json.loads(line) for line in open(out)]
    expected = sender.messages([[{"role": "user", "content": r["conversations"][0]["value"]},
                                 {"role": "assistant", "content": "In the attic."}] for r in records])
    for rec, want in zip(written, expected):
        assert rec["plan"] == "It is in the attic." and rec["answer"] == "attic"  # kept for the other conditions
        got = np.load(tmp_path / rec["hidden_state_path"])
        assert got.shape == (K, WIDTH)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # evaluation/evaluate.py / evaluation/inference.py read these files as any latent message: K rows each.
    actor = LatentActor.from_pretrained(setup[1])
    dataset = ActorDataset(build_hf_dataset(str(out)), actor.tokenizer, 512, actor.head.config.prepended_length)
    assert [dataset[i]["latents"].shape for i in range(3)] == [(K, WIDTH)] * 3


# -- a sender that reads the plan as private notes (tasks whose plan holds what the task lacks) ------------
def test_plan_knowledge_sender_reads_the_plan_and_collect_passes_it(setup, tmp_path, capsys):
    from sender import collect as collect_hidden_states
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    sender = LatentSender(AutoModelForCausalLM.from_pretrained(setup[0]), AutoTokenizer.from_pretrained(setup[0]),
                          SenderConfig(num_latents=K, knowledge="plan")).eval()
    conversation = CONVERSATIONS[0]
    text = sender.tokenizer.decode(sender.context_ids(conversation, "It is in the attic."))
    assert text.startswith(sender.config.request + "What you know: It is in the attic.")
    assert text.endswith("Where is the key?")
    with pytest.raises(ValueError, match="plan"):
        sender.context_ids(conversation, None)
    with torch.no_grad():  # the same task with another plan: another message
        attic, cellar = sender.messages([conversation] * 2, plans=["It is in the attic.", "It is in the cellar."])
    assert np.abs(attic - cellar).max() > 1e-3
    # The knowledge travels with the saved sender, and sender/collect.py gives it each record's plan.
    sender.save_pretrained(str(tmp_path / "sender"))
    assert LatentSender.from_pretrained(str(tmp_path / "sender")).config.knowledge == "plan"
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "Where is the key?"},
                                                 {"from": "gpt", "value": "Kitchen."}],
                "plan": f"It is in room {i}."} for i in range(2)]
    out = tmp_path / "compressed.jsonl"
    args = ["--mode", "compressed", "--sender_dir", str(tmp_path / "sender"), "--output_file", str(out),
            "--dtype", "float32"]
    assert collect_hidden_states.main(args + ["--input_file", write_jsonl(tmp_path / "raw.jsonl", records)]) == 0
    written = [np.load(tmp_path / json.loads(line)["hidden_state_path"]) for line in open(out)]
    expected = sender.messages([[{"role": "user", "content": "Where is the key?"},
                                 {"role": "assistant", "content": "Kitchen."}]] * 2, plans=[r["plan"] for r in records])
    for got, want in zip(written, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # A record without a plan is refused before any work, naming the record.
    del records[1]["plan"]
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    assert collect_hidden_states.main(args[:-4] + ["--output_file", str(tmp_path / "bad_out.jsonl"),
                                                   "--input_file", bad]) == 2
    err = capsys.readouterr().err
    assert "id 'r1'" in err and "`plan`" in err


def test_train_sender_with_plan_knowledge_trains_on_contexts_with_the_plan(setup, tmp_path):
    from sender import train as train_sender

    student_dir, actor_dir, train, _ = setup
    out = tmp_path / "out"
    assert train_sender.main(["--actor_dir", actor_dir, "--model_name_or_path", student_dir, "--train_file", train,
                              "--output_dir", str(out), "--num_latents", str(K), "--max_steps", "1",
                              "--per_device_train_batch_size", "2", "--sender_knowledge", "plan",
                              "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none"]) == 0
    sender = LatentSender.from_pretrained(str(out))
    assert sender.config.knowledge == "plan"
    # The training contexts held each record's plan, as the saved sender will read it.
    from data import ActorDataset, build_hf_dataset
    from sender.model import SenderDataset

    from transformers import AutoTokenizer

    rows = build_hf_dataset(train)
    actor_rows = ActorDataset(rows, AutoTokenizer.from_pretrained(actor_dir), 512, K)
    dataset = SenderDataset(actor_rows, sender.tokenizer, knowledge="plan")
    record = json.loads(open(train).readline())
    assert sender.tokenizer.decode(dataset[0]["context_ids"]).startswith(
        sender.config.request + "What you know: " + record["plan"])
    assert train_sender.main(["--actor_dir", actor_dir, "--model_name_or_path", student_dir, "--train_file", train,
                              "--output_dir", str(tmp_path / "o2"), "--sender_knowledge", "facts",
                              "--report_to", "none"]) == 2


def test_compression_eval_runs_k_seed_jobs_in_parallel_and_skips_past_its_budget(setup, tmp_path):
    """benchmarks/compression_eval.py: two K/seed trainings at once give the table; a run whose budget is
    spent skips what it has not started (and says so) but keeps what already exists."""
    student_dir, actor_dir, train, evaluation = setup
    out = tmp_path / "ce"
    base = [sys.executable, os.path.join(ROOT, "benchmarks", "compression_eval.py"), "--actor_dir", actor_dir,
            "--sender_model", student_dir, "--train_file", train, "--eval_file", evaluation, "--out_dir", str(out),
            "--skip_latency", "--train_flags", "--max_steps 1 --per_device_train_batch_size 4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(base + ["--ks", "3", "--seeds", "0,1", "--jobs", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.load(open(out / "compression.json"))
    assert sorted(result["compressed"]["3"]) == ["0", "1"] and result["skipped"] == []
    assert json.load(open(out / "K3_seed1" / "eval_report.json"))["conditions"]["true"]["samples"] == 4
    # Budget spent at once: K = 2 is not started; K = 3's reports exist and are read back, not retrained.
    done = subprocess.run(base + ["--ks", "3,2", "--seeds", "0", "--time_budget_s", "1e-9"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.load(open(out / "compression.json"))
    assert result["skipped"] == ["K2_seed0"] and list(result["compressed"]) == ["3"]
    # The table holds every K/seed finished in the folder (seed 1 came from the first invocation), so two
    # invocations sharing it (one per GPU) cannot overwrite each other's rows; each says how it was trained.
    assert sorted(result["compressed"]["3"]) == ["0", "1"]
    assert result["compressed"]["3"]["1"]["run"]["train_flags"] == "--max_steps 1 --per_device_train_batch_size 4"
    assert "skipped" in done.stdout and not (out / "K2_seed0").exists()
