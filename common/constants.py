"""Names shared by every layer: the latent block's tokens, the label to ignore, the files a run writes.

The lowest module of the package (imports nothing of it): data, the model, training, the sender and
the evaluation all read these from here, so each is written once.
"""
from __future__ import annotations

# The latent block: the marker ends the first user message in the data; the model replaces it with
# <bop> latent rows [plan tokens] <eop>.
MARKER_TOKEN, BOP_TOKEN, EOP_TOKEN = "<FIRST_HUMAN_END>", "<bop>", "<eop>"
SPECIAL_TOKENS = (MARKER_TOKEN, BOP_TOKEN, EOP_TOKEN)
IGNORE_INDEX = -100  # label of a token that is not supervised (PyTorch's cross-entropy default)

# Defaults that every tool must agree on (training, validation, evaluation, inference)
PREPENDED_LENGTH = 256  # latent rows the head reads per sample (the first ones), unless configured
MODEL_MAX_LENGTH = 3072  # the actor's longest sequence, latent block included, unless configured
EMBEDDED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the base model that works offline (common/models.py)

# The losses' defaults (losses.py computes them; common/args.py offers them as flags, without importing torch)
LOSS_CHUNK_SIZE = 1024  # supervised rows projected to the vocabulary at a time: bounds [rows, vocab] logits
# the compression stage (sender/train.py): the sender learns to speak in K latents
COMPRESSION_KL_WEIGHT, COMPRESSION_ALIGN_WEIGHT = 0.1, 0.1
DISTILL_TEMPERATURE = 4.0
DISTILL_WINDOW = 64  # supervised tokens per sample that the distillation term looks at
UNCERTAINTY_QUANTILE = 0.95
SENDER_REQUEST = "Please generate a plan to solve this task: "  # the published student's fixed request

# A collated batch's conversation tensors (what every branch shares)
TEXT_KEYS = ("input_ids", "labels", "attention_mask", "marker_index")

# Files
INTERRUPTED_DIR = "interrupted"  # in an output folder: the model saved when a run broke on bad data
HEAD_FILE = "latent_comm_head.pt"  # the latent head's configuration and weights, next to the actor's model
# (the specification's file: torch.load(..., weights_only=True))
HEAD_SAFETENSORS_FILE = "latent_comm_head.safetensors"  # the same head for hub tooling; its config in the metadata
SENDER_FILE = "latent_sender.pt"  # the compressed sender's bridge, start vector and configuration
LATENT_OWNER_FILE = ".latents_of.json"  # in a latent folder: the output file whose latents it holds
LOSS_LOG_FILE, LOSS_CURVE_FILE = "loss_log.csv", "loss_curve.png"
