"""The IMRS linear-combination distillation loss, seed 000 section 3.3, eq. 8.

L = CE(s_RGB, y) + lambda1 * ||fc_RGB - fc_Flow|| + lambda2 * KL(P(fc_RGB) || P(fc_Flow)),
with fc the pooled pre-logit features of the RGB student and the frozen flow teacher.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    lambda1: float = 50.0,
    lambda2: float = 200.0,
) -> dict[str, torch.Tensor]:
    """Eq. 8 of seed 000, returned as {"loss", "ce", "feature", "kl"} (always these keys).

    Args:
        student_logits: (B, K) class scores s_RGB of the RGB student.
        labels: (B,) integer class labels.
        student_features: (B, D) fc_RGB, the student's pooled feature.
        teacher_features: (B, D) fc_Flow of the flow teacher; detached here, so no gradient
            ever reaches the teacher whatever the caller does.
        lambda1, lambda2: the weights of the feature and KL terms (50 and 200, Table 4).

    Feature term: eq. 8 prints a norm; we use the mean squared error over all B x D elements,
    as MARS (Crasto et al. 2019, whose loss IMRS adopts) does, and lambda1 = 50 was tuned for that
    scale. KL term: P is a softmax over the feature dimension; KL(P_rgb || P_flow) =
    sum_d P_rgb (log P_rgb - log P_flow), averaged over the batch. Eq. 9 prints
    sum P(x) log P(x) / log Q(x), a ratio of logs, which is a typo for the standard divergence.
    """
    teacher = teacher_features.detach()
    ce = F.cross_entropy(student_logits, labels)
    feature = F.mse_loss(student_features, teacher)
    log_p_rgb = F.log_softmax(student_features, dim=1)
    log_p_flow = F.log_softmax(teacher, dim=1)
    kl = (log_p_rgb.exp() * (log_p_rgb - log_p_flow)).sum(dim=1).mean()
    loss = ce + lambda1 * feature + lambda2 * kl
    return {"loss": loss, "ce": ce, "feature": feature, "kl": kl}
