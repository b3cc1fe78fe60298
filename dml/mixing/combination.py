"""Combinations of strategies that neither paper ships."""

from __future__ import annotations

from dml.mixing.base import MixingStrategy, register_mixing
from dml.mixing.metrix import MetrixEmbedding

__all__ = ["MetrixEmbedExpansion"]


@register_mixing
class MetrixEmbedExpansion(MetrixEmbedding):
    """Metrix on the embeddings on top of Embedding Expansion (a combination neither paper
    ships): ``E = l_EE + w * l_mixed``, where l_EE is Embedding Expansion's loss (synthetic
    points on same-class segments, hardest negative pairs) in place of the plain clean loss, and
    l_mixed Metrix's embedding-level mixed loss. Any Tango pair loss (soft labels and
    pairs of embeddings).
    Parameters: those of ``metrix-embed`` plus ``n`` and ``pairing`` of ``embedding-expansion``.
    The synthetic record holds both kinds of points ("ee" and "metrix-embed+ee").
    """

    name = "metrix-embed+ee"
    version = 2   # 2: Embedding Expansion's per-anchor negatives
    needs = frozenset({"soft", "pairs"})     # Metrix's soft labels, Embedding Expansion's pairs
    requires = "a pair loss on soft labels"

    def __init__(self, loss, alpha: float = 2.0, w: float = 0.4,
                 pairs: str = "pos-neg", lambda_per: str = "batch", first_parents: str = "one",
                 mixed_per_anchor: int | None = None, negatives: str = "random",
                 fixed_lambda: float | None = None, n: int = 2, pairing: str = "all",
                 mined: bool = False):
        from dml.mixing.expansion import EmbeddingExpansion

        expansion = EmbeddingExpansion(loss, n=n, pairing=pairing)   # checks n, pairing, loss
        self.n, self.pairing = expansion.n, expansion.pairing
        super().__init__(loss if isinstance(loss, str) else expansion, alpha, w, pairs,
                         lambda_per, first_parents, mixed_per_anchor, negatives, fixed_lambda,
                         mined)
        self.loss_name = expansion.loss_name

    def bound(self, loss_fn=None):
        """Embedding Expansion around the loss (the clean term); stepped with the plain loss
        object, or with none when built with it."""
        from dml.mixing.expansion import EmbeddingExpansion

        if self.loss is None:                          # built from the loss's name
            if loss_fn is None or isinstance(loss_fn, MixingStrategy):
                return super().bound(loss_fn)
            EmbeddingExpansion(self.loss_name).bound(loss_fn)          # checks the name
            return EmbeddingExpansion(loss_fn, n=self.n, pairing=self.pairing)
        if loss_fn is not None and loss_fn is not self.loss and loss_fn is not self.loss.loss:
            raise ValueError(f"{self.name} was built for the loss object "
                             f"{type(self.loss.loss).__name__} and cannot be stepped with "
                             f"another loss ({type(loss_fn).__name__})")
        return self.loss
