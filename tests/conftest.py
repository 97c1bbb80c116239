"""Shared fixtures: a tiny random causal LM with a real chat tokenizer, and small data files."""
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Tests have no GPU: Triton kernels (training/loss_kernel.py) run in Triton's interpreter on CPU tensors. Read
# when triton is first imported, so set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
# No test may reach the network: the hub is only ever the local HF cache (common/models.py's resolvers honour this;
# huggingface_hub reads it when first imported, below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import models  # noqa: E402
from latent_head import LatentActor  # noqa: E402

LATENT_DIM = 24  # deliberately not the tiny model's hidden size: exercises the input projection
PREPENDED = 6


@pytest.fixture(scope="session")
def tokenizer_dir():
    """The embedded SmolLM2's folder: a real ChatML tokenizer, offline."""
    return models.resolve_model(models.EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer, saved like a hub model."""
    return models.save_random_llama(str(tmp_path_factory.mktemp("tiny_model")))


def make_records(n: int, latent_dir: str, seed: int = 0, latent_dim: int = LATENT_DIM, multi_turn: bool = True,
                 prefix: str = "s"):
    rng = np.random.default_rng(seed)
    os.makedirs(latent_dir, exist_ok=True)
    records = []
    for i in range(n):
        conv = [{"from": "human", "value": f"Task {i}: where is object {i % 5}?"},
                {"from": "gpt", "value": f"It is in room {i % 3}."}]
        if multi_turn and i % 2:
            conv += [{"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "Yes, quite sure."}]
        k = int(rng.integers(3, 9))
        path = os.path.join(latent_dir, f"{i:03d}.npy")
        np.save(path, rng.standard_normal((k, latent_dim)).astype(np.float32))
        records.append({"id": f"{prefix}{i:03d}", "conversations": conv, "plan": f"Object {i % 5} is in room {i % 3}.",
                        "hidden_state_path": os.path.relpath(path, os.path.dirname(latent_dir))})
    return records


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture
def tiny_data(tmp_path):
    """(train.jsonl, eval.jsonl) with relative latent paths."""
    train = write_jsonl(tmp_path / "train.jsonl", make_records(12, str(tmp_path / "latents")))
    evaluation = write_jsonl(tmp_path / "eval.jsonl", make_records(4, str(tmp_path / "latents_eval"), seed=1, prefix="e"))
    return train, evaluation


def sharpen_(actor: LatentActor, std: float = 0.3, seed: int = 0) -> LatentActor:
    """Re-draw the base model's matrices at `std` and set the head's output scale to 1, in place.

    At the default init (std 0.02) the tiny model's logits spread by ~1 over 49k tokens: every
    distribution is nearly uniform and every branch predicts nearly the same one, so KL and cosine
    terms are ~1e-5 a token, the size of float32 rounding in a log-softmax over 49k entries. At 0.3
    the logits spread by ~10, distributions are peaked, latents visibly change them, and the terms
    are 1e-2..1 a token: well above float32 rounding, so a comparison with float64 tests the code.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in actor.base_model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, std, generator=g)
        actor.head.projection.output_scale.fill_(1.0)
    return actor


def save_tiny_actor(tiny_model_dir: str, out: str, latent_dim: int = LATENT_DIM) -> str:
    """An untrained actor on the tiny model, saved like train_actor.py's output.

    Weights are re-drawn larger than the default init (`sharpen_`) so that greedy generation is not
    one repeated token, and latents visibly change the input.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    actor = LatentActor.from_base(base, tok, latent_dim=latent_dim, num_heads=4, prepended_length=PREPENDED)
    sharpen_(actor)
    actor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def actor_dir(tiny_model_dir, tmp_path_factory):
    return save_tiny_actor(tiny_model_dir, str(tmp_path_factory.mktemp("actor")))


@pytest.fixture(scope="module")
def actor(actor_dir):
    return LatentActor.from_pretrained(actor_dir)
