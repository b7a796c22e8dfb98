"""Losses against hand-computed values on small tensors (docs/METHOD.md "Self-erasure", "Self-check", retention)."""

import math

import pytest
import torch

from sage_dist.losses import (
    attack_loss,
    cosine_graph,
    erase_loss,
    esd_target,
    graph_loss,
    h1_concept_similarity,
    h2_not_erased,
    interference,
    outside_in_loss,
    retain_loss,
    row_mse,
    select_top_k,
    sequence_cosine,
)


def test_esd_target_by_hand():
    u = torch.tensor([[[[1.0, 2.0]]]])
    c = torch.tensor([[[[3.0, 1.0]]]])
    # u - eta (c - u) = [1 - 2*2, 2 - 2*(-1)] = [-3, 4]
    assert torch.equal(esd_target(u, c, negative_guidance=2.0), torch.tensor([[[[-3.0, 4.0]]]]))
    assert torch.equal(esd_target(u, c, negative_guidance=0.0), u)


def test_erase_loss_by_hand_and_zero_gradient_at_target():
    u = torch.tensor([[[[1.0, 2.0]]]])
    c = torch.tensor([[[[3.0, 1.0]]]])
    s = torch.tensor([[[[0.0, 0.0]]]], requires_grad=True)
    # target [-1, 3] at eta=1; mean((0+1)^2, (0-3)^2) = 5
    loss = erase_loss(s, u, c, negative_guidance=1.0)
    assert loss.item() == pytest.approx(5.0)
    at_target = torch.tensor([[[[-1.0, 3.0]]]], requires_grad=True)
    erase_loss(at_target, u, c, negative_guidance=1.0).backward()
    assert torch.equal(at_target.grad, torch.zeros_like(at_target))


def test_retain_loss_and_row_mse_by_hand():
    a = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])
    b = torch.tensor([[[[0.0, 1.0]]], [[[2.0, 0.0]]]])
    assert retain_loss(a, b).item() == pytest.approx((1 + 4 + 4 + 0) / 4)
    assert retain_loss(a[:0], b[:0]).item() == 0.0
    assert row_mse(a, b).tolist() == pytest.approx([(1 + 4) / 2, (4 + 0) / 2])
    assert outside_in_loss(a, b).item() == pytest.approx(retain_loss(a, b).item())


def test_cosine_graph_and_graph_loss_by_hand():
    f_old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f_new = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s_new = cosine_graph(f_new)
    r = 1 / math.sqrt(2)
    assert torch.allclose(s_new, torch.tensor([[1.0, r], [r, 1.0]]))
    # (1/4) * (0 + r^2 + r^2 + 0) = 0.25
    assert graph_loss(f_new, f_old, kind="mse").item() == pytest.approx(0.25, abs=1e-6)
    assert graph_loss(f_old, f_old, kind="mse").item() == 0.0
    assert graph_loss(f_old, f_old, kind="kl").item() == pytest.approx(0.0, abs=1e-7)
    # KL row i: sum_j p_old log(p_old / p_new), tau = 1
    p_old = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    p_new = torch.softmax(torch.tensor([1.0, r]), 0)
    row = float((p_old * (p_old / p_new).log()).sum())
    assert graph_loss(f_new, f_old, kind="kl", temperature=1.0).item() == pytest.approx(row, rel=1e-5)


def test_graph_loss_rejects_single_node():
    with pytest.raises(ValueError, match="at least 2"):
        graph_loss(torch.ones(1, 3), torch.ones(1, 3))


def test_select_top_k_lowest_first_stable():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.1, 0.3])
    assert select_top_k(scores, 3).tolist() == [1, 3, 4]
    assert select_top_k(scores, 10).tolist() == [1, 3, 4, 2, 0]
    # scores within the tie tolerance count as tied: rounding noise cannot reorder them
    assert select_top_k(torch.tensor([1.0, 1.0 - 1e-9, 1.0 + 1e-9, 0.5]), 3).tolist() == [3, 0, 1]


def test_interference_by_hand():
    grads = {"b": torch.tensor([1.0, 1.0]), "a": torch.tensor([1.0, 0.0]), "c": torch.tensor([-1.0, 0.0])}
    out = interference(grads)
    r = 1 / math.sqrt(2)
    assert out["a|b"] == pytest.approx(r) and out["a|c"] == pytest.approx(-1.0) and out["b|c"] == pytest.approx(-r)
    assert out["interference_cos"] == pytest.approx((r - 1 - r) / 3) and out["interference_cos_min"] == -1.0
    assert math.isnan(interference({"a": torch.ones(2)})["interference_cos"])


def test_attack_terms_by_hand():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0]])
    h1 = h1_concept_similarity(a, b)
    assert h1.item() == pytest.approx(1 / math.sqrt(2))
    h2 = h2_not_erased(a, a)
    assert h2.item() == pytest.approx(1.0)
    # L = -(H2) - 2*H1
    assert attack_loss(h1, h2, h1_weight=2.0).item() == pytest.approx(-1.0 - 2 / math.sqrt(2))
    # the ablations: H1 only (λ2 = 0) and H2 only (λ1 = 0)
    assert attack_loss(h1, h2, h2_weight=0.0).item() == pytest.approx(-1 / math.sqrt(2))
    assert attack_loss(h1, h2, h1_weight=0.0, h2_weight=0.5).item() == pytest.approx(-0.5)


def test_attack_weights_both_zero_is_refused():
    from sage_dist.config import AttackConfig
    with pytest.raises(ValueError, match="both 0"):
        AttackConfig(h1_weight=0.0, h2_weight=0.0)
    with pytest.raises(ValueError, match="h2_weight"):
        AttackConfig(h2_weight=-1.0)


def test_sequence_cosine_ignores_sot_and_padding():
    seq_a = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    seq_b = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [-5.0, 5.0]]])
    # positions 1..2 (EOT at 2): cos = 1 and 0 -> mean 0.5; SOT (0) and padding (3) ignored
    assert sequence_cosine(seq_a, seq_b, torch.tensor([2])).item() == pytest.approx(0.5)
    h2 = h2_not_erased(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), seq_trained_BLD=seq_a,
                       seq_original_BLD=seq_b, eot_index_B=torch.tensor([2]))
    assert h2.item() == pytest.approx(0.75)
