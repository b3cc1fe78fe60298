"""The mixing playground's computations (pure torch, no Streamlit): mix a pair of images at the
input, at a feature map or at the embedding, the soft label of a mix, Embedding Expansion points,
and every loss's terms as lambda goes from 0 to 1."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

LEVELS = ("input", "feature", "embedding")


@torch.no_grad()
def mix_embeddings(model, x1: torch.Tensor, x2: torch.Tensor, lams: np.ndarray,
                   stage: int | None = None) -> dict[str, np.ndarray]:
    """Embeddings (L, D) of ``lam * a + (1 - lam) * b`` for each lambda, mixing at each level
    (docs/METHODS.md section 2): the normalised images ``x1``, ``x2`` (1, C, H, W); the feature maps
    after ``stage`` stages (default: the last one, before pooling); the embeddings (mixed, then
    re-normalised)."""
    model.eval()
    lam = torch.as_tensor(np.asarray(lams, np.float32)).view(-1, 1, 1, 1)
    stage = model.num_stages if stage is None else int(stage)
    out = {}
    out["input"] = model(lam * x1 + (1 - lam) * x2)
    h1, h2 = model.forward_to(x1, stage), model.forward_to(x2, stage)
    out["feature"] = model.forward_from(lam * h1 + (1 - lam) * h2, stage)
    e1, e2 = model(x1), model(x2)
    out["embedding"] = F.normalize(lam.view(-1, 1) * e1 + (1 - lam.view(-1, 1)) * e2, dim=1)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def mix_images(img1: np.ndarray, img2: np.ndarray, lam: float) -> np.ndarray:
    """The input-level mix of two uint8 images (any shape): ``lam * img1 + (1 - lam) * img2``."""
    m = lam * img1.astype(np.float32) + (1 - lam) * img2.astype(np.float32)
    return np.clip(m + 0.5, 0, 255).astype(np.uint8)


def soft_label(lam: float, class1: int, class2: int) -> dict[int, float]:
    """Class memberships of a mix: ``lam`` for class1, ``1 - lam`` for class2 (summed when the
    classes are the same), from ``dml.losses.mixed_membership``."""
    from dml.losses import mixed_membership

    width = max(int(class1), int(class2)) + 1
    m = mixed_membership(torch.tensor([int(class1)]), torch.tensor([int(class2)]), float(lam),
                         width, torch.float64)[0]
    return {int(c): float(m[c]) for c in dict.fromkeys((int(class1), int(class2)))}


def expansion_points(e_i: np.ndarray, e_j: np.ndarray, n: int = 2,
                     normalize: bool = True) -> np.ndarray:
    """Embedding Expansion (Ko & Gu, CVPR 2020, eq. 1): ``n`` points dividing the segment between
    two same-class embeddings into ``n + 1`` equal parts, ``x_k = (k e_j + (n + 1 - k) e_i) /
    (n + 1)``, ``k = 1..n``, L2-normalised: ``dml.mixing.expansion.expand_embeddings`` on the
    pair. -> (n, D)."""
    from dml.mixing.expansion import expand_embeddings

    pair = torch.as_tensor(np.stack([e_i, e_j]), dtype=torch.float32)
    pts, *_ = expand_embeddings(pair, torch.tensor([0, 0]), n=n, normalize=normalize)
    return pts.numpy()


def loss_terms_vs_lambda(anchor: np.ndarray, mixes: np.ndarray, lams: np.ndarray, c1: int,
                         c2: int, num_classes: int, proxies: np.ndarray | None = None,
                         losses: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """For each loss, its terms (``last_terms``) for one clean anchor of class ``c1`` against a
    mixed reference of classes ``c1``/``c2`` with soft target ``lam``, for every lambda.

    anchor (D,); mixes (L, D), the mixed embeddings at each lambda; c1, c2 contiguous class
    indices < num_classes. Pair losses see the anchor with the mix as its only reference; proxy
    losses see the mix as the anchor, with its soft label over the proxies (C, D) (default: one
    proxy per class at the class means the caller passes). Returns {loss: {term: (L,)}}.
    """
    from dml.losses import build_loss, list_losses, mixed_membership

    names = losses or list_losses()
    a = torch.as_tensor(anchor, dtype=torch.float32).view(1, -1)
    a = F.normalize(a, dim=1)
    hard = torch.tensor([int(c1)])
    out: dict[str, dict[str, list[float]]] = {}
    for name in names:
        loss = build_loss(name, num_classes=num_classes, embedding_dim=a.shape[1])
        if getattr(loss, "uses_proxies", False) and proxies is None:
            continue
        terms: dict[str, list[float]] = {}
        for lam, mix in zip(lams, mixes):
            m = F.normalize(torch.as_tensor(mix, dtype=torch.float32).view(1, -1), dim=1)
            soft = mixed_membership(torch.tensor([int(c1)]), torch.tensor([int(c2)]),
                                    float(lam), num_classes)
            with torch.no_grad():
                if getattr(loss, "uses_proxies", False):
                    total = loss(m, soft, proxies=torch.as_tensor(proxies, dtype=torch.float32))
                else:
                    total = loss(a, hard, ref_embeddings=m, ref_labels=soft)
            values = {k: float(v) for k, v in getattr(loss, "last_terms", {}).items()}
            values["total"] = float(total)
            for k, v in values.items():
                terms.setdefault(k, []).append(v)
        out[name] = {k: np.asarray(v) for k, v in terms.items()}
    return out


def class_proxies(embeddings: np.ndarray, labels: np.ndarray,
                  classes: np.ndarray) -> np.ndarray:
    """One proxy per class: the normalised mean embedding of its examples -> (C, D)."""
    P = np.stack([embeddings[labels == c].mean(axis=0) for c in classes]).astype(np.float32)
    return P / (np.linalg.norm(P, axis=1, keepdims=True) + 1e-12)


def terms_for_plot(terms: Mapping[str, Mapping[str, np.ndarray]],
                   keep: tuple[str, ...] = ("pos", "neg", "ap", "an", "ce", "pos_sim")
                   ) -> dict[str, dict[str, np.ndarray]]:
    """The positive / negative terms of each loss (falling back to its total)."""
    out = {}
    for loss, t in terms.items():
        chosen = {k: v for k, v in t.items() if k in keep}
        out[loss] = chosen or {"total": t["total"]}
    return out
