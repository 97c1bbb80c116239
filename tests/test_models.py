"""Model loading: an unknown model fails fast and names the embedded offline model."""
import os
import time

import pytest

from common import models
import train_actor
from conftest import make_records, write_jsonl


def test_missing_model_fails_fast_naming_the_embedded_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(models.ModelNotFoundError, match="HuggingFaceTB/SmolLM2-135M-Instruct"):
        models.resolve_model("no-such-org/no-such-model")
    assert time.monotonic() - start < 5

    train = write_jsonl(tmp_path / "t.jsonl", make_records(2, str(tmp_path / "lat")))
    rc = train_actor.main(["--model_name_or_path", "no-such-org/no-such-model", "--train_file", train,
                           "--output_dir", str(tmp_path / "o"), "--report_to", "none"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model" in err and models.EMBEDDED_MODEL in err and "Traceback" not in err


def test_embedded_model_is_a_cached_plain_model_folder(tokenizer_dir):
    import os

    assert os.path.exists(os.path.join(tokenizer_dir, "config.json"))
    assert os.path.exists(os.path.join(tokenizer_dir, "model.safetensors"))
    assert models.resolve_model(models.EMBEDDED_MODEL) == tokenizer_dir  # converted once, then reused


def test_fsdp_with_lora_is_refused_with_a_clear_message(tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", make_records(2, str(tmp_path / "lat")))
    rc = train_actor.main(["--train_file", train, "--output_dir", str(tmp_path / "o"), "--report_to", "none",
                           "--fsdp", "--lora_r", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "--fsdp with --lora_r is not supported" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")  # refused before anything was written
    rc = train_actor.main(["--train_file", train, "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--fsdp"])
    err = capsys.readouterr().err
    assert rc == 2 and "--fsdp shards the model over several processes: launch with torchrun" in err


def test_the_triton_loss_kernel_without_a_gpu_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as for a user: no interpreter
    train = write_jsonl(tmp_path / "t.jsonl", make_records(2, str(tmp_path / "lat")))
    rc = train_actor.main(["--train_file", train, "--output_dir", str(tmp_path / "o"), "--report_to", "none",
                           "--loss_kernel", "triton"])
    err = capsys.readouterr().err
    assert rc == 2 and "--loss_kernel triton" in err and "use --loss_kernel compile or eager" in err, err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "o")
