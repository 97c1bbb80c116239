"""Resumption after SIGKILL replays the same losses; numerical guards keep NaN out of the weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_actor
from tests.helpers import ROOT, make_records, write_jsonl
from training.trainer import checkpoint_is_complete, resolve_resume

N = 3  # checkpoint after N steps; runs go to 2N

# Runs train_actor in a child process that SIGKILLs itself in the middle of step `kill_at`.
KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train_actor
from transformers import TrainerCallback
from training.trainer import LatentActorTrainer
class Kill(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
original = LatentActorTrainer.__init__
def init(self, *a, **k):
    original(self, *a, **k)
    self.add_callback(Kill())
LatentActorTrainer.__init__ = init
sys.exit(train_actor.main(sys.argv[1:]))
"""


def _argv(model_dir, train, out, *extra):
    return ["--model_name_or_path", model_dir, "--train_file", train, "--output_dir", out, "--report_to", "none",
            "--num_heads", "4", "--prepended_length", "6", "--per_device_train_batch_size", "2",
            "--max_steps", str(2 * N), "--save_strategy", "steps", "--save_steps", str(N), "--logging_steps", "1",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0", *extra]


def _losses(out):
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    return {r["step"]: r for r in state["log_history"] if "loss" in r}


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(16, str(tmp_path / "lat")))
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    assert train_actor.main(_argv(tiny_model_dir, train, full)) == 0

    script = KILLER.format(root=ROOT, kill_at=N + 1)
    run = subprocess.run([sys.executable, "-c", script, *_argv(tiny_model_dir, train, killed)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == -9, run.stderr[-2000:]  # really killed
    assert not os.path.exists(os.path.join(killed, f"checkpoint-{2 * N}"))
    assert resolve_resume("latest", killed).endswith(f"checkpoint-{N}")

    assert train_actor.main(_argv(tiny_model_dir, train, killed, "--resume_from_checkpoint", "latest")) == 0
    expected, resumed = _losses(full), _losses(killed)
    for step in range(N + 1, 2 * N + 1):
        for key in ("loss", "ce_loss", "plan_similarity", "random_contrast", "grad_norm"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-6), (step, key)
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(killed, "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_half_written_checkpoint_is_never_resumed(tmp_path):
    good, broken = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    for d in (good, broken):
        d.mkdir()
        (d / "latent_comm_head.pt").write_bytes(b"x")
    (good / "trainer_state.json").write_text('{"global_step": 2}')
    (broken / "trainer_state.json").write_text('{"global_st')  # killed mid-write
    assert checkpoint_is_complete(str(good)) and not checkpoint_is_complete(str(broken))
    assert resolve_resume("true", str(tmp_path)) == str(good)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(broken), str(tmp_path))


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_gradient_is_reported_and_never_reaches_the_weights(tiny_model_dir, tmp_path, policy, caplog,
                                                                      monkeypatch):
    import latent_head

    train = write_jsonl(tmp_path / "train.jsonl", make_records(8, str(tmp_path / "lat")))
    calls = {"n": 0}
    forward = latent_head.LatentCommHead.forward

    def poisoned(self, latents, lengths):
        calls["n"] += 1
        out = forward(self, latents, lengths)
        return out * float("nan") if calls["n"] == 2 else out  # step 2 (one head call per step here)

    monkeypatch.setattr(latent_head.LatentCommHead, "forward", poisoned)
    out = str(tmp_path / policy)
    rc = train_actor.main(_argv(tiny_model_dir, train, out, "--save_strategy", "no", "--max_steps", "4",
                                "--nonfinite_policy", policy, "--random_contrast_weight", "0",
                                "--plan_similarity_weight", "0",
                                "--head_warm_start_steps", "0"))  # head calls counted from the first step
    assert rc == (0 if policy == "skip" else 1)
    messages = [r.getMessage() for r in caplog.records if "Non-finite gradient" in r.getMessage()]
    assert len(messages) == 1 and "step 2" in messages[0] and "samples: s0" in messages[0]
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["global_step"] == (4 if policy == "skip" else 2)
