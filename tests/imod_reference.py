"""Independent reference implementations for the IMoD tests: plain loops over sequences, written from the formulas.

Nothing here imports :mod:`mm_trainer.imod` beyond the zone codes, so the tests compare two separate derivations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_trainer.imod.masks import NON_TEXT_ZONE, SHARED_ZONE, TEXT_ZONE
from mm_trainer.model.modality import PAD, TEXT


def float_masks(zone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M_t, M_o, M_s)`` as float 0/1 tensors."""
    return (zone == TEXT_ZONE).float(), (zone == NON_TEXT_ZONE).float(), (zone == SHARED_ZONE).float()


def reference_constraints(
    a: torch.Tensor, zone: torch.Tensor, x: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over sequences of L_TS + L_OS, Σ_{sequences with both} L_MA / #sequences)`` for one layer.

    Args:
        a: ``A`` (``r x d``), float.
        zone: Its zones.
        x: Layer input ``(B, T, d)``, float.
        classes: Token classes ``(B, T)`` (``PAD`` / ``TEXT`` / media).
    """
    m_t, m_o, m_s = float_masks(zone)
    r = a.shape[0]
    batch = classes.shape[0]
    msd = a.new_zeros(())
    ma = a.new_zeros(())
    for b in range(batch):
        text = (classes[b] == TEXT).float()
        non_text = ((classes[b] != TEXT) & (classes[b] != PAD)).float()
        x_t = x[b] * text[:, None]  # non-text (and padding) tokens zeroed
        x_o = x[b] * non_text[:, None]
        n_t, n_o = text.sum(), non_text.sum()
        if n_t > 0:
            z_tilde = (a * (m_t + m_s)) @ x_t.T
            z = a @ x_t.T
            msd = msd + ((z_tilde - z) ** 2).sum() / (n_t * r)
        if n_o > 0:
            z_tilde = (a * (m_o + m_s)) @ x_o.T
            z = a @ x_o.T
            msd = msd + ((z_tilde - z) ** 2).sum() / (n_o * r)
        if n_t > 0 and n_o > 0:
            shared = ((a * m_s) @ x[b].T).T  # (T, r)
            s_t = shared[text.bool()]
            s_o = shared[non_text.bool()]
            mean_t, mean_o = s_t.mean(0), s_o.mean(0)
            c_t = torch.stack([F.cosine_similarity(s, mean_t, dim=0) for s in s_t]).mean()
            c_o = torch.stack([F.cosine_similarity(s, mean_o, dim=0) for s in s_o]).mean()
            ma = ma + 1 - (c_t + c_o) * F.cosine_similarity(mean_t, mean_o, dim=0)
    return msd / batch, ma / batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy over labels that are not ``-100``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="sum"
    )
    return total / (shift_labels != -100).sum()
