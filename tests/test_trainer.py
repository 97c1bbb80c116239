"""The Trainer path: curriculum draws, negatives, gradient accumulation, command lines, outputs."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import train_actor
from tests.helpers import ROOT, make_records, write_jsonl
from common.args import DEFAULT_ACTOR_MODEL
from common.training_args import ActorTrainingArguments
from training.setup import resolve_auto_settings
from training.trainer import LatentActorTrainer, draw_mix_ratios, pick_negatives

SPEC_BASIC = """--model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --train_file ./data/train.json
  --eval_file ./data/eval.json --output_dir ./checkpoints/actor_model --per_device_train_batch_size 2
  --per_device_eval_batch_size 2 --num_train_epochs 3 --learning_rate 2e-5 --save_steps 500 --eval_steps 500
  --logging_steps 50 --evaluation_strategy steps --save_strategy steps --save_total_limit 5
  --model_max_length 3072 --dataloader_num_workers 4"""
SPEC_ADVANCED = """--model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --train_file ./data/train.json
  --eval_file ./data/eval.json --output_dir ./checkpoints/actor_model --per_device_train_batch_size 4
  --per_device_eval_batch_size 4 --num_train_epochs 5 --learning_rate 1e-5 --warmup_ratio 0.1 --weight_decay 0.01
  --prepended_length 256 --num_heads 8 --plan_similarity_weight 1.0 --random_contrast_weight 2.0
  --enable_loss_plot true --enable_infoNCE_probe true --infoNCE_probe_interval 200"""


def test_both_specification_command_lines_parse():
    model, data, args = train_actor.parse_args(shlex.split(SPEC_BASIC))
    assert args.eval_strategy == "steps" and args.eval_steps == 500 and args.save_total_limit == 5
    assert data.model_max_length == 3072 and args.dataloader_num_workers == 4 and args.dataloader_persistent_workers
    assert args.load_best_model_at_end and args.metric_for_best_model == "loss"
    model, data, args = train_actor.parse_args(shlex.split(SPEC_ADVANCED))
    assert args.warmup_steps == 0.1 and args.weight_decay == 0.01
    assert args.enable_loss_plot and args.enable_infoNCE_probe and args.infoNCE_probe_interval == 200
    assert (model.prepended_length, model.num_heads) == (256, 8)
    assert (model.plan_similarity_weight, model.random_contrast_weight) == (1.0, 2.0)
    defaults = train_actor.parse_args(["--output_dir", "x"])
    # no model named: --validate_only checks structure only; training takes the specification's default then
    assert defaults[0].model_name_or_path is None and DEFAULT_ACTOR_MODEL == "Qwen/Qwen2.5-0.5B-Instruct"
    assert defaults[2].learning_rate == 2e-5
    assert not defaults[2].bf16 and not defaults[2].fp16  # no GPU here: auto-detect picks fp32
    assert defaults[2].dataloader_num_workers == 0 and not defaults[2].dataloader_persistent_workers  # nor workers
    assert not defaults[2].dataloader_pin_memory  # nor pinned memory (torch warns without an accelerator)
    assert train_actor.parse_args(["--output_dir", "x", "--dataloader_pin_memory", "true"])[2].dataloader_pin_memory


def test_mix_ratios_are_fresh_per_sample_and_step_and_include_pure_latents():
    ratios = [draw_mix_ratios(4, (0.2, 0.5, 0.8), 0.25, torch.Generator().manual_seed(step)) for step in range(50)]
    stacked = torch.stack(ratios)
    assert (stacked == 1.0).any(), "pure latents (ratio 1) must occur in training"
    assert len({tuple(r.tolist()) for r in ratios}) > 40  # re-drawn at every step, not fixed per slot
    assert set(stacked.unique().tolist()) <= set(torch.tensor([0.2, 0.5, 0.8, 1.0]).tolist())
    assert 0.15 < (stacked == 1.0).float().mean() < 0.35


def test_negatives_are_never_the_sample_itself():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        b = int(torch.randint(2, 6, (1,), generator=g))
        valid = torch.rand(b, generator=g) > 0.2
        own = torch.arange(b)
        donor, found = pick_negatives(own, valid, torch.zeros(0, dtype=torch.bool), g)
        assert not (found & (donor == own)).any()
        assert valid[donor[found]].all()
        # found exactly when another sample with latents exists
        others = torch.stack([(valid & (torch.arange(b) != i)).any() for i in range(b)])
        assert torch.equal(found, others)
    # batch size 1: the only candidate is a latent kept from an earlier batch
    donor, found = pick_negatives(torch.tensor([0]), torch.tensor([True]), torch.tensor([True]), g)
    assert found.item() and donor.item() == 1
    donor, found = pick_negatives(torch.tensor([0]), torch.tensor([True]), torch.zeros(0, dtype=torch.bool), g)
    assert not found.item()


def _train_argv(model_dir, train, out, *extra):
    return ["--model_name_or_path", model_dir, "--train_file", train, "--output_dir", out, "--report_to", "none",
            "--num_heads", "4", "--prepended_length", "6", "--save_strategy", "no", "--disable_tqdm", "true",
            *extra]


def _one_step_update(model_dir, train, out, batch, accumulation, *extra):
    """Parameters after one SGD step with lr 1 and no clipping: their change is minus the gradient."""
    argv = _train_argv(model_dir, train, out, "--per_device_train_batch_size", str(batch),
                       "--gradient_accumulation_steps", str(accumulation), "--max_steps", "1",
                       "--optim", "sgd", "--learning_rate", "1.0", "--lr_scheduler_type", "constant",
                       "--max_grad_norm", "0", "--weight_decay", "0", "--head_dropout", "0",
                       "--pure_latent_prob", "1.0", "--random_contrast_weight", "0",
                       "--train_sampling_strategy", "sequential", "--logging_steps", "1",
                       "--head_warm_start_steps", "0", *extra)  # its batches follow the batch size
    captured = {}
    original = LatentActorTrainer.train

    def train_and_capture(self, *a, **k):
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        result = original(self, *a, **k)
        captured.update({n: before[n] - p.detach() for n, p in self.model.named_parameters()})
        return result

    LatentActorTrainer.train = train_and_capture
    try:
        assert train_actor.main(argv) == 0
    finally:
        LatentActorTrainer.train = original
    return captured


@pytest.mark.slow
def test_two_accumulation_steps_of_two_equal_one_step_of_four(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(4, str(tmp_path / "lat")))  # different lengths
    g4 = _one_step_update(tiny_model_dir, train, str(tmp_path / "a"), batch=4, accumulation=1)
    g22 = _one_step_update(tiny_model_dir, train, str(tmp_path / "b"), batch=2, accumulation=2)
    assert g4.keys() == g22.keys()
    worst = max((g4[k] - g22[k]).abs().max().item() / (g4[k].abs().max().item() + 1e-12) for k in g4)
    assert worst < 1e-4, worst
    assert any(g4[k].abs().max() > 0 for k in g4 if k.startswith("head."))  # the head is trained


def _worst_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() / (a[k].abs().max().item() + 1e-12) for k in a)


@pytest.mark.slow
def test_fast_paths_give_the_reference_update(tiny_model_dir, tmp_path):
    """Packed rows, the fused (compiled) loss and compiled layers change speed, not the step: one SGD step
    of the full three-branch loss (plan and contrast terms on) moves every parameter as the padded,
    autograd, eager path does."""
    train = write_jsonl(tmp_path / "train.jsonl", make_records(4, str(tmp_path / "lat")))  # different lengths
    full_loss = ("--random_contrast_weight", "2.0", "--pure_latent_prob", "0.5")
    reference = _one_step_update(tiny_model_dir, train, str(tmp_path / "ref"), 4, 1, *full_loss,
                                 "--packed_sequences", "false", "--fused_loss", "false")
    fast = _one_step_update(tiny_model_dir, train, str(tmp_path / "fast"), 4, 1, *full_loss,
                            "--packed_sequences", "true", "--fused_loss", "true", "--loss_kernel", "triton",
                            "--compile_layers", "true")
    assert _worst_relative_difference(reference, fast) < 1e-4
    assert max(v.abs().max().item() for v in fast.values()) > 0


@pytest.mark.slow
def test_bf16_loss_projections_move_the_weights_as_float32_within_bf16_precision(tiny_model_dir, tmp_path):
    """`--loss_matmul_dtype bfloat16` reaches the loss (the update changes) and stays a bf16 rounding of it."""
    train = write_jsonl(tmp_path / "train.jsonl", make_records(4, str(tmp_path / "lat")))
    full_loss = ("--random_contrast_weight", "2.0", "--pure_latent_prob", "0.5")
    updates = {dtype: _one_step_update(tiny_model_dir, train, str(tmp_path / dtype), 4, 1, *full_loss,
                                       "--loss_matmul_dtype", dtype) for dtype in ("float32", "bfloat16")}
    worst = _worst_relative_difference(updates["float32"], updates["bfloat16"])
    assert 1e-6 < worst < 2e-2, worst  # measured 0.8%


EXPECTED_OUTPUTS = {"config.json", "model.safetensors", "tokenizer", "tokenizer.json", "latent_comm_head.pt",
                    "loss_log.csv", "loss_curve.png", "trainer_state.json"}


@pytest.mark.slow
def test_end_to_end_writes_every_output(tiny_model_dir, tiny_data, tmp_path):
    train, evaluation = tiny_data
    out = str(tmp_path / "out")
    argv = _train_argv(tiny_model_dir, train, out, "--eval_file", evaluation, "--per_device_train_batch_size", "2",
                       "--max_steps", "6", "--logging_steps", "2", "--evaluation_strategy", "steps",
                       "--eval_steps", "3", "--save_strategy", "steps", "--save_steps", "3",
                       "--save_total_limit", "1", "--enable_infoNCE_probe", "true", "--infoNCE_probe_interval", "3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_actor.main(argv) == 0
    # a first run on a CPU prints no warning a user cannot act on (torch's pin_memory one came at every loader)
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    files = set(os.listdir(out))
    assert EXPECTED_OUTPUTS <= files, EXPECTED_OUTPUTS - files
    checkpoints = sorted(f for f in files if f.startswith("checkpoint-"))
    assert 1 <= len(checkpoints) <= 2  # save_total_limit 1, plus the best one if it differs
    for ckpt in checkpoints:
        assert os.path.exists(os.path.join(out, ckpt, "latent_comm_head.pt"))  # checkpoints carry the head
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    train_logs = [r for r in state["log_history"] if "loss" in r]
    eval_logs = [r for r in state["log_history"] if "eval_loss" in r]
    for key in ("ce_loss", "plan_similarity", "random_contrast", "delta_nll_bits", "js_bits"):
        assert key in train_logs[0] and "eval_" + key in eval_logs[0]
    assert any("probe/cInfoNCE_LB" in r for r in state["log_history"])
    assert any("cond/shuffled_ce_bits" in r and "cond/true_ce_bits" in r for r in state["log_history"])
    header = open(os.path.join(out, "loss_log.csv")).readline()
    assert "ce_loss" in header and "eval_random_contrast" in header
    # the default head warm start ran first and brought the head's rows closer to the plan embeddings
    warm = next(r for r in state["log_history"] if "warm_start/loss" in r)
    assert warm["warm_start/steps"] == 300 and warm["warm_start/loss"] < 0.5 * warm["warm_start/first_loss"]
    # the total is CE + 1.0 * plan similarity + 2.0 * contrast
    r = train_logs[0]
    assert r["loss"] == pytest.approx(r["ce_loss"] + r["plan_similarity"] + 2 * r["random_contrast"], rel=1e-3)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo) under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           *argv, "--ddp_backend", "gloo", "--use_cpu", "true"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


# `accelerate config`'s answers for one machine, two processes (docs/scaling.md); the processes train on the CPU
# (gloo) because the script is told --use_cpu: accelerate's own MULTI_CPU mode needs MPI.
ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
rdzv_backend: static
same_network: true
"""


def _accelerate_launch(*argv: str, config_dir) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo) under `accelerate launch` with a 2-process config file."""
    config = os.path.join(config_dir, "accelerate.yaml")
    with open(config, "w") as f:
        f.write(ACCELERATE_CONFIG)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
           "--main_process_port", str(_free_port()), *argv, "--ddp_backend", "gloo", "--use_cpu", "true"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


# Runs train_actor under torchrun and records, per rank, every negative drawn and every mix ratio.
RECORDER = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch, train_actor
from training import trainer as trainer_module
log = {{"negatives": [], "ratios": []}}
draw = trainer_module.draw_mix_ratios
def recording_draw(*a, **k):
    ratios = draw(*a, **k)
    log["ratios"].append(ratios.tolist())
    return ratios
trainer_module.draw_mix_ratios = recording_draw
compute_loss = trainer_module.LatentActorTrainer.compute_loss
def recording_compute_loss(self, *a, **k):
    loss = compute_loss(self, *a, **k)
    n = self.last_negatives
    log["negatives"].append({{"own": n["own"].tolist(), "donor": n["donor"].tolist(), "found": n["found"].tolist(),
                             "pool_size": n["pool_size"]}})
    return loss
trainer_module.LatentActorTrainer.compute_loss = recording_compute_loss
rc = train_actor.main(sys.argv[1:])
json.dump(log, open(os.path.join({out!r}, "negatives_rank%s.json" % os.environ["RANK"]), "w"))
train_actor.exit_process(rc)  # leaves the process group first, as `python train_actor.py` does
"""


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_draw_negatives_across_ranks(launcher, tiny_model_dir, tiny_data, tmp_path):
    train, _ = tiny_data
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    script = tmp_path / "record.py"
    script.write_text(RECORDER.format(root=ROOT, out=out))
    argv = (str(script), *_train_argv(tiny_model_dir, train, out, "--per_device_train_batch_size", "2",
                                      "--max_steps", "6", "--logging_steps", "1"))
    result = _torchrun(*argv) if launcher == "torchrun" else _accelerate_launch(*argv, config_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    assert state["global_step"] == 6 and os.path.exists(os.path.join(out, "latent_comm_head.pt"))
    logs = [json.load(open(os.path.join(out, f"negatives_rank{r}.json"))) for r in (0, 1)]
    from_other_rank = 0
    for rank, log in enumerate(logs):
        assert len(log["negatives"]) == 6
        for step in log["negatives"]:
            assert step["pool_size"] == 4  # both ranks' samples
            for own, donor, found in zip(step["own"], step["donor"], step["found"]):
                assert found and donor != own  # never the sample itself
                from_other_rank += donor // 2 != rank
    assert from_other_rank > 0
    assert logs[0]["ratios"] != logs[1]["ratios"]  # each rank has its own random stream


@pytest.mark.distributed
def test_fsdp_trains_as_ddp_and_its_checkpoints_reload_on_one_process(tiny_model_dir, tiny_data, tmp_path):
    """FSDP2 on CPU (gloo): the real `fully_shard` path, sharded parameters and full-state-dict saving."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import fsdp_check
    from latent_head import LatentActor

    train, _ = tiny_data
    argv = lambda out, *extra: _train_argv(tiny_model_dir, train, str(tmp_path / out), "--per_device_train_batch_size",
                                           "2", "--max_steps", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
                                           "--train_sampling_strategy", "sequential", "--head_dropout", "0", *extra)
    check = [os.path.join(ROOT, "benchmarks", "fsdp_check.py"), "train", "--force_fsdp_on_cpu",
             "--fsdp", "--fsdp_config", '{"version": 2}']
    runs = {}
    for name, launch, extra in ((("fsdp", check, ["--save_strategy", "steps", "--save_steps", "2"])),
                                ("ddp", [os.path.join(ROOT, "train_actor.py")], []),
                                ("fsdp_resumed", check, ["--resume_from_checkpoint",
                                                         str(tmp_path / "fsdp_resumed" / "checkpoint-2")])):
        if name == "fsdp_resumed":  # resume a copy of the FSDP run's step-2 checkpoint: optimizer state included
            shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", tmp_path / name / "checkpoint-2")
        result = _torchrun(*launch, *argv(name, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tmp_path / name

    # the output folders (base model + head, gathered from the shards) reload on one process: the same
    # weights, the head's included, and the same logits as the sharded model's at the end of training
    for name in ("fsdp", "fsdp_resumed"):
        reloaded = fsdp_check.reload(str(runs[name]))
        assert reloaded["differ"] == [] and reloaded["head_weights"] > 0, reloaded
        assert reloaded["max_logit_diff"] < 1e-5, reloaded
    # the FSDP checkpoint reloads too, and it holds the step-2 weights (its head included), not the final ones
    final = {n: p.detach() for n, p in LatentActor.from_pretrained(str(runs["fsdp"])).named_parameters()}
    step2 = LatentActor.from_pretrained(str(runs["fsdp"] / "checkpoint-2"))
    assert all(not torch.equal(p.detach(), final["head." + n]) for n, p in step2.head.named_parameters())
    # FSDP trains as DDP does (same ranks, same random streams), and resuming it from step 2 changes nothing:
    # the same losses and gradient norms, and weights equal to a tenth of one step (Adam moves each by ~lr)
    logged = lambda run: [r[k] for r in
                          json.load(open(runs[run] / "trainer_state.json"))["log_history"] if "loss" in r
                          for k in ("loss", "grad_norm")]
    for other in ("ddp", "fsdp_resumed"):
        assert logged(other) == pytest.approx(logged("fsdp"), rel=1e-4), other
        weights = {n: p.detach() for n, p in LatentActor.from_pretrained(str(runs[other])).named_parameters()}
        assert weights.keys() == final.keys()
        worst = max((weights[n] - final[n]).abs().max().item() for n in final)
        assert worst < 1e-4, (other, worst)


def test_fsdp2_under_bf16_keeps_the_loss_sums_float32(tmp_path):
    """--fsdp (version 2) with --bf16: parameters in bf16, but the float32 `LossSums` the sharded root module
    returns are not cast to bf16 (accelerate's own policy casts every output: three significant digits)."""
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from losses import LossSums
    import train_actor

    model_args, _, args = train_actor.parse_args(
        ["--model_name_or_path", "unused", "--train_file", "unused.jsonl", "--output_dir", str(tmp_path / "o"),
         "--fsdp", "full_shard auto_wrap", "--fsdp_config", '{"version": 2}', "--bf16", "true", "--use_cpu", "true",
         "--report_to", "none"])
    resolve_auto_settings(model_args, args)
    ours = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    accelerates = FullyShardedDataParallelPlugin(fsdp_version=2)
    for plugin in (ours, accelerates):
        plugin.set_mixed_precision("bf16")  # what accelerate does on GPUs (ours is kept)

    class Step(torch.nn.Module):  # a root module returning loss sums computed in float32, as LatentActor does
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.proj(x).float().pow(2).sum() * 1.001
            return LossSums(*[y] * 9, total=y)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dtypes = {}
        for name, plugin in (("ours", ours), ("accelerate", accelerates)):
            step = fully_shard(Step(), mesh=mesh, mp_policy=plugin.mixed_precision_policy)
            sums = step(torch.randn(3, 4))
            dtypes[name] = (sums.ce.dtype, sums.total.dtype)
    finally:
        dist.destroy_process_group()
    assert ours.mixed_precision_policy.param_dtype == torch.bfloat16
    assert dtypes["ours"] == (torch.float32, torch.float32)
    assert dtypes["accelerate"] == (torch.bfloat16, torch.bfloat16)  # what this guards against


def _fixed_batch(tokenizer, path):
    from data import ActorDataset, LatentCollator, build_hf_dataset

    ds = ActorDataset(build_hf_dataset(path), tokenizer, 3072, 6)
    batch = LatentCollator(tokenizer.pad_token_id, 24)([ds[0], ds[1]])
    keys = ("input_ids", "labels", "attention_mask", "marker_index", "latents", "latent_lengths")
    return dict({k: batch[k] for k in keys}, latent_rows=batch["latent_lengths"])


@pytest.mark.slow
def test_lora_run_saves_a_folder_that_reloads_with_equal_logits(tiny_model_dir, tiny_data, tmp_path):
    from latent_head import LatentActor

    train, evaluation = tiny_data
    out = str(tmp_path / "lora")
    seen = {}
    original = LatentActorTrainer.train

    def train_and_inspect(self, *a, **k):
        actor = self.model
        seen["trainable"] = {n for n, p in actor.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in actor.named_parameters()}
        result = original(self, *a, **k)
        seen["changed"] = {n for n, p in actor.named_parameters() if not torch.equal(before[n], p.detach())}
        actor.eval()
        with torch.no_grad():  # the trained (still LoRA-wrapped) actor's logits
            seen["logits"] = actor.logits(actor(**_fixed_batch(actor.tokenizer, evaluation)).hidden)
        return result

    LatentActorTrainer.train = train_and_inspect
    try:
        argv = _train_argv(tiny_model_dir, train, out, "--per_device_train_batch_size", "2", "--max_steps", "3",
                           "--lora_r", "4", "--learning_rate", "1e-2", "--gradient_checkpointing", "true")
        assert train_actor.main(argv) == 0
    finally:
        LatentActorTrainer.train = original
    trainable = seen["trainable"]
    assert any("lora_" in n for n in trainable) and any(n.startswith("head.") for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)  # the new special tokens' rows
    assert not any(n.endswith("mlp.up_proj.base_layer.weight") for n in trainable)  # base frozen
    assert any("lora_" in n for n in seen["changed"]) and any(n.startswith("head.") for n in seen["changed"])

    # the output folder is a plain HF model (adapters merged) + head + tokenizer
    restored = LatentActor.from_pretrained(out)
    assert not restored.is_lora
    with torch.no_grad():
        reloaded = restored.logits(restored(**_fixed_batch(restored.tokenizer, evaluation)).hidden)
    assert torch.allclose(reloaded, seen["logits"], atol=1e-4), (reloaded - seen["logits"]).abs().max()


def test_stacked_no_grad_branches_equal_separate_forwards(tiny_model_dir, tiny_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latent_head import LatentActor

    train, _ = tiny_data
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    actor = LatentActor.from_base(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, 24, 4, 6).eval()
    batch = _fixed_batch(tok, train)
    text = {k: batch[k] for k in ("input_ids", "labels", "attention_mask", "marker_index")}
    plan_ids = torch.tensor([[7, 8, 9], [10, 0, 0]])
    plan_lengths = torch.tensor([3, 1])
    neg_latents = batch["latents"].flip(0)
    neg_lengths = batch["latent_lengths"].flip(0)
    branches = [dict(latents=batch["latents"], latent_lengths=torch.zeros(2, dtype=torch.long), block_ids=plan_ids,
                     block_lengths=plan_lengths),
                dict(latents=neg_latents, latent_lengths=neg_lengths, block_ids=plan_ids[:, :0],
                     block_lengths=torch.zeros(2, dtype=torch.long))]
    with torch.no_grad():
        plan_h, neg_h = actor.stacked_branches(text, branches)
        plan_alone = actor(**text, block_ids=plan_ids, block_lengths=plan_lengths).hidden
        neg_alone = actor(**text, latents=neg_latents, latent_lengths=neg_lengths, latent_rows=neg_lengths).hidden
    assert torch.allclose(plan_h, plan_alone, atol=1e-5) and torch.allclose(neg_h, neg_alone, atol=1e-5)


@pytest.mark.slow
def test_head_learning_rate_puts_the_head_in_its_own_groups(tiny_model_dir, tiny_data, tmp_path):
    train, _ = tiny_data
    seen = {}
    original = LatentActorTrainer.train

    def capture(self, *a, **k):
        result = original(self, *a, **k)
        head = {id(p) for p in self.model.head.parameters()}
        seen["groups"] = [(g["lr"], all(id(p) in head for p in g["params"]), any(id(p) in head for p in g["params"]))
                          for g in self.optimizer.param_groups]
        return result

    LatentActorTrainer.train = capture
    try:
        argv = _train_argv(tiny_model_dir, train, str(tmp_path / "o"), "--max_steps", "1", "--learning_rate", "1e-4",
                           "--head_learning_rate", "1e-2", "--lr_scheduler_type", "constant")
        assert train_actor.main(argv) == 0
    finally:
        LatentActorTrainer.train = original
    head_groups = [g for g in seen["groups"] if g[2]]
    assert head_groups and all(all_head and lr == 1e-2 for lr, all_head, _ in head_groups)
    assert all(lr == 1e-4 for lr, _, any_head in seen["groups"] if not any_head)


@pytest.mark.slow
def test_components_reach_tensorboard(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, _ = tiny_data
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "tb")
    argv = _train_argv(tiny_model_dir, train, out, "--max_steps", "2", "--logging_steps", "1")
    argv[argv.index("--report_to") + 1] = "tensorboard"
    assert train_actor.main(argv) == 0
    (events,) = glob.glob(os.path.join(out, "runs", "*", "events.out.tfevents.*"))
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {f"train/{k}" for k in ("loss", "ce_loss", "plan_similarity", "random_contrast", "delta_nll_bits",
                                     "js_bits")} <= tags


@pytest.mark.slow
def test_a_latent_file_broken_mid_run_in_a_loader_worker_is_one_clear_error(tiny_model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """Validation passed, then a worker fails to read a latent file: one line names it (no worker traceback),
    and what was trained is saved."""
    import data

    train = write_jsonl(tmp_path / "train.jsonl", make_records(4, str(tmp_path / "lat")))
    parent, load = os.getpid(), data.load_latents

    def load_or_fail(source, where, **kwargs):
        if os.getpid() != parent:  # in the data loader's worker, after the parent validated every file
            raise data.DataError(f"{where}: field 'hidden_state_path': file vanished")
        return load(source, where, **kwargs)

    monkeypatch.setattr(data, "load_latents", load_or_fail)
    out = tmp_path / "out"
    argv = _train_argv(tiny_model_dir, train, str(out), "--per_device_train_batch_size", "2", "--max_steps", "2",
                       "--dataloader_num_workers", "1")
    assert train_actor.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "id 's0" in err and "file vanished" in err, err
    assert "Traceback" not in err and "worker" not in err
    assert (out / "interrupted" / "latent_comm_head.pt").exists()


def test_donor_latents_are_cut_or_tiled_to_the_own_length_with_noise_only_when_tiled():
    from training.trainer import fit_donor_latents

    g = torch.Generator().manual_seed(0)
    donor = torch.randn(2, 5, 256, generator=g)
    donor_lengths, own_lengths = torch.tensor([5, 2]), torch.tensor([3, 5])  # cut 5 -> 3; tile 2 -> 5
    fitted = fit_donor_latents(donor, donor_lengths, own_lengths, 5, torch.Generator().manual_seed(1))
    assert torch.equal(fitted[0, :3], donor[0, :3])  # cut: the donor's first rows, no noise
    tiled = donor[1, [0, 1, 0, 1, 0]]  # row k takes donor row k mod 2
    noise = fitted[1] - tiled
    assert noise.abs().max() < 0.1 and 0.008 < noise.std().item() < 0.012  # N(0, 0.01^2) on every row
    assert noise[2:].sub(noise[:3]).abs().min() > 0  # independent noise on repeated rows


def test_negative_branch_holds_donor_rows_then_the_own_plan_suffix(tiny_model_dir, tmp_path, monkeypatch):
    """The negative's embeddings, built by hand: <bop>, the donor's latents (tiled or cut to this sample's K)
    through the head in the positive's round(r*K) rows, this sample's own plan suffix, <eop>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training import trainer as trainer_module
    from data import ActorDataset, LatentCollator, build_hf_dataset
    from latent_head import LatentActor
    from training.trainer import LatentActorTrainer, LossConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    actor = LatentActor.from_base(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, 24, 4, 8, dropout=0.0)
    ds = ActorDataset(build_hf_dataset(write_jsonl(tmp_path / "t.jsonl", make_records(3, str(tmp_path / "l")))),
                      tok, 3072, 8)
    batch = LatentCollator(tok.pad_token_id, 24)([ds[i] for i in range(3)])
    ratios, donors = torch.tensor([1.0, 0.5, 0.4]), torch.tensor([1, 2, 0])
    lengths = batch["latent_lengths"]
    assert (lengths[donors] < lengths).any() and (lengths[donors] > lengths).any()  # tiled and cut both occur
    monkeypatch.setattr(trainer_module, "draw_mix_ratios", lambda *a, **k: ratios.clone())
    monkeypatch.setattr(trainer_module, "pick_negatives", lambda own, *a: (donors.clone(), torch.ones(3, dtype=torch.bool)))
    monkeypatch.setattr(trainer_module, "NEGATIVE_NOISE_STD", 0.0)
    seen = []
    backbone = actor.backbone
    monkeypatch.setattr(actor, "backbone", lambda embeds, mask, **kw: (seen.append(embeds), backbone(embeds, mask, **kw))[1])
    args = ActorTrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    trainer = LatentActorTrainer(model=actor, args=args, loss_config=LossConfig(fused_loss=False))
    actor.train()
    trainer.compute_loss(actor, batch)
    negative = seen[1][3:]  # the no-grad forward stacks the plan branch (rows 0-2) and the negative (3-5)
    emb = actor.base_model.get_input_embeddings()
    for b in range(3):
        k, d = int(lengths[b]), int(donors[b])
        plan = batch["plan_ids"][b, : int(batch["plan_lengths"][b])]
        donor = batch["latents"][d, : int(lengths[d])]
        fitted = torch.cat([donor] * k)[:k]
        rows = round(float(ratios[b]) * k)
        m = int(batch["marker_index"][b])
        n_text = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b, :n_text]
        with torch.no_grad():
            expected = torch.cat([emb(ids[:m]), emb(torch.tensor([actor.bop_id])),
                                  actor.head(fitted[None], torch.tensor([k]))[0, :rows],
                                  emb(plan[round(float(ratios[b]) * len(plan)):]), emb(torch.tensor([actor.eop_id])),
                                  emb(ids[m + 1:])])
        assert torch.allclose(negative[b, : len(expected)], expected, atol=1e-6), b
        positive = seen[0][b, : len(expected)]  # same layout, own latents: only the latent rows differ
        latent = slice(m + 1, m + 1 + rows)
        assert torch.equal(positive[: m + 1], negative[b, : m + 1])
        assert torch.equal(positive[m + 1 + rows:], negative[b, m + 1 + rows: len(expected)])
        assert rows == 0 or not torch.allclose(positive[latent], negative[b, latent])


@pytest.mark.parametrize("switch", [("--contrast_divergence", "published"), ("--loss_weighting", "adaptive")])
def test_autograd_only_switches_are_refused_on_the_fused_loss_before_training(switch, tmp_path, capsys):
    argv = ["--train_file", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o"), *switch]
    assert train_actor.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "add --fused_loss false" in err and len(err.splitlines()) == 1, err


def test_auto_settings_are_decided_once_before_training_and_logged_in_one_line(caplog):
    """Every "auto" value is decided by `resolve_auto_settings` (CPU here) and listed in one log line; the
    loss's are decided by `LossConfig.resolved`, which gives a CUDA run the Triton kernel and bf16 operands."""
    import logging

    from losses import LossConfig

    model, _, args = train_actor.parse_args(["--output_dir", "x"])
    assert (model.loss_kernel, model.loss_matmul_dtype, model.packed_sequences) == ("auto", "auto", None)
    with caplog.at_level(logging.INFO, logger="train_actor"):
        settings = resolve_auto_settings(model, args)
    assert (model.loss_kernel, model.loss_matmul_dtype) == ("eager", "float32")
    assert model.packed_sequences is False and model.compile_layers is False
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Settings: ")]
    assert all(f"{k}={v}" in line for k, v in settings.items()) and "loss_kernel=eager" in line
    on_cuda = LossConfig().resolved("cuda", bf16=True)
    assert on_cuda.loss_kernel in ("triton", "compile") and on_cuda.loss_matmul_dtype == "bfloat16"
    assert LossConfig(loss_matmul_dtype="float32").resolved("cuda", bf16=True).loss_matmul_dtype == "float32"
    assert LossConfig().resolved("cuda", bf16=False).loss_matmul_dtype == "float32"
    assert LossConfig(loss_kernel="eager").resolved("cuda", bf16=True).loss_kernel == "eager"
