"""The shared benchmark workload (../shared/bench/workload.py), as an importable module.

Changes from the shared script, none of which change a step's cost:
- `build(out, shape, n)` is callable from `benchmarks/bench.py`; the tokenizer comes from the gzipped
  `qwen2.5-tokenizer.json.gz` beside this file (Qwen2.5's real one).
- The saved tokenizer gets Qwen2.5's ChatML chat template (system default, no tools), which
  `data.encode_conversation` needs; the shared script saves none.
Same seeds, shapes, word lists and record layout as the shared script: same samples.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_GZ = os.path.join(HERE, "qwen2.5-tokenizer.json.gz")

SHAPES = {
    # Qwen2.5-0.5B-Instruct's published config.
    "qwen05": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=True),
    # Qwen2.5-7B-Instruct's published config (randomly initialised: for memory/speed of big actors).
    "qwen7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                   max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                   tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=151936,
                 max_position_embeddings=4096, tie_word_embeddings=True),
}

WORDS = ("go to the countertop take apple from drawer open fridge put mug in cabinet "
         "you see a desk lamp book pen laptop heat potato with microwave clean cloth "
         "sinkbasin examine shelf find two pillows and put them in armchair nothing "
         "happens think first I need to locate the object then move it carefully").split()

# Qwen2.5-Instruct's chat template without its tool-calling branches.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def load_tokenizer(tok_dir: str):
    import transformers

    path = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.exists(path):
        os.makedirs(tok_dir, exist_ok=True)
        with gzip.open(TOKENIZER_GZ, "rb") as src, open(path + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(path + ".tmp", path)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>")
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build(out: str, shape: str = "qwen05", n: int = 128, seed: int = 0, min_words: int = 500,
          max_words: int = 1800) -> dict:
    """Write `out/model/`, `out/train.jsonl`, `out/hs/*.npy`; return a summary (skips if already built)."""
    import torch
    import transformers

    done = os.path.join(out, "workload.json")
    if os.path.exists(done):
        summary = json.load(open(done))
        if (summary.get("shape"), summary.get("samples"), summary.get("seed"), summary.get("words")) == \
                (shape, n, seed, [min_words, max_words]):
            return summary
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    tok = load_tokenizer(os.path.join(out, "tokenizer"))
    model_dir = os.path.join(out, "model")
    cfg = transformers.Qwen2Config(**SHAPES[shape], bos_token_id=151643, eos_token_id=151645)
    torch.manual_seed(seed)
    # Initialise on the GPU when there is one: a 7B model's random init takes minutes on a CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    d = cfg.hidden_size

    hs_dir = os.path.join(out, "hs")
    os.makedirs(hs_dir, exist_ok=True)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for i in range(n):
            total = rng.randint(min_words, max_words)
            first = rng.randint(total // 5, total // 3)
            conv = [{"from": "human", "value": "Task: " + words(rng, first)}]
            left = total - first
            while left > 0:
                k = min(left, rng.randint(20, 80))
                conv.append({"from": "gpt", "value": "Think: " + words(rng, k)})
                left -= k
                if left > 0:
                    k = min(left, rng.randint(10, 40))
                    conv.append({"from": "human", "value": "Observation: " + words(rng, k)})
                    left -= k
            if conv[-1]["from"] != "gpt":
                conv.append({"from": "gpt", "value": "Action: done"})
            k_steps = rng.randint(64, 256)
            hs = np.random.default_rng(i).standard_normal((k_steps, d)).astype(np.float32)
            path = os.path.join(hs_dir, f"{i:05d}.npy")
            np.save(path, hs)
            rec = {"id": f"s{i:05d}", "conversations": conv, "plan": "Plan: " + words(rng, rng.randint(40, 160)),
                   "hidden_state_path": path}
            f.write(json.dumps(rec) + "\n")
    n_tok = [len(tok("".join(m["value"] for m in json.loads(l)["conversations"])).input_ids)
             for l in open(os.path.join(out, "train.jsonl"))]
    summary = {"shape": shape, "samples": n, "seed": seed, "words": [min_words, max_words], "mean_tokens": float(np.mean(n_tok)),
               "max_tokens": int(max(n_tok)), "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    json.dump(summary, open(done, "w"))
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="qwen05", choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(build(args.out, args.shape, args.n, args.seed)))


if __name__ == "__main__":
    main()
