"""FSDP save/reload check: train sharded under torchrun, then reload the output folder on one process.

    torchrun --nproc_per_node 2 benchmarks/fsdp_check.py train <train_actor flags, with --fsdp>
    python benchmarks/fsdp_check.py reload <output_dir>

`train` runs `train_actor.main` unchanged, then, on every rank (FSDP gathers the parameters inside the
model's call), computes the trained model's logits on the first two training samples, and on rank 0 writes
them to `<output_dir>/fsdp_check.pt` with that batch and a digest of every gathered weight. `reload` loads
the folder with `LatentActor.from_pretrained` in a single process and prints how far its weights and
logits are from the sharded model's; it exits 1 when a weight differs.
`--force_fsdp_on_cpu` (tests only): accelerate silently runs DDP instead of FSDP on CPU; keep FSDP on.
"""
from __future__ import annotations

import hashlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHECK_FILE = "fsdp_check.pt"
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "marker_index", "latents", "latent_lengths")


def checksums(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per weight, a digest of its bytes (float32): equal only for bit-identical weights."""
    return {k: hashlib.sha256(v.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
            for k, v in state.items()}


def keep_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def init_keeping_fsdp(self, *a, fsdp_plugin=None, **k):
        init(self, *a, fsdp_plugin=fsdp_plugin, **k)
        if fsdp_plugin is not None:
            self.fsdp_plugin = fsdp_plugin
        if getattr(self, "fsdp_plugin", None) is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP

    state.AcceleratorState.__init__ = init_keeping_fsdp


def train(argv: list[str]) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import train_actor
    from training import setup

    trainers = []
    build = setup.build_trainer  # train_actor.train imports it from training.setup when it runs
    setup.build_trainer = lambda *a, **k: trainers.append(build(*a, **k)) or trainers[-1]
    rc = train_actor.main(argv)
    if rc:
        return rc
    trainer = trainers[-1]
    if not trainer.is_fsdp_enabled or type(trainer.model.head.pre_ln.weight).__name__ != "DTensor":
        raise SystemExit("fsdp_check: the model was not sharded (FSDP off?)")
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch = {k: batch[k] for k in BATCH_KEYS}
    on_device = {k: v.to(trainer.args.device) for k, v in batch.items()}
    with torch.no_grad(), trainer.accelerator.autocast():
        logits = model(**on_device, latent_rows=on_device["latent_lengths"], output="logits").float().cpu()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_world_process_zero():
        torch.save({"batch": batch, "logits": logits, "checksums": checksums(state)},
                   os.path.join(trainer.args.output_dir, CHECK_FILE))
    return 0


def reload(output_dir: str) -> dict:
    """Load the folder in this process; compare its weights and logits with the sharded model's."""
    from latent_head import LatentActor

    saved = torch.load(os.path.join(output_dir, CHECK_FILE), weights_only=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    actor = LatentActor.from_pretrained(output_dir, dtype=torch.float32, device=device)
    ours = checksums(actor.state_dict())
    batch = {k: v.to(device) for k, v in saved["batch"].items()}
    with torch.no_grad():
        logits = actor(**batch, latent_rows=batch["latent_lengths"], output="logits").float().cpu()
    return {"weights": len(saved["checksums"]), "head_weights": sum(k.startswith("head.") for k in saved["checksums"]),
            "differ": [k for k, v in saved["checksums"].items() if ours.get(k) != v],
            "max_logit_diff": (logits - saved["logits"]).abs().max().item(),
            "logit_scale": saved["logits"].abs().max().item(),
            "argmax_agreement": (logits.argmax(-1) == saved["logits"].argmax(-1)).float().mean().item()}


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if "--force_fsdp_on_cpu" in rest:
        rest.remove("--force_fsdp_on_cpu")
        keep_fsdp_on_cpu()
    if mode == "train":
        from common.cli import exit_process

        exit_process(train(rest))
    result = reload(rest[0])
    print(f"fsdp_check reload {rest[0]}: {result}")
    sys.exit(1 if result["differ"] else 0)
