"""Shared fixtures: a tiny random causal LM with a real chat tokenizer, and small data files. The helpers they use
(and the tests import) are in `tests/helpers.py`."""
import pytest

from tests.helpers import make_records, save_tiny_actor, write_jsonl  # first: it sets the test environment
from common import models
from latent_head import LatentActor


@pytest.fixture(scope="session")
def tokenizer_dir():
    """The embedded SmolLM2's folder: a real ChatML tokenizer, offline."""
    return models.resolve_model(models.EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer, saved like a hub model."""
    return models.save_random_llama(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture
def tiny_data(tmp_path):
    """(train.jsonl, eval.jsonl) with relative latent paths."""
    train = write_jsonl(tmp_path / "train.jsonl", make_records(12, str(tmp_path / "latents")))
    evaluation = write_jsonl(tmp_path / "eval.jsonl",
                             make_records(4, str(tmp_path / "latents_eval"), seed=1, prefix="e"))
    return train, evaluation


@pytest.fixture(scope="module")
def actor_dir(tiny_model_dir, tmp_path_factory):
    return save_tiny_actor(tiny_model_dir, str(tmp_path_factory.mktemp("actor")))


@pytest.fixture(scope="module")
def actor(actor_dir):
    return LatentActor.from_pretrained(actor_dir)
