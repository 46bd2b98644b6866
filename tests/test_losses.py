"""The loss math, checked against values computed by hand."""

import math

import pytest
import torch

from worker.distill.losses import (
    DistillationLoss,
    HardDistillationLoss,
    LabelCrossEntropy,
    SoftTargetLoss,
    inverse_frequency_weights,
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
