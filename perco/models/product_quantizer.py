"""Product quantizer for a global image embedding (PerCo paper §4.3, Jégou et al. 2011).

The embedding ``e ∈ R^D`` is split into ``M`` sub-vectors of ``D/M`` dimensions, each
replaced by its nearest entry in its own codebook of ``V`` entries, so an image's global
context costs exactly ``M·log2 V`` bits (the paper: M = 16, V = 1024, 160 bits; 0.00061 bpp
at 512²)::

    e (B, D) ─ split ─► (B, M, D/M) ─ nearest entry per sub-codebook ─► codes (B, M)
                                                                     └► ê (B, D)

The codebooks are learned by k-means on training embeddings (:meth:`fit`, once, before
training), then either kept ``"frozen"`` or ``"ema"``-updated during training like the
hyper-latent's codebook. ``fitted`` is a buffer, so a resumed or loaded model is never
refitted. Under ``torch.distributed`` the embeddings of all ranks are gathered, k-means runs
on rank 0 and the codebooks are broadcast; EMA statistics are all-reduced.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..rates import packed_bits
from .quantizer import _all_reduce, _broadcast, _gather_rows, kmeans

__all__ = ["ProductQuantizer"]


class ProductQuantizer(ModelMixin, ConfigMixin):
    """``M`` independent codebooks of ``V`` entries over the sub-vectors of an embedding.

    Args:
        dim: ``D``, the embedding width (a multiple of ``num_subvectors``).
        num_subvectors: ``M``.
        codebook_size: ``V``.
        update: ``"frozen"`` (the k-means codebooks stay) or ``"ema"`` (exponential moving
            averages of the assigned sub-vectors, as the hyper-latent's quantizer).
        decay: EMA decay.
        kmeans_iters: Lloyd iterations of :meth:`fit`.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 512,
        num_subvectors: int = 16,
        codebook_size: int = 1024,
        update: str = "frozen",
        decay: float = 0.99,
        kmeans_iters: int = 20,
    ):
        super().__init__()
        if dim % num_subvectors:
            raise ValueError(f"dim {dim} is not a multiple of num_subvectors {num_subvectors}")
        if update not in ("frozen", "ema"):
            raise ValueError(f"update must be 'frozen' or 'ema', got {update!r}")
        sub = dim // num_subvectors
        embed = torch.randn(num_subvectors, codebook_size, sub)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.ones(num_subvectors, codebook_size))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def bits(self) -> int:
        """Coded size of one embedding: ``M·log2 V`` bits, packed as the bitstream packs
        indices (:func:`perco.rates.packed_bits`)."""
        return packed_bits(self.config.num_subvectors, self.config.codebook_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().view(x.shape[0], self.config.num_subvectors, -1).transpose(0, 1)

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means of each sub-vector over ``embeddings (N, D)`` (all ranks' rows)."""
        rows = _gather_rows(embeddings.float())
        if rows.shape[0] < self.config.codebook_size:
            raise ValueError(
                f"k-means of {self.config.codebook_size} entries needs at least as many "
                f"training embeddings, got {rows.shape[0]}"
            )
        for m, sub in enumerate(self._split(rows)):
            centroids, counts = kmeans(sub, self.config.codebook_size, self.config.kmeans_iters,
                                       generator)  # fmt: skip
            self.embed[m] = _broadcast(centroids)
            self.cluster_size[m] = _broadcast(counts.clamp(min=1))
        self.embed_avg.copy_(self.embed * self.cluster_size[..., None])
        self.fitted.fill_(True)

    def encode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` → codes ``(B, M)`` (int64), leaving the codebooks untouched."""
        sub = self._split(embeddings)  # (M, B, d)
        return torch.cdist(sub, self.embed).argmin(dim=-1).T.contiguous()

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, M)`` → the quantized embeddings ``(B, D)``."""
        m = torch.arange(self.config.num_subvectors, device=codes.device)
        return self.embed[m[None], codes].flatten(1)

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(quantized (B, D), codes (B, M))``; EMA-updates the codebooks when training."""
        codes = self.encode(embeddings)
        if self.training and self.config.update == "ema":
            self._ema_update(self._split(embeddings.detach()), codes)
        return self.lookup(codes), codes

    @torch.no_grad()
    def _ema_update(self, sub: torch.Tensor, codes: torch.Tensor) -> None:
        v, decay = self.config.codebook_size, self.config.decay
        onehot = torch.nn.functional.one_hot(codes.T, v).float()  # (M, B, V)
        counts = _all_reduce(onehot.sum(dim=1))
        sums = _all_reduce(onehot.transpose(1, 2) @ sub)  # (M, V, d)
        self.cluster_size.lerp_(counts, 1 - decay)
        self.embed_avg.lerp_(sums, 1 - decay)
        used = self.cluster_size > 1e-3  # an entry no one picks keeps its vector
        self.embed[used] = self.embed_avg[used] / self.cluster_size[used, None]
