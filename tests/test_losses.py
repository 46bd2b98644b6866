"""The loss math, checked against values computed by hand."""

import math

import pytest
import torch

from worker.distill.losses import (
    AttentionTransferLoss,
    DecoupledKDLoss,
    DistillationLoss,
    HardDistillationLoss,
    LabelCrossEntropy,
    SoftTargetLoss,
    inverse_frequency_weights,
    standardize_logits,
)


def softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


S = [[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]]
T = [[3.0, 1.0, -2.0], [-1.0, 2.5, 0.5]]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_target_is_t_squared_kl_batchmean(temperature):
    expected = sum(kl(softmax(t, temperature), softmax(s, temperature)) for s, t in zip(S, T, strict=True))
    expected = expected / len(S) * temperature**2
    got = SoftTargetLoss(temperature)(torch.tensor(S), torch.tensor(T))
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
def test_soft_target_gradient_is_t_times_prob_difference(temperature):
    # d/dz_s [T^2 KL(p_t || p_s)] = T (p_s - p_t) / N: the T^2 keeps the gradient from fading as 1/T.
    s = torch.tensor(S, requires_grad=True)
    SoftTargetLoss(temperature)(s, torch.tensor(T)).backward()
    for i in range(len(S)):
        ps, pt = softmax(S[i], temperature), softmax(T[i], temperature)
        for j in range(3):
            assert s.grad[i, j].item() == pytest.approx(temperature * (ps[j] - pt[j]) / len(S), abs=1e-6)


def test_soft_target_is_zero_when_student_matches_teacher():
    x = torch.tensor(T)
    assert SoftTargetLoss(3.0)(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_target_refuses_nonpositive_temperature():
    with pytest.raises(ValueError):
        SoftTargetLoss(0.0)


def test_label_cross_entropy_masks_unlabeled_samples():
    logits = torch.tensor(S)
    labels = torch.tensor([0, -1])
    # only the first sample counts: -log softmax(S[0])[0]
    expected = -math.log(softmax(S[0])[0])
    assert LabelCrossEntropy()(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_label_cross_entropy_of_a_batch_with_no_labels_is_zero_with_a_gradient():
    logits = torch.tensor(S, requires_grad=True)
    loss = LabelCrossEntropy()(logits, torch.tensor([-1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_label_smoothing_by_hand():
    eps, k = 0.1, 3
    p = softmax(S[1])
    target = [eps / k, eps / k, 1 - eps + eps / k]  # label 2
    expected = -sum(t * math.log(q) for t, q in zip(target, p, strict=True))
    got = LabelCrossEntropy(label_smoothing=eps)(torch.tensor([S[1]]), torch.tensor([2]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_class_weights_make_a_weighted_mean():
    w = [1.0, 3.0, 0.5]
    labels = [0, 2]
    ce = [-math.log(softmax(S[i])[labels[i]]) for i in range(2)]
    expected = (w[0] * ce[0] + w[2] * ce[1]) / (w[0] + w[2])
    got = LabelCrossEntropy(class_weights=torch.tensor(w))(torch.tensor(S), torch.tensor(labels))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hard_distillation_is_cross_entropy_on_teacher_argmax_for_every_sample():
    # teacher argmax: sample 0 -> 0, sample 1 -> 1
    expected = (-math.log(softmax(S[0])[0]) - math.log(softmax(S[1])[1])) / 2
    got = HardDistillationLoss()(torch.tensor(S), torch.tensor(T))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_total_mixes_alpha_kd_over_all_samples_and_ce_over_labelled():
    alpha, temp = 0.7, 2.0
    labels = torch.tensor([1, -1])
    kd = sum(kl(softmax(t, temp), softmax(s, temp)) for s, t in zip(S, T, strict=True)) / 2 * temp**2
    ce = -math.log(softmax(S[0])[1])
    parts = DistillationLoss(kind="soft", temperature=temp, alpha=alpha)(torch.tensor(S), labels, torch.tensor(T))
    assert parts.distill.item() == pytest.approx(kd, rel=1e-5)
    assert parts.label.item() == pytest.approx(ce, rel=1e-5)
    assert parts.total.item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)


def test_unlabeled_sample_still_gets_a_gradient_from_the_teacher():
    s = torch.tensor(S, requires_grad=True)
    loss = DistillationLoss(alpha=0.5)(s, torch.tensor([0, -1]), torch.tensor(T)).total
    loss.backward()
    assert s.grad[1].abs().sum() > 0  # sample 1 is unlabeled


def test_without_teacher_logits_it_is_plain_label_cross_entropy():
    labels = torch.tensor([0, 2])
    parts = DistillationLoss(alpha=0.9)(torch.tensor(S), labels, None)
    expected = (-math.log(softmax(S[0])[0]) - math.log(softmax(S[1])[2])) / 2
    assert parts.total.item() == pytest.approx(expected, rel=1e-5)
    assert parts.distill.item() == 0.0


def test_hard_mix_with_labels():
    labels = torch.tensor([2, 0])
    hard = (-math.log(softmax(S[0])[0]) - math.log(softmax(S[1])[1])) / 2
    ce = (-math.log(softmax(S[0])[2]) - math.log(softmax(S[1])[0])) / 2
    parts = DistillationLoss(kind="hard", alpha=0.5)(torch.tensor(S), labels, torch.tensor(T))
    assert parts.total.item() == pytest.approx(0.5 * hard + 0.5 * ce, rel=1e-5)


def test_inverse_frequency_weights():
    w = inverse_frequency_weights(torch.tensor([10, 30, 0, 60]))
    # n=100, k=3 present classes: 100/(3*10), 100/(3*30), 0, 100/(3*60)
    assert w.tolist() == pytest.approx([100 / 30, 100 / 90, 0.0, 100 / 180])


@pytest.mark.parametrize("bad", [{"alpha": 1.5}, {"alpha": -0.1}, {"kind": "medium"}])
def test_distillation_loss_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        DistillationLoss(**bad)


def test_hard_distillation_keeps_samples_the_teacher_puts_in_a_zero_weight_class():
    # "auto" weights give a class without labels weight 0; a batch the teacher puts entirely there once
    # gave NaN (0/0) and silently dropped every such sample. The teacher's answers must still teach.
    teacher = torch.tensor([[0.0, 0.0, 5.0]] * 4)
    student = torch.zeros(4, 3, requires_grad=True)
    labels = torch.tensor([-1, -1, -1, -1])
    loss = DistillationLoss(kind="hard", alpha=0.9, class_weights=torch.tensor([1.0, 1.0, 0.0]))
    parts = loss(student, labels, teacher)
    assert torch.isfinite(parts.total) and parts.distill.item() == pytest.approx(math.log(3))
    parts.total.backward()
    assert student.grad[:, 2].lt(0).all()  # pushed towards the teacher's class


def test_class_weights_weight_the_label_term_only():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    t = torch.tensor([[0.0, 3.0], [3.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    w = torch.tensor([1.0, 3.0])
    for kind in ("soft", "hard"):
        weighted = DistillationLoss(kind=kind, alpha=0.5, class_weights=w)(s, y, t)
        plain = DistillationLoss(kind=kind, alpha=0.5)(s, y, t)
        assert weighted.distill.item() == pytest.approx(plain.distill.item())
        assert weighted.label.item() != pytest.approx(plain.label.item())


# --- logit standardization, decoupled KD, attention transfer ---------------------------------------------------


def zscore(xs):
    """Per-sample z-score with the unbiased std, as the reference code of Sun et al. 2024."""
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return [(x - m) / (sd + 1e-7) for x in xs]


def binary_kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def tckd_nckd_by_hand(s_rows, t_rows, targets, temp):
    tckd = nckd = 0.0
    for s, t, g in zip(s_rows, t_rows, targets, strict=True):
        ps, pt = softmax(s, temp), softmax(t, temp)
        tckd += binary_kl(pt[g], ps[g])
        rest_s = softmax([v for j, v in enumerate(s) if j != g], temp)
        rest_t = softmax([v for j, v in enumerate(t) if j != g], temp)
        nckd += kl(rest_t, rest_s)
    n = len(s_rows)
    return tckd / n * temp**2, nckd / n * temp**2


def test_standardize_logits_uses_the_unbiased_std():
    got = standardize_logits(torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0]]))
    assert got.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)  # biased std would give +-1.22
    assert got.tolist()[1] == pytest.approx(zscore([4.0, 0.0, 2.0]), abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_standardized_soft_target_by_hand(temperature):
    expected = sum(kl(softmax(zscore(t), temperature), softmax(zscore(s), temperature))
                   for s, t in zip(S, T, strict=True)) / len(S) * temperature**2
    got = SoftTargetLoss(temperature, standardize=True)(torch.tensor(S), torch.tensor(T))
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["soft", "dkd"])
def test_standardized_loss_ignores_shift_and_scale_of_the_logits(kind):
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([0, 2])
    moved_s, moved_t = 3.0 * s + 5.0, 0.5 * t - 2.0

    def loss(standardize, a, b):
        return DistillationLoss(kind=kind, temperature=2.0, alpha=1.0, standardize=standardize)(a, y, b).distill

    assert loss(True, moved_s, moved_t).item() == pytest.approx(loss(True, s, t).item(), rel=1e-4)
    assert loss(False, moved_s, moved_t).item() != pytest.approx(loss(False, s, t).item(), rel=1e-2)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dkd_terms_by_hand(temperature):
    target = [0, 2]  # sample 1's target is not the teacher's argmax: NCKD then includes the teacher's top class
    tckd, nckd = tckd_nckd_by_hand(S, T, target, temperature)
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor(target)
    assert DecoupledKDLoss(temperature, alpha=1.0, beta=0.0)(s, t, y).item() == pytest.approx(tckd, rel=1e-5)
    assert DecoupledKDLoss(temperature, alpha=0.0, beta=1.0)(s, t, y).item() == pytest.approx(nckd, rel=1e-5)
    full = DecoupledKDLoss(temperature, alpha=1.0, beta=8.0)(s, t, y)
    assert full.item() == pytest.approx(tckd + 8.0 * nckd, rel=1e-5)


def test_standardized_dkd_by_hand():
    temp, target = 2.0, [1, 1]
    tckd, nckd = tckd_nckd_by_hand([zscore(r) for r in S], [zscore(r) for r in T], target, temp)
    got = DecoupledKDLoss(temp, alpha=2.0, beta=3.0, standardize=True)(torch.tensor(S), torch.tensor(T),
                                                                        torch.tensor(target))
    assert got.item() == pytest.approx(2.0 * tckd + 3.0 * nckd, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_classical_kd_is_tckd_plus_teacher_non_target_mass_times_nckd(temperature):
    # Zhao et al. eq. 1, per sample: KD = TCKD + (1 - p_target_teacher) * NCKD, for any target class.
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=gen) * 3, torch.randn(4, 5, generator=gen) * 3
    for i in range(4):
        for g in (0, 3):
            si, ti, y = s[i:i + 1], t[i:i + 1], torch.tensor([g])
            beta = 1.0 - torch.softmax(ti / temperature, dim=1)[0, g].item()
            dkd = DecoupledKDLoss(temperature, alpha=1.0, beta=beta)(si, ti, y)
            assert dkd.item() == pytest.approx(SoftTargetLoss(temperature)(si, ti).item(), rel=1e-4, abs=1e-6)


def test_dkd_is_finite_when_the_teacher_is_certain():
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[200.0, 0.0, -50.0]])  # p_target rounds to exactly 1 in float32
    loss = DecoupledKDLoss(1.0)(s, t, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_target_is_the_label_else_the_teachers_argmax():
    temp = 2.0
    tckd, nckd = tckd_nckd_by_hand(S, T, [2, 1], temp)  # sample 1 is unlabeled; the teacher says class 1
    parts = DistillationLoss(kind="dkd", temperature=temp, alpha=0.6, dkd_alpha=1.0, dkd_beta=8.0)(
        torch.tensor(S), torch.tensor([2, -1]), torch.tensor(T))
    assert parts.distill.item() == pytest.approx(tckd + 8.0 * nckd, rel=1e-5)
    ce = -math.log(softmax(S[0])[2])
    assert parts.total.item() == pytest.approx(0.6 * (tckd + 8.0 * nckd) + 0.4 * ce, rel=1e-5)


@pytest.mark.parametrize(("epoch", "scale"), [(0.0, 0.0), (1.0, 0.25), (2.5, 0.625), (4.0, 1.0), (9.0, 1.0)])
def test_dkd_warmup_ramps_the_term_linearly(epoch, scale):
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([0, 2])
    full = DistillationLoss(kind="dkd", alpha=1.0)(s, y, t).distill.item()  # default epoch: warm-up is over
    got = DistillationLoss(kind="dkd", alpha=1.0, dkd_warmup=4.0)(s, y, t, epoch=epoch).distill.item()
    assert full > 0
    assert got == pytest.approx(scale * full, rel=1e-6, abs=1e-9)


def test_dkd_warmup_leaves_the_other_kinds_alone():
    s, t, y = torch.tensor(S), torch.tensor(T), torch.tensor([0, 2])
    plain = DistillationLoss(kind="soft")(s, y, t).distill
    assert DistillationLoss(kind="soft", dkd_warmup=4.0)(s, y, t, epoch=0.0).distill.item() == plain.item()


S3 = [*S, [1.0, -1.0, 0.0]]
T3 = [*T, [0.0, 0.0, 4.0]]


def test_mixed_labels_mix_the_cross_entropy_over_samples_with_both_labels():
    lam = 0.7
    labels, mixed = torch.tensor([0, 1, -1]), torch.tensor([2, -1, 0])  # only sample 0 has both labels
    expected = lam * -math.log(softmax(S3[0])[0]) + (1 - lam) * -math.log(softmax(S3[0])[2])
    parts = DistillationLoss(alpha=0.0)(torch.tensor(S3), labels, torch.tensor(T3), mixed_labels=mixed, lam=lam)
    assert parts.label.item() == pytest.approx(expected, rel=1e-5)
    assert parts.total.item() == pytest.approx(expected, rel=1e-5)


def test_mixed_labels_over_two_labelled_samples_by_hand():
    lam = 0.4
    labels, mixed = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1])
    ce = [[-math.log(softmax(row)[k]) for k in range(3)] for row in S3]
    expected = lam * (ce[0][0] + ce[1][2] + ce[2][1]) / 3 + (1 - lam) * (ce[0][1] + ce[1][0] + ce[2][1]) / 3
    got = DistillationLoss()(torch.tensor(S3), labels, torch.tensor(T3), mixed_labels=mixed, lam=lam).label
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_mixed_batch_without_a_fully_labelled_sample_has_a_zero_label_term_with_a_gradient():
    s = torch.tensor(S3, requires_grad=True)
    parts = DistillationLoss(alpha=0.5)(s, torch.tensor([0, -1, 1]), torch.tensor(T3),
                                        mixed_labels=torch.tensor([-1, 2, -1]), lam=0.5)
    assert parts.label.item() == 0.0
    parts.total.backward()
    assert s.grad.abs().sum() > 0  # the teacher still teaches every sample


def test_mixed_batch_distill_term_is_unchanged():
    s, t, y = torch.tensor(S3), torch.tensor(T3), torch.tensor([0, 1, 2])
    plain = DistillationLoss(kind="soft")(s, y, t).distill
    mixed = DistillationLoss(kind="soft")(s, y, t, mixed_labels=torch.tensor([2, 0, 1]), lam=0.3).distill
    assert mixed.item() == plain.item()


@pytest.mark.parametrize(("lam", "target"), [(0.5, [0, 1, 2]), (0.3, [2, 1, 2])])
def test_dkd_target_of_a_mixed_batch_follows_the_dominant_label(lam, target):
    # labels [0, 1, -1], mixed [2, -1, -1]; the teacher's argmax is [0, 1, 2]. lam >= 0.5 keeps labels
    # (sample 2 falls back to the teacher); below, mixed_labels rule (samples 1 and 2 fall back).
    temp = 2.0
    tckd, nckd = tckd_nckd_by_hand(S3, T3, target, temp)
    got = DistillationLoss(kind="dkd", temperature=temp, alpha=1.0, dkd_beta=2.0)(
        torch.tensor(S3), torch.tensor([0, 1, -1]), torch.tensor(T3),
        mixed_labels=torch.tensor([2, -1, -1]), lam=lam).distill
    assert got.item() == pytest.approx(tckd + 2.0 * nckd, rel=1e-5)


def test_attention_transfer_by_hand():
    # One channel, 1x2 maps: q_s = [1, 0], q_t = [0, 1], so mean((q_s - q_t)^2) = (1 + 1) / 2.
    f_s = torch.tensor([[[[1.0, 0.0]]]])
    f_t = torch.tensor([[[[0.0, 3.0]]]])
    assert AttentionTransferLoss()([f_s], [f_t]).item() == pytest.approx(1.0)
    # Two channels: attention = mean_c f^2 = [(1 + 9) / 2, (4 + 0) / 2] = [5, 2] against [0, 1] -> q_s = [5, 2]/sqrt(29)
    f_s2 = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    a, b = 5 / math.sqrt(29), 2 / math.sqrt(29)
    assert AttentionTransferLoss()([f_s2], [f_t]).item() == pytest.approx((a**2 + (b - 1) ** 2) / 2, rel=1e-6)


def test_attention_transfer_is_zero_for_identical_features_and_positive_otherwise():
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 8, 4, 4, generator=gen)]
    other = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 8, 4, 4, generator=gen)]
    at = AttentionTransferLoss()
    assert at(feats, [f.clone() for f in feats]).item() == pytest.approx(0.0, abs=1e-7)
    assert at(feats, other).item() > 0
    # a sum over pairs
    assert at(feats, other).item() == pytest.approx(at(feats[:1], other[:1]).item() + at(feats[1:], other[1:]).item())


def test_attention_transfer_pools_the_larger_attention_map_not_the_features():
    # Student 2x2 blocks of [0, 2; 0, 2]: mean of f^2 per block is 2, but pooling the features first gives 1^2.
    block = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    f_s = block.repeat(2, 2).view(1, 1, 4, 4)
    f_t = torch.full((1, 3, 2, 2), math.sqrt(2.0))  # attention 2 everywhere, over 3 channels
    at = AttentionTransferLoss()
    assert at([f_s], [f_t]).item() == pytest.approx(0.0, abs=1e-7)
    assert at([f_t], [f_s]).item() == pytest.approx(0.0, abs=1e-7)  # either side may be the larger
    f_t_uneven = f_t.clone()
    f_t_uneven[..., 0, 0] = 0.0
    assert at([f_s], [f_t_uneven]).item() > 0


def test_attention_transfer_refuses_mismatched_stage_lists():
    f = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError):
        AttentionTransferLoss()([f, f], [f])
    with pytest.raises(ValueError):
        AttentionTransferLoss()([], [])


def test_gradients_flow_to_the_student_only():
    cases = [
        (lambda s, t: SoftTargetLoss(2.0, standardize=True)(s, t), (2, 3)),
        (lambda s, t: DecoupledKDLoss(2.0, standardize=True)(s, t, torch.tensor([0, 2])), (2, 3)),
        (lambda s, t: DistillationLoss(kind="dkd")(s, torch.tensor([1, -1]), t).total, (2, 3)),
        (lambda s, t: AttentionTransferLoss()([s], [t]), (2, 3, 4, 4)),
    ]
    for loss_of, shape in cases:
        s = torch.randn(*shape, requires_grad=True)
        t = torch.randn(*shape, requires_grad=True)
        loss_of(s, t).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert t.grad is None


def test_loss_parts_feature_is_zero_from_distillation_loss():
    parts = DistillationLoss()(torch.tensor(S), torch.tensor([0, 1]), torch.tensor(T))
    assert parts.feature.item() == 0.0
    assert DistillationLoss()(torch.tensor(S), torch.tensor([0, 1]), None).feature.item() == 0.0


@pytest.mark.parametrize("bad", [{"kind": "hard", "standardize": True}, {"kind": "dkd", "dkd_warmup": -1.0},
                                 {"kind": "dkd", "dkd_beta": -1.0}, {"kind": "dkd", "temperature": 0.0}])
def test_new_settings_are_validated(bad):
    with pytest.raises(ValueError):
        DistillationLoss(**bad)
