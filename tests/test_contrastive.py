"""VATT's contrastive objectives: the formulas against a direct float64 implementation,
masking of missing modalities, and the all-gather of negatives across ranks."""

import math

import pytest
import torch
import torch.multiprocessing as mp
from test_model import random_batch

from rigtrain.config import load_config
from rigtrain.model import build_model
from rigtrain.model.contrastive import l2_normalize, mil_nce_loss, nce_loss


def nce_reference(v, a, valid, tau):
    """-1/2 [log softmax over audio + log softmax over video] of each valid pair, by loops."""
    rows = [i for i in range(len(v)) if valid[i]]
    total = 0.0
    for i in rows:
        s = {j: float(v[i] @ a[j]) / tau for j in rows}
        t = {j: float(v[j] @ a[i]) / tau for j in rows}
        v_to_a = -(s[i] - math.log(sum(math.exp(x) for x in s.values())))
        a_to_v = -(t[i] - math.log(sum(math.exp(x) for x in t.values())))
        total += 0.5 * (v_to_a + a_to_v)
    return total / max(1, len(rows))


def mil_nce_reference(v, t, valid, tau):
    """MIL-NCE (Miech et al. 2020) written out: positives = the clip's own segments;
    denominator = positives + its video against other clips' segments + other clips'
    videos against its segments."""
    B, M = valid.shape
    total, count = 0.0, 0
    for i in range(B):
        own = [k for k in range(M) if valid[i, k]]
        if not own:
            continue
        pos = sum(math.exp(float(v[i] @ t[i, k]) / tau) for k in own)
        neg = sum(math.exp(float(v[i] @ t[j, k]) / tau) for j in range(B) if j != i for k in range(M) if valid[j, k])
        neg += sum(math.exp(float(v[j] @ t[i, k]) / tau) for j in range(B) if j != i for k in own)
        total += -math.log(pos / (pos + neg))
        count += 1
    return total / max(1, count)


def test_nce_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = l2_normalize(torch.randn(9, 16, generator=g, dtype=torch.float64))
        a = l2_normalize(torch.randn(9, 16, generator=g, dtype=torch.float64))
        valid = torch.rand(9, generator=g) > 0.3
        got = nce_loss(v, a, valid, 0.07).item()
        assert got == pytest.approx(nce_reference(v.double(), a.double(), valid, 0.07), rel=1e-5, abs=1e-5)
    assert nce_loss(v, a, torch.zeros(9, dtype=torch.bool), 0.07).item() == 0.0  # nothing to score, no NaN


def test_mil_nce_matches_the_formula_in_float64():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        v = l2_normalize(torch.randn(7, 16, generator=g, dtype=torch.float64))
        t = l2_normalize(torch.randn(7, 3, 16, generator=g, dtype=torch.float64))
        valid = torch.rand(7, 3, generator=g) > 0.4
        valid[0] = True  # a clip with several positives
        valid[1] = False  # and one without narration
        got = mil_nce_loss(v, t, valid, 0.07).item()
        assert got == pytest.approx(mil_nce_reference(v.double(), t.double(), valid, 0.07), rel=1e-5, abs=1e-5)


def test_mil_nce_rewards_any_of_several_positives():
    """One matching segment among unrelated ones is enough (the MIL in MIL-NCE)."""
    v = torch.eye(4, 8)
    t = torch.zeros(4, 2, 8)
    t[:, 1] = torch.eye(4, 8)  # the second segment of each clip matches its video
    t[:, 0] = l2_normalize(torch.ones(4, 8))  # the first one is the same for everybody
    valid = torch.ones(4, 2, dtype=torch.bool)
    matched = mil_nce_loss(v, t, valid, 0.07)
    shuffled = mil_nce_loss(v, t[[1, 2, 3, 0]], valid, 0.07)
    assert matched < 0.05 < shuffled


def contrastive_batch(data, batch=6, seed=0):
    out = random_batch(data, batch=batch, seed=seed)
    out["segment_offset"] = torch.tensor([[0, 6, 0, 0]] * batch)
    out["segment_len"] = torch.tensor([[5, 4, 0, 0]] * batch)
    return out


def test_a_missing_modality_changes_nothing_for_the_others():
    config = load_config("demo", overrides=["model.droptoken_keep=1.0", "model.future_query_prob=1.0"])
    torch.manual_seed(0)
    model = build_model(config.model, config.data)
    batch = contrastive_batch(config.data)
    batch["has_audio"][2] = False
    batch["segment_len"][4] = 0  # clip 4 has no narration
    batch["text_len"][4] = 0
    first = model(batch)
    # Whatever the missing sound and narration hold, no loss term moves.
    other = dict(batch, audio=batch["audio"].clone(), text=batch["text"].clone())
    other["audio"][2] = torch.randint(-9000, 9000, other["audio"][2].shape, dtype=torch.int16)
    other["text"][4] = torch.randint(0, 256, other["text"][4].shape, dtype=torch.uint8)
    second = model(other)
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-6), key
    # NCE with clip 2 masked is NCE over the batch without clip 2.
    keep = [i for i in range(6) if i != 2]
    without = model({k: v[keep] for k, v in batch.items()})
    assert without["loss_va_nce"].item() == pytest.approx(first["loss_va_nce"].item(), rel=1e-5)


def _contrastive_grads(model, batch):
    out = model(batch)
    loss = out["loss_va_nce"] + out["loss_vt_milnce"]
    model.zero_grad()
    loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, world: int, store_path: str, result_path: str) -> None:
    # A file store: a port chosen ahead could be taken by another test's process meanwhile
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        config = load_config("demo", overrides=["model.droptoken_keep=1.0"])
        torch.manual_seed(0)
        model = build_model(config.model, config.data)
        batch = contrastive_batch(config.data, batch=8)
        batch["has_audio"][5] = False
        half = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
        out, grads = _contrastive_grads(model, half)
        # What DeepSpeed does with every parameter gradient: the mean over ranks.
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save(
                {"va": out["loss_va_nce"].item(), "vt": out["loss_vt_milnce"].item(), "grads": grads}, result_path
            )
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_with_gathered_negatives_equal_one_rank_with_the_whole_batch(tmp_path):
    config = load_config("demo", overrides=["model.droptoken_keep=1.0"])
    torch.manual_seed(0)
    model = build_model(config.model, config.data)
    batch = contrastive_batch(config.data, batch=8)
    batch["has_audio"][5] = False
    whole, grads = _contrastive_grads(model, batch)

    result = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(result)), nprocs=2, join=True)
    two = torch.load(result)
    assert two["va"] == pytest.approx(whole["loss_va_nce"].item(), rel=1e-5)
    assert two["vt"] == pytest.approx(whole["loss_vt_milnce"].item(), rel=1e-5)
    assert set(two["grads"]) == set(grads)
    # Compared as whole tensors, against the gradient's overall scale: some are zero in exact
    # arithmetic (attention key biases; the heads' last biases, which centring cancels), and
    # there the two runs differ in rounding only.
    scale = max(g.norm() for g in grads.values())
    for name, g in grads.items():
        assert (two["grads"][name] - g).norm() <= 1e-4 * g.norm() + 1e-5 * scale, name
