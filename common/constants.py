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
