"""Seed 000 eq. 8: the distillation loss terms against hand-computed values."""

import math

import pytest
import torch

from models.losses import distillation_loss


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_terms_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.0]])
    labels = torch.tensor([0])
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 0.5, 0.0]])
    out = distillation_loss(logits, labels, student, teacher, lambda1=50.0, lambda2=200.0)
    ce = math.log(1.0 + math.exp(-2.0))
    feature = (1.0 + 0.25 + 1.0) / 3  # mean squared error over the feature elements
    kl = _kl(_softmax([1.0, 0.0, -1.0]), _softmax([0.0, 0.5, 0.0]))
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["feature"].item() == pytest.approx(feature, rel=1e-6)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce + 50.0 * feature + 200.0 * kl, rel=1e-5)


def test_kl_direction_is_rgb_given_flow_and_batch_averaged() -> None:
    student = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    out = distillation_loss(torch.zeros(2, 2), torch.tensor([0, 1]), student, teacher)
    forward = _kl(_softmax([3.0, 0.0, 0.0]), _softmax([0.0, 1.0, 2.0]))
    backward = _kl(_softmax([0.0, 1.0, 2.0]), _softmax([3.0, 0.0, 0.0]))
    assert abs(forward - backward) > 0.05  # the two directions are distinguishable here
    assert out["kl"].item() == pytest.approx(forward / 2, rel=1e-5)  # second sample has KL 0


def test_keys_never_depend_on_the_weights() -> None:
    args = (torch.randn(3, 4), torch.tensor([0, 1, 3]), torch.randn(3, 8), torch.randn(3, 8))
    for lambda1, lambda2 in ((0.0, 0.0), (50.0, 0.0), (0.0, 200.0), (50.0, 200.0)):
        out = distillation_loss(*args, lambda1=lambda1, lambda2=lambda2)
        assert set(out) == {"loss", "ce", "feature", "kl"}
    plain = distillation_loss(*args, lambda1=0.0, lambda2=0.0)
    torch.testing.assert_close(plain["loss"], plain["ce"])


def test_no_gradient_reaches_the_teacher() -> None:
    torch.manual_seed(0)
    student_net = torch.nn.Linear(6, 8)
    teacher_net = torch.nn.Linear(6, 8)  # not frozen on purpose: the loss must detach anyway
    head = torch.nn.Linear(8, 3)
    x = torch.randn(4, 6)
    student_features = student_net(x)
    teacher_features = teacher_net(x)
    out = distillation_loss(head(student_features), torch.tensor([0, 1, 2, 0]),
                            student_features, teacher_features)
    out["loss"].backward()
    assert teacher_net.weight.grad is None and teacher_net.bias.grad is None
    assert student_net.weight.grad is not None and student_net.weight.grad.abs().sum() > 0


def test_identical_features_give_zero_distillation_terms() -> None:
    features = torch.randn(2, 16)
    out = distillation_loss(torch.randn(2, 3), torch.tensor([1, 2]), features, features.clone())
    assert out["feature"].item() == 0.0
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-7)
