"""The batched training step against a straightforward reference: one sample at a time, sequences
built by concatenating embeddings, full-vocabulary logits, every term written out by hand (float64)."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from training import trainer as trainer_module
from tests.helpers import make_records, sharpen_, write_jsonl
from data import ActorDataset, LatentCollator, build_hf_dataset
from latent_head import IGNORE_INDEX, LatentActor
from training.trainer import LatentActorTrainer, LossConfig

RATIOS = torch.tensor([1.0, 0.5, 0.2])  # pure latents, half/half, mostly plan text
DONORS = torch.tensor([2, 0, 1])  # sample i's negative is DONORS[i]'s latents


def reference_sums(actor, batch):
    """Sums over supervised tokens of CE, plan similarity, random contrast, neg CE, JS (float64)."""
    emb = actor.base_model.get_input_embeddings()
    tok = lambda ids: emb(torch.as_tensor(ids, dtype=torch.long))
    bop, eop = tok([actor.bop_id]), tok([actor.eop_id])
    sums = torch.zeros(5, dtype=torch.float64)
    for b in range(len(RATIOS)):
        n_text = int(batch["attention_mask"][b].sum())
        ids, labels, m = batch["input_ids"][b, :n_text], batch["labels"][b, :n_text], int(batch["marker_index"][b])
        plan = batch["plan_ids"][b, : int(batch["plan_lengths"][b])]

        def rows_of(sample, count):
            k = int(batch["latent_lengths"][sample])
            return actor.head(batch["latents"][sample: sample + 1, :k], torch.tensor([k]))[0, :count]

        def run(block):  # the whole sequence of one branch; distributions predicting each supervised label
            embeds = torch.cat([tok(ids[:m]), bop, block, eop, tok(ids[m + 1:])])
            full_labels = torch.cat([labels[:m], torch.full((len(block) + 2,), IGNORE_INDEX), labels[m + 1:]])
            logits = actor.base_model(inputs_embeds=embeds[None], use_cache=False).logits[0].double()
            keep = full_labels[1:] != IGNORE_INDEX
            return torch.log_softmax(logits[:-1][keep], -1), full_labels[1:][keep]

        k, p = int(batch["latent_lengths"][b]), len(plan)
        r = float(RATIOS[b])
        own_suffix = tok(plan[round(r * p):])
        log_pos, target = run(torch.cat([rows_of(b, round(r * k)), own_suffix]))
        log_plan, _ = run(tok(plan))
        # The published negative: the donor's latents repeated (or cut) to this sample's k rows, through the
        # head, in the positive's round(r*k) latent rows, then this sample's own plan suffix.
        d = int(DONORS[b])
        donor = batch["latents"][d, : int(batch["latent_lengths"][d])]
        fitted = torch.cat([donor] * (k // len(donor) + 1))[:k]
        donor_rows = actor.head(fitted[None], torch.tensor([k]))[0, :round(r * k)]
        log_neg, _ = run(torch.cat([donor_rows, own_suffix]))
        p_pos, p_plan, p_neg = log_pos.exp(), log_plan.exp(), log_neg.exp()
        ce = -log_pos.gather(1, target[:, None])[:, 0]
        kl = (p_plan * (log_plan - log_pos)).sum(-1)
        cos = (p_pos * p_plan).sum(-1) / (p_pos.norm(dim=-1) * p_plan.norm(dim=-1))
        mix = (p_pos + p_neg) / 2
        js = 0.5 * (p_pos * (log_pos - mix.log())).sum(-1) + 0.5 * (p_neg * (log_neg - mix.log())).sum(-1)
        neg_ce = -log_neg.gather(1, target[:, None])[:, 0]
        sums += torch.stack([ce.sum(), (0.7 * kl + 0.3 * (1 - cos)).sum(), (0.69 - js).clamp_min(0).sum(),
                             neg_ce.sum(), js.sum()])
    return sums


@pytest.mark.parametrize("path", ["fused", pytest.param("fused+compile", marks=pytest.mark.slow),
                                  pytest.param("fused+triton", marks=pytest.mark.slow), "autograd", "fused+packed",
                                  "fused+packed+graph_rows"])
def test_batched_step_matches_the_reference_path(path, tiny_model_dir, tmp_path, monkeypatch):
    """Every path of the loss (the GPU default is fused+triton, on packed rows) against the float64 reference;
    graph_rows: the packed rows padded as under CUDA graphs (the graphs themselves need a GPU)."""
    if path == "fused+triton":
        pytest.importorskip("triton")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    actor = LatentActor.from_base(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, 24, 4, 8, dropout=0.0)
    sharpen_(actor)  # peaked distributions that the latents change: terms well above float32 rounding
    if "packed" in path:
        actor.use_packed_sequences()  # on the CPU: packed_attention's block mask stands in for flash varlen
        actor.cuda_graphs = "graph_rows" in path
    data_file = write_jsonl(tmp_path / "t.jsonl", make_records(3, str(tmp_path / "lat")))
    ds = ActorDataset(build_hf_dataset(data_file), tok, 3072, 8)
    batch = LatentCollator(tok.pad_token_id, 24)([ds[i] for i in range(3)])
    lengths = batch["latent_lengths"]
    assert (lengths[DONORS] < lengths).any() and (lengths[DONORS] > lengths).any()  # donors tiled and cut

    monkeypatch.setattr(trainer_module, "draw_mix_ratios", lambda *a, **k: RATIOS.clone())
    monkeypatch.setattr(trainer_module, "pick_negatives", lambda own, *a: (DONORS.clone(), torch.ones(3, dtype=torch.bool)))
    monkeypatch.setattr(trainer_module, "NEGATIVE_NOISE_STD", 0.0)  # the noise itself: test_trainer.py
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    kernel = path.split("+")[1] if path.count("+") == 1 and "packed" not in path else "eager"
    trainer = LatentActorTrainer(model=actor, args=args, loss_config=LossConfig(
        loss_chunk_size=7, fused_loss=path != "autograd", loss_kernel=kernel))
    actor.train()
    loss = trainer.compute_loss(actor, batch)
    fast = trainer._metric_sums["train"].double()
    expected = reference_sums(actor, batch)

    # Tolerance from the arithmetic: float32's unit roundoff is 6e-8 and |log p| < 22 here, so each
    # log-probability of a 49k-entry log-softmax is off by < 1.5e-6 and each per-token term (CE, KL, JS,
    # 1 - cos) by < 4e-6. The 30 tokens' sums are 9 (JS) to 375 (CE) (`sharpen_`; per token the plan
    # and JS terms are 0.02-2): < 2e-5 relative even if every error had the same sign, so 1e-4 holds
    # on any machine. Measured: < 5e-7. A wrong shift or split moves a sum by percents.
    names = ("ce", "plan_similarity", "random_contrast", "neg_ce", "js")
    for i, name in enumerate(names):
        assert fast[i].item() == pytest.approx(expected[i].item(), rel=1e-4), name
    tokens = fast[5].item()
    total = (expected[0] + 1.0 * expected[1] + 2.0 * expected[2]) / tokens
    assert loss.item() == pytest.approx(total.item(), rel=1e-4)
    assert fast[2].item() > 0 and not math.isclose(fast[0].item(), fast[3].item())  # the branches differ


SYNCING_OPS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal"}


def test_the_training_step_reads_the_device_once(tiny_model_dir, tmp_path, monkeypatch):
    """A step on packed rows (the GPU default) waits for the device once: `read_sizes`, for the sizes of both
    forwards. No op that reads a tensor's values on the host (nonzero, item, a boolean mask's indexing) runs in
    the draws, the branches or the loss; every wait would stall the host until the device catches up."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import latent_head

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._schema.name
            indices = args[1] if name.startswith(("aten::index", "aten::_index_put")) and len(args) > 1 else ()
            if name in SYNCING_OPS or any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                          for t in (indices if isinstance(indices, (list, tuple)) else ())):
                self.found.append(name)
            return func(*args, **kwargs)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    actor = LatentActor.from_base(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, 24, 4, 8)
    actor.use_packed_sequences()
    data_file = write_jsonl(tmp_path / "t.jsonl", make_records(4, str(tmp_path / "lat")))
    ds = ActorDataset(build_hf_dataset(data_file), tok, 3072, 8)
    batch = LatentCollator(tok.pad_token_id, 24)([ds[i] for i in range(4)])
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True)
    trainer = LatentActorTrainer(model=actor, args=args, loss_config=LossConfig(loss_chunk_size=7))
    reads = []
    read_sizes = latent_head.read_sizes
    monkeypatch.setattr(latent_head, "read_sizes", lambda *v: reads.append(len(v)) or read_sizes(*v))
    actor.train()
    with Syncs() as syncs:
        loss = trainer.compute_loss(actor, batch)
    assert reads == [6] and syncs.found == []  # (longest, total, supervised) of the positive and stacked forwards
    assert torch.isfinite(loss) and trainer.last_negatives["found"].all()
    # the checker sees what it looks for: a boolean mask's indexing and a nonzero
    with Syncs() as syncs:
        batch["latent_lengths"][batch["latent_lengths"] > 0].nonzero()
    assert syncs.found == ["aten::index", "aten::nonzero"]
