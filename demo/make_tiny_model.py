"""A tiny, randomly initialised causal LM for trying the toolkit on a CPU in a minute: not a model that knows
anything, a model that makes every step of the pipeline run (sender latents, actor training, evaluation,
generation) in seconds.

    python demo/make_tiny_model.py --out_dir checkpoints/quickstart/tiny_model [--hidden_size 64] [--layers 2]

writes a Llama (4 attention heads, tied embeddings) with the embedded SmolLM2's tokenizer (offline; see
`common/models.py`), saved like a hub model, so every command takes it as `--model_name_or_path`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, from a clone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="folder to write the model into")
    parser.add_argument("--hidden_size", type=int, default=64, help="width (a multiple of 4)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.hidden_size < 8 or args.hidden_size % 8 or args.layers < 1:
        print("error: --hidden_size must be a multiple of 8 (4 heads of even width) and --layers at least 1",
              file=sys.stderr)
        return 2
    from common.models import save_random_llama

    save_random_llama(args.out_dir, args.hidden_size, args.layers, args.seed)
    print(f"wrote a random {args.layers}-layer, {args.hidden_size}-wide Llama to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
