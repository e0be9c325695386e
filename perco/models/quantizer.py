"""EMA vector quantizer with a low-dimensional codebook (PerCo paper §3.2, eq. 4).

Each hyper-latent vector is projected to the 32-dim codebook space (Yu et al. 2022),
replaced by its nearest codebook entry, and passed on with straight-through gradients.
The codebook is learned by exponential moving averages (van den Oord et al. 2017, App.
A.1), so the codebook term of eq. 4 is dropped; the commitment term
``β‖sg(z_q) − h_s‖²`` stays, with ``β`` a setting::

    h_s (B, dim, h, w) ─ project_in ─► z (B, 32, h, w) ─ nearest entry ─► indices (B, h, w)
                                                        └──────────────► codes = z + sg(e − z)
    codes ─ project_out ─► (B, dim, h, w)     (used when the U-Net takes projected codes)

Training-time codebook maintenance, all in fp32 whatever the autocast state:

* EMA of the per-code counts and sums with Laplace smoothing;
* dead-code restart: codes whose EMA count falls under ``dead_code_threshold`` are
  replaced by encoder outputs drawn from the batch;
* optional k-means initialisation on the first training batch, run once (a buffer
  remembers it).

Under ``torch.distributed`` the counts and sums are all-reduced before the EMA update,
and k-means and restarts are computed from the vectors of all ranks and broadcast from
rank 0, so every rank keeps the same codebook.

``distance="cosine"`` is the cosine-similarity codebook of vector-quantize-pytorch's
``use_cosine_sim=True``, which PerCo (SD) trains with: the projected vector is
l2-normalised, its code is the entry of largest dot product with it, the straight-through
codes and the commitment term use the normalised vector, and the codebook stays on the
unit sphere (k-means and the EMA update renormalise their means). The entry looked up
for an index is the stored one, as there.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..types import QuantizerOutput

__all__ = ["VectorQuantizer", "kmeans"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of ``x`` from every rank (ranks may hold different counts)."""
    if not _distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    longest = int(max(c.item() for c in counts))
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0]))
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts, strict=True)])


def _sample_rows(
    x: torch.Tensor, num: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``num`` rows of ``x`` without replacement when there are enough, else with."""
    n = x.shape[0]
    if n >= num:
        rows = torch.randperm(n, generator=generator)[:num]
    else:
        rows = torch.randint(0, n, (num,), generator=generator)
    return x[rows.to(x.device)]


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 10,
    generator: torch.Generator | None = None,
    cosine: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the rows of ``x``; returns ``(centroids (k, d), counts (k,))``.

    Empty clusters keep their previous centroid (and a count of zero). ``cosine``: rows
    and centroids are unit vectors, assigned by largest dot product (spherical k-means).
    """
    centroids = _sample_rows(x, k, generator)
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        if cosine:
            assign = (x @ centroids.t()).argmax(dim=1)
        else:
            assign = torch.cdist(x, centroids).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        means = sums[filled] / counts[filled, None]
        centroids[filled] = F.normalize(means, dim=1) if cosine else means
    return centroids, counts


class VectorQuantizer(ModelMixin, ConfigMixin):
    """EMA vector quantizer.

    Args:
        codebook_size: ``V``, the number of entries (from the rate).
        dim: channels of the hyper-encoder output.
        codebook_dim: dimension of the codebook space (the paper: 32).
        decay: EMA decay of counts and sums. Default 0.8, the value PerCo (SD) trains with
            (vector-quantize-pytorch's default); the paper does not state one.
        commitment_weight: weight ``β`` of the commitment term of eq. 4. Default 1.0, the
            paper's eq. 4; PerCo (SD) found it unstable and trains with 0 (EMA only).
        epsilon: Laplace smoothing of the EMA counts.
        dead_code_threshold: EMA count under which a code is restarted from the batch
            (0 disables restarts).
        kmeans_init: initialise the codebook by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        distance: ``"euclidean"`` (the paper's nearest entry) or ``"cosine"`` (unit
            vectors, largest dot product: vector-quantize-pytorch's ``use_cosine_sim``,
            PerCo (SD)'s codebook).
    """

    @register_to_config
    def __init__(
        self,
        codebook_size: int = 256,
        dim: int = 320,
        codebook_dim: int = 32,
        decay: float = 0.8,
        commitment_weight: float = 1.0,
        epsilon: float = 1e-5,
        dead_code_threshold: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        distance: str = "euclidean",
    ):
        super().__init__()
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        self.cosine = distance == "cosine"
        same = dim == codebook_dim
        self.project_in = nn.Identity() if same else nn.Conv2d(dim, codebook_dim, 1)
        self.project_out = nn.Identity() if same else nn.Conv2d(codebook_dim, dim, 1)

        embed = torch.randn(codebook_size, codebook_dim)
        if self.cosine:
            embed = F.normalize(embed, dim=1)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.restarted = 0  # codes restarted by the latest training step, for logging

    # -- lookups --------------------------------------------------------------------
    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, h, w)`` → codebook vectors ``(B, codebook_dim, h, w)``."""
        return F.embedding(indices, self.embed).permute(0, 3, 1, 2).contiguous()

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry for each row of ``flat``, in fp32: the smallest
        Euclidean distance, or with ``distance="cosine"`` the largest dot product (rows
        already normalised by :meth:`project`)."""
        embed = self.embed
        if self.cosine:
            return (flat @ embed.t()).argmax(dim=1)
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ embed.t() + embed.pow(2).sum(1)[None]
        return dist2.argmin(dim=1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, dim, h, w)`` → the vectors that are quantized, ``(B, codebook_dim, h, w)``:
        ``project_in``, then l2-normalised over channels with ``distance="cosine"``."""
        z = self.project_in(x)
        if self.cosine:
            with torch.autocast(device_type=z.device.type, enabled=False):
                z = F.normalize(z.float(), dim=1)
        return z

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, h, w)`` of ``x (B, dim, h, w)``, leaving the codebook untouched."""
        z = self.project(x)
        b, c, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
            return self.nearest(flat).view(b, h, w)

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> QuantizerOutput:
        """Quantize ``x (B, dim, h, w)``; updates the codebook when training.

        ``generator`` (CPU) drives the k-means initialisation and dead-code restarts.
        """
        z = self.project(x)
        b, c, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            flat = z32.permute(0, 2, 3, 1).reshape(-1, c)
            if self.training and not bool(self.initted):
                self._kmeans_init(flat.detach(), generator)
            indices = self.nearest(flat.detach())
            quantized = self.embed[indices].view(b, h, w, c).permute(0, 3, 1, 2)
            if self.training:
                self._ema_update(flat.detach(), indices, generator)

            counts = torch.bincount(indices, minlength=self.config.codebook_size).float()
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
            usage = (counts > 0).float().mean()

            weight = self.config.commitment_weight
            loss = weight * F.mse_loss(z32, quantized) if weight > 0 else z32.new_zeros(())
        codes = z + (quantized.to(z.dtype) - z).detach()
        return QuantizerOutput(
            codes=codes,
            indices=indices.view(b, h, w),
            loss=loss,
            perplexity=perplexity,
            usage=usage,
        )

    # -- codebook maintenance -------------------------------------------------------
    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor, generator: torch.Generator | None) -> None:
        samples = _gather_rows(flat)
        cfg = self.config
        centroids, counts = kmeans(
            samples, cfg.codebook_size, cfg.kmeans_iters, generator, cosine=self.cosine
        )
        self.embed.copy_(_broadcast(centroids))
        self.cluster_size.copy_(_broadcast(counts))
        self.embed_avg.copy_(self.embed * self.cluster_size[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(
        self, flat: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None
    ) -> None:
        cfg = self.config
        counts = torch.bincount(indices, minlength=cfg.codebook_size).float()
        sums = torch.zeros_like(self.embed).index_add_(0, indices, flat)
        _all_reduce(counts)
        _all_reduce(sums)

        self.cluster_size.lerp_(counts, 1 - cfg.decay)
        self.embed_avg.lerp_(sums, 1 - cfg.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + cfg.epsilon) / (total + cfg.codebook_size * cfg.epsilon)
        embed = self.embed_avg / (smoothed * total)[:, None]
        self.embed.copy_(F.normalize(embed, dim=1) if self.cosine else embed)

        self._restart_dead_codes(flat, generator)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, generator: torch.Generator | None) -> None:
        threshold = self.config.dead_code_threshold
        dead = self.cluster_size < threshold  # identical on every rank: counts are all-reduced
        num_dead = int(dead.sum())
        self.restarted = num_dead if threshold > 0 else 0
        if not self.restarted:
            return
        replacement = _broadcast(_sample_rows(_gather_rows(flat), num_dead, generator))
        self.embed[dead] = replacement
        self.cluster_size[dead] = threshold
        self.embed_avg[dead] = replacement * threshold
