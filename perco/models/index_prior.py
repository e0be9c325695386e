"""Index priors: how the ``h×w`` hyper-latent indices become bits, and back.

The bitstream and the codec talk to one interface (:class:`IndexPrior`) and never ask
which prior they hold:

* :class:`UniformPrior` — PerCo's coding: every index costs ``log2 V`` bits, packed in
  mixed radix (:func:`perco.bitstream.pack_indices`); format version 1 files. The default
  of a model without a fitted prior.
* :class:`ContextPrior` — a learned spatial context model, arithmetic-coded with
  ``constriction``'s range coder; format version 2 files. Fitted after training on the
  indices of the training images (:func:`fit_context_prior`, ``perco fit-prior``).

Coding order (four parallel passes)
-----------------------------------
The map is split by row and column parity into four groups, coded one after another::

    pass 0: (even row, even col)   no spatial context: a learned table per pass
    pass 1: (odd,  odd)            sees pass 0 (its four diagonal neighbours, ...)
    pass 2: (even, odd)            sees passes 0-1
    pass 3: (odd,  even)           sees passes 0-2

Within a pass, all symbols are conditionally independent given the earlier passes, so a
decoder makes four network calls whatever the image size, on a GPU or a CPU. Inside a
pass, symbols are coded in raster order. This is also the **selection order of the
hybrid mode**: ``keep=F`` transmits the first ``ceil(round(64·F)·n / 64)`` indices in
coding order (``F`` is rounded to 64ths); the decoder draws the others from the prior.

The network of pass ``p ≥ 1``: each coded neighbour contributes a learned embedding of
its index (initialised from the quantizer's codebook vectors, so codes that are close in
codebook space start close), missing ones contribute zero and a 0 in a "known" channel;
a ``K×K`` convolution (one per pass) reads that window, two ``1×1`` layers (shared)
produce ``V`` logits, plus a per-pass bias.

Bit-exact decoding
------------------
The encoder and decoder must build identical distributions, on any machine, batch
composition, thread count or device. The coding path therefore never rounds:

1. Weights, embeddings and biases are turned into integers by fixed scaling
   (``round(w·2^12)``, ``round(e·2^8)``, ``round(b·2^20)``; multiplying a float32 by a
   power of two and rounding is exact everywhere).
2. The network runs on those integers held in float64 tensors. Every product and partial
   sum is an integer below ``2^53`` in magnitude (checked when the prior is loaded:
   activations are clamped to ``[0, 2^20]`` and ``fan_in · 2^20 · max|W| + max|b| <
   2^53``), so each floating-point operation is exact and the result does not depend on
   the order of the reductions, blocking, FMA, the number of threads or the batch.
   Convolutions are written as ``unfold`` + matrix product (no FFT or Winograd paths).
   Rescaling between layers is ``floor(x / 2^12)``: exact.
3. Logits come out as integers in 1/256 nat. Probability weights are looked up in an
   integer table stored with the prior (``T[i] = max(1, round(2^24·e^(−i/256)))``,
   saved, not recomputed, so no ``exp`` of any libm enters), indexed by
   ``max logit − logit``.
4. ``constriction`` receives those integer weights (exact in float64) and quantizes them
   to its fixed-point distribution with its own deterministic code.

Sampling the untransmitted indices of the hybrid mode is integer-only too: the ``k``-th
missing index (coding order) takes ``u = r_k mod Σw`` on the cumulative weights, where
``r`` is the raw 64-bit output of ``numpy.random.PCG64(seed)`` (a fixed generator
algorithm, unlike ``Generator``'s methods).

Stream layout: the first symbol is the kept share ``k ∈ [0, 64)`` (0: every index, else
``k/64``) under a fixed distribution that costs 0.0014 bits for "every index"; then the
kept indices in coding order. The encoder cuts the range coder's final words to the
shortest byte string that still decodes to the same symbols (the decoder pads with zero
bytes), and pads it with zero bytes to at least one byte per 128 indices: a decoder
then refuses a stream too short for its map before doing any work, so a corrupted size
field cannot make it build distributions for billions of indices (a prior that codes
under 1/16 bit per index on average pays the few padding bytes). The stream is thus a
function of the symbols, and the decoder checks it: it codes the symbols it decoded
again and refuses a stream that differs (a changed byte, zeroed bytes, an image size that
reads the stream on another grid). This costs no bits; it is not a CRC (a change that
happens to give another stream in this canonical form passes), and it cannot see a cut
stream, which decodes to other symbols of which it is the canonical form: the container
stores the stream's length for that (format version 4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..bitstream import BitstreamError, pack_indices, unpack_indices
from ..range_coding import decoder as range_decoder
from ..range_coding import is_cut, shortest_prefix, to_bytes

__all__ = [
    "IndexPrior",
    "UniformPrior",
    "ContextPrior",
    "pass_order",
    "kept_count",
    "keep_code",
    "fit_context_prior",
    "unigram_bits",
    "index_maps",
]

PASSES = ((0, 0), (1, 1), (0, 1), (1, 0))  # (row parity, column parity) of each pass
KEEP_STEPS = 64  # the hybrid mode keeps k/64 of the indices
INDICES_PER_BYTE = 128  # a stream has at least one byte per 128 indices (see below)
_W_SCALE, _E_SCALE = 12, 8  # weights ·2^12, embeddings and activations ·2^8
_ACT_MAX = 2.0**20
_EXACT = 2.0**53
_LOGIT_UNIT = 256  # logits in 1/256 nat
_TABLE_BITS = 24


def keep_code(keep: float) -> int:
    """The header value of a kept share ``keep ∈ (0, 1]``: 0 for all, else 64ths."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    k = round(keep * KEEP_STEPS)
    if k == 0:
        raise ValueError(f"keep={keep} rounds to 0/64: no index would be sent")
    return 0 if k == KEEP_STEPS else k


def kept_count(code: int, n: int) -> int:
    """How many of ``n`` indices a kept-share code transmits."""
    return n if code == 0 else -(-code * n // KEEP_STEPS)


def pass_order(h: int, w: int) -> np.ndarray:
    """Flat positions of an ``h×w`` map in coding order (pass by pass, raster inside)."""
    grid = np.arange(h * w).reshape(h, w)
    return np.concatenate([grid[ry::2, rx::2].reshape(-1) for ry, rx in PASSES])


class IndexPrior:
    """What the bitstream needs from a prior.

    ``coding``: 0 for uniform packing (format version 1), 1 for a learned prior (format
    version 2). ``encode`` codes a batch of same-shape maps; ``decode`` one stream.
    """

    coding: int
    codebook_size: int

    def encode(self, indices: np.ndarray, keep: float = 1.0) -> list[bytes]:
        """``(B, h, w)`` indices → one byte string per map."""
        raise NotImplementedError

    def decode(self, data: bytes, shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, int]:
        """One stream → ``(h, w)`` indices and the kept-share code (0: all transmitted).
        Raises :class:`~perco.bitstream.BitstreamError` on a stream it cannot read."""
        raise NotImplementedError

    def ideal_bits(self, indices: np.ndarray) -> np.ndarray:
        """``-Σ log2 p`` of each map of ``(B, h, w)`` under the coder's distributions."""
        raise NotImplementedError


@dataclass(frozen=True)
class UniformPrior(IndexPrior):
    """``log2 V`` bits per index, mixed-radix packed (PerCo's coding)."""

    codebook_size: int
    coding = 0

    def encode(self, indices: np.ndarray, keep: float = 1.0) -> list[bytes]:
        if keep_code(keep):
            raise ValueError("the hybrid mode (keep < 1) needs a model with a fitted index prior")
        return [pack_indices(m, self.codebook_size) for m in np.asarray(indices)]

    def decode(self, data: bytes, shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, int]:
        return unpack_indices(data, shape[0] * shape[1], self.codebook_size).reshape(shape), 0

    def ideal_bits(self, indices: np.ndarray) -> np.ndarray:
        b = np.asarray(indices).shape[0]
        return np.full(b, indices[0].size * math.log2(self.codebook_size))


def _exp_table() -> torch.Tensor:
    i = torch.arange(_LOGIT_UNIT * 18, dtype=torch.float64)
    return (torch.exp(-i / _LOGIT_UNIT) * 2.0**_TABLE_BITS).round().clamp_min(1)


class ContextPrior(ModelMixin, ConfigMixin, IndexPrior):
    """A learned spatial context model over the indices (see the module docstring).

    Args:
        codebook_size: ``V``.
        embed_dim: width of the index embeddings (the quantizer's codebook dimension).
        channels: hidden width.
        kernel: side of each pass's context window (odd).
    """

    coding = 1

    @register_to_config
    def __init__(
        self, codebook_size: int = 256, embed_dim: int = 32, channels: int = 64, kernel: int = 5
    ):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"kernel must be odd, got {kernel}")
        self.embed = nn.Parameter(torch.randn(codebook_size, embed_dim))
        self.context = nn.ModuleList(nn.Conv2d(embed_dim + 1, channels, kernel) for _ in PASSES[1:])
        self.hidden = nn.Conv2d(channels, channels, 1)
        self.head = nn.Conv2d(channels, codebook_size, 1)
        self.pass_bias = nn.Parameter(torch.zeros(len(PASSES), codebook_size))
        self.register_buffer("table", _exp_table())
        self._integer: dict | None = None

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    # -- the float network (fitting) ----------------------------------------------------
    def _windows(self, emb: torch.Tensor, p: int, one: float = 1.0) -> torch.Tensor:
        """The padded input of pass ``p``, cut so that a stride-2 ``K×K`` window lands on
        each of the pass's positions: ``(B, d+1, ·, ·)``; unknown positions are zero, the
        last channel is ``one`` where the index is known."""
        b, _, h, w = emb.shape
        rows = torch.arange(h, device=emb.device) % 2
        cols = torch.arange(w, device=emb.device) % 2
        known = torch.zeros(h, w, dtype=torch.bool, device=emb.device)
        for ry, rx in PASSES[:p]:
            known |= (rows[:, None] == ry) & (cols[None] == rx)
        mask = known.to(emb.dtype).expand(b, 1, h, w)
        x = torch.cat([emb * mask, mask * one], 1)
        pad = self.config.kernel // 2
        ry, rx = PASSES[p]
        return F.pad(x, (pad,) * 4)[..., ry:, rx:]

    def logits(self, indices: torch.Tensor) -> list[torch.Tensor]:
        """Float logits of each pass, ``(B, V, h_p, w_p)``, for fitting (differentiable)."""
        emb = self.embed[indices].permute(0, 3, 1, 2)
        out = []
        for p, (ry, rx) in enumerate(PASSES):
            bias = self.pass_bias[p][None, :, None, None]
            hp, wp = indices[:, ry::2, rx::2].shape[-2:]
            if p == 0 or hp * wp == 0:  # (a map of one row or column has empty passes)
                out.append(bias.expand(indices.shape[0], -1, hp, wp))
                continue
            x = F.conv2d(self._windows(emb, p), self.context[p - 1].weight, stride=2)
            x = F.relu(x + self.context[p - 1].bias[None, :, None, None]).clamp(
                max=_ACT_MAX / 2**_E_SCALE
            )
            x = F.relu(self.hidden(x)).clamp(max=_ACT_MAX / 2**_E_SCALE)
            out.append(self.head(x) + bias)
        return out

    def loss(self, indices: torch.Tensor) -> torch.Tensor:
        """Mean bits per index of ``(B, h, w)`` maps under the float network."""
        total = 0.0
        for (ry, rx), logits in zip(PASSES, self.logits(indices), strict=True):
            target = indices[:, ry::2, rx::2]
            total = total + F.cross_entropy(logits, target, reduction="sum")
        return total / (indices.numel() * math.log(2))

    # -- the integer network (coding) ---------------------------------------------------
    def _integers(self) -> dict:
        """The fixed-point weights, built once and checked against the exactness bound."""
        if self._integer is None:
            if any(p.dtype != torch.float32 for p in self.parameters()):
                raise ValueError(
                    "the index prior must stay in float32: its integer weights come from the "
                    "float32 values it was fitted with (a model.to(dtype) cast it)"
                )
            q = {}
            with torch.no_grad():

                def fix(t, bits):
                    return (t.detach().double().cpu() * 2.0**bits).round()

                q["embed"] = fix(self.embed, _E_SCALE)
                q["context"] = [
                    (fix(c.weight, _W_SCALE).flatten(1), fix(c.bias, _W_SCALE + _E_SCALE))
                    for c in self.context
                ]
                q["hidden"] = (fix(self.hidden.weight, _W_SCALE).flatten(1),
                               fix(self.hidden.bias, _W_SCALE + _E_SCALE))  # fmt: skip
                q["head"] = (fix(self.head.weight, _W_SCALE).flatten(1),
                             fix(self.head.bias, _W_SCALE + _E_SCALE))  # fmt: skip
                q["pass_bias"] = fix(self.pass_bias, _E_SCALE)
                q["table"] = self.table.detach().double().cpu()
            if q["embed"].abs().max() > _ACT_MAX:
                raise ValueError("index prior embeddings are too large for exact coding")
            for weight, bias in [*q["context"], q["hidden"], q["head"]]:
                bound = weight.shape[1] * _ACT_MAX * weight.abs().max() + bias.abs().max()
                if bound >= _EXACT:
                    raise ValueError("index prior weights are too large for exact coding")
            if not torch.equal(q["table"], q["table"].round()) or q["table"].min() < 1:
                raise ValueError("index prior probability table must hold positive integers")
            self._integer = q
        return self._integer

    def load_state_dict(self, *args, **kwargs):
        self._integer = None
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), ...: derive the integers again
        self._integer = None
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self._integer = None
        return super().train(mode)

    @staticmethod
    def _layer(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool
    ) -> torch.Tensor:
        """``x (B, fan_in, n)`` integers at scale 2^8 → ``(B, out, n)`` at scale 2^8."""
        y = torch.floor((weight @ x + bias[:, None]) / 2.0**_W_SCALE)
        return y.clamp(0, _ACT_MAX) if relu else y

    def weights(self, indices: torch.Tensor, p: int) -> torch.Tensor:
        """Integer probability weights ``(B, n_p, V)`` (float64) of pass ``p``'s symbols,
        given ``indices (B, h, w)`` whose earlier passes are set (the rest is ignored)."""
        q = self._integers()
        b = indices.shape[0]
        ry, rx = PASSES[p]
        n = indices[:, ry::2, rx::2][0].numel()
        logits = q["pass_bias"][p][None, :, None].expand(b, -1, n)
        if p > 0 and n > 0:
            emb = q["embed"][indices.cpu()].permute(0, 3, 1, 2)
            x = F.unfold(self._windows(emb, p, 2.0**_E_SCALE), self.config.kernel, stride=2)
            x = self._layer(x, *q["context"][p - 1], relu=True)
            x = self._layer(x, *q["hidden"], relu=True)
            logits = self._layer(x, *q["head"], relu=False) + logits
        if n == 0:
            return logits.transpose(1, 2).contiguous()
        gap = (logits.amax(1, keepdim=True) - logits).clamp(max=len(q["table"]) - 1)
        return q["table"][gap.long()].transpose(1, 2).contiguous()

    def _pass_slices(self, h: int, w: int) -> list[slice]:
        sizes = [len(range(ry, h, 2)) * len(range(rx, w, 2)) for ry, rx in PASSES]
        ends = np.cumsum(sizes)
        return [slice(e - s, e) for s, e in zip(sizes, ends, strict=True)]

    def _all_weights(self, indices: np.ndarray) -> np.ndarray:
        """``(B, n, V)`` weights of every symbol in coding order (encoder side: every pass
        at once, since the true indices are known)."""
        t = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return torch.cat([self.weights(t, p) for p in range(len(PASSES))], 1).numpy()

    def encode(self, indices: np.ndarray, keep: float = 1.0) -> list[bytes]:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size})")
        code = keep_code(keep)
        b, h, w = indices.shape
        order = pass_order(h, w)
        kept = kept_count(code, h * w)
        weights = self._all_weights(indices)[:, :kept]
        return [
            _encode_stream(code, m.reshape(-1)[order][:kept], wts)
            for m, wts in zip(indices, weights, strict=True)
        ]

    def ideal_bits(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        b, h, w = indices.shape
        weights = self._all_weights(indices)
        symbols = indices.reshape(b, -1)[:, pass_order(h, w)]
        p = np.take_along_axis(weights, symbols[..., None], 2)[..., 0] / weights.sum(2)
        return -np.log2(p).sum(1)

    def decode(self, data: bytes, shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, int]:
        import constriction

        h, w = shape
        decoder = range_decoder(data)
        try:
            code = int(decoder.decode(_keep_model()))
        except (AssertionError, ValueError, RuntimeError):
            raise BitstreamError("index stream is corrupt") from None
        kept = kept_count(code, h * w)
        if len(data) < min_stream_bytes(kept):
            raise BitstreamError(f"index stream of {len(data)} bytes is too short for "
                                 f"{kept} indices (corrupt size or stream)")  # fmt: skip
        order = pass_order(h, w)
        flat = np.zeros(h * w, dtype=np.int64)
        draws = np.random.PCG64(seed).random_raw(h * w - kept) if kept < h * w else None
        done, coded_symbols, coded_weights = 0, [], []
        family = constriction.stream.model.Categorical(perfect=False)
        for p, sl in enumerate(self._pass_slices(h, w)):
            grid = torch.from_numpy(flat.reshape(1, h, w))
            weights = self.weights(grid, p)[0].numpy()
            coded = max(0, min(sl.stop, kept) - sl.start)
            if coded:
                try:
                    symbols = decoder.decode(family, weights[:coded])
                except (AssertionError, ValueError, RuntimeError):
                    raise BitstreamError("index stream is corrupt") from None
                flat[order[sl][:coded]] = symbols
                coded_symbols.append(symbols)
                coded_weights.append(weights[:coded])
            if coded < len(weights):  # hybrid mode: draw the rest from the prior
                rest = weights[coded:].astype(np.int64)
                cdf = np.cumsum(rest, 1)
                u = (draws[done : done + len(rest)] % cdf[:, -1].astype(np.uint64)).astype(np.int64)
                flat[order[sl][coded:]] = (cdf <= u[:, None]).sum(1)
                done += len(rest)
        if flat.max(initial=0) >= self.codebook_size:
            raise BitstreamError("index stream is corrupt")
        # the encoder's stream is a function of the symbols: any other stream that decodes
        # (a changed byte, a size that reads the stream on another grid) is refused
        symbols = np.concatenate(coded_symbols) if coded_symbols else np.zeros(0, np.int64)
        weights = np.concatenate(coded_weights) if coded_weights else np.zeros((0, 1))
        if not _is_cut_of(data, _full_stream(code, symbols, weights), len(weights)):
            raise BitstreamError("index stream is not the one its indices code to (corrupt)")
        return flat.reshape(h, w), code


@functools.cache
def _keep_model():
    import constriction

    p = np.ones(KEEP_STEPS)
    p[0] = 2.0**16 - (KEEP_STEPS - 1)
    return constriction.stream.model.Categorical(p, perfect=False)


def _full_stream(code: int, symbols: np.ndarray, weights: np.ndarray) -> bytes:
    """The range coder's whole output (32-bit words) for the kept share and symbols."""
    import constriction

    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(code, _keep_model())
    family = constriction.stream.model.Categorical(perfect=False)
    if len(symbols):
        encoder.encode(symbols.astype(np.int32), family, weights)
    return to_bytes(encoder)


def _encode_stream(code: int, symbols: np.ndarray, weights: np.ndarray) -> bytes:
    # the cut is checked with the encoder's distributions: until the first wrong symbol
    # they are the ones the real decoder would build
    data = shortest_prefix(
        _full_stream(code, symbols, weights), lambda d: _decodes_to(d, code, symbols, weights)
    )
    return data + bytes(max(0, min_stream_bytes(len(weights)) - len(data)))


def _is_cut_of(data: bytes, full: bytes, count: int) -> bool:
    """Whether ``data`` has the form the encoder gives a stream whose whole output is
    ``full``: one of its cuts (:func:`perco.range_coding.is_cut`), never ending in a zero
    byte (a shorter prefix would then decode alike), then zero bytes up to
    :func:`min_stream_bytes`. One encoding, no decoding: the check every decode makes."""
    core = data.rstrip(b"\x00")
    return len(data) == max(len(core), min_stream_bytes(count)) and is_cut(core, full)


def min_stream_bytes(count: int) -> int:
    """The fewest bytes a stream of ``count`` coded indices may have."""
    return -(-count // INDICES_PER_BYTE)


def _decodes_to(data: bytes, code: int, symbols: np.ndarray, weights: np.ndarray) -> bool:
    import constriction

    decoder = range_decoder(data)
    try:
        if int(decoder.decode(_keep_model())) != code:
            return False
        if not len(symbols):
            return True
        family = constriction.stream.model.Categorical(perfect=False)
        return np.array_equal(decoder.decode(family, weights), symbols)
    except (AssertionError, ValueError, RuntimeError):
        return False


# -- fitting ------------------------------------------------------------------------------
def unigram_bits(train: Sequence[np.ndarray], test: Sequence[np.ndarray], codebook_size: int,
                 alpha: float = 0.5) -> np.ndarray:  # fmt: skip
    """Ideal bits of each ``test`` map under a frequency table of the ``train`` indices
    (add-``alpha`` smoothing): the baseline a context model must beat."""
    counts = np.bincount(np.concatenate([m.reshape(-1) for m in train]), minlength=codebook_size)
    logp = np.log2((counts + alpha) / (counts.sum() + alpha * codebook_size))
    return np.array([-logp[m.reshape(-1)].sum() for m in test])


def _batches(maps: Sequence[np.ndarray], crop: int, batch: int, rng: np.random.Generator):
    """Random same-shape batches: maps grouped by shape, larger ones cropped to ``crop``
    at even offsets (so each position keeps its pass)."""
    shapes: dict[tuple[int, int], list[np.ndarray]] = {}
    for m in maps:
        h, w = m.shape
        shapes.setdefault((min(h, crop), min(w, crop)), []).append(m)
    keys = sorted(shapes)
    sizes = np.array([len(shapes[k]) for k in keys], dtype=float)
    while True:
        key = keys[rng.choice(len(keys), p=sizes / sizes.sum())]
        pool = shapes[key]
        out = []
        for i in rng.integers(0, len(pool), batch):
            m = pool[i]
            top = 2 * rng.integers(0, (m.shape[0] - key[0]) // 2 + 1)
            left = 2 * rng.integers(0, (m.shape[1] - key[1]) // 2 + 1)
            out.append(m[top : top + key[0], left : left + key[1]])
        yield torch.from_numpy(np.stack(out)).long()


def fit_context_prior(
    train: Sequence[np.ndarray],
    valid: Sequence[np.ndarray],
    codebook: torch.Tensor,
    *,
    steps: int = 2000,
    batch: int = 32,
    crop: int = 24,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    channels: int = 64,
    kernel: int = 5,
    eval_every: int = 100,
    seed: int = 0,
    log=None,
) -> tuple[ContextPrior, dict]:
    """Fit a :class:`ContextPrior` on index maps; returns it and a fitting record.

    ``valid`` (maps of images not in ``train``) picks the step to keep (early stopping):
    with a few hundred photos the network overfits long before ``steps``. ``codebook``:
    the quantizer's ``(V, d)`` entries, the embeddings' starting point.
    """
    torch.manual_seed(seed)
    v, d = codebook.shape
    prior = ContextPrior(v, d, channels, kernel)
    with torch.no_grad():
        prior.embed.copy_(codebook / codebook.std().clamp_min(1e-8))
        counts = np.bincount(np.concatenate([m.reshape(-1) for m in train]), minlength=v)
        prior.pass_bias.copy_(torch.from_numpy(np.log((counts + 0.5) / (counts.sum() + 0.5 * v))))
    opt = torch.optim.AdamW(prior.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batches = _batches(train, crop, batch, np.random.default_rng(seed))
    by_shape: dict[tuple[int, int], list[np.ndarray]] = {}
    for m in valid:
        by_shape.setdefault(m.shape, []).append(m)
    valid_t = [torch.from_numpy(np.stack(ms)).long() for ms in by_shape.values()]

    def valid_bits() -> float:
        with torch.no_grad():
            return sum(prior.loss(t).item() * t.numel() for t in valid_t) / sum(
                t.numel() for t in valid_t
            )

    best = (valid_bits(), 0, {k: t.clone() for k, t in prior.state_dict().items()})
    history = [(0, best[0])]
    prior.train()
    for step in range(1, steps + 1):
        loss = prior.loss(next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            bits = valid_bits()
            history.append((step, bits))
            if log:
                log(f"step {step}: train {loss.item():.3f}, valid {bits:.3f} bits/index")
            if bits < best[0]:
                best = (bits, step, {k: t.clone() for k, t in prior.state_dict().items()})
    prior.load_state_dict(best[2])
    prior.eval()
    record = {"valid_bits_per_index": best[0], "step": best[1], "history": history}
    return prior, record


@torch.no_grad()
def index_maps(model, latent: torch.Tensor, image: torch.Tensor | None = None,
               phases: int = 4) -> list[np.ndarray]:  # fmt: skip
    """The index maps of one image's normalised ``latent (C, H, W)`` seen through windows
    shifted by ``phases`` offsets per axis within a hyper-latent cell (more maps from the
    same photos: a shifted window puts other content into each cell). ``image``: its
    pixels ``(3, 8H, 8W)``, for models whose hyper-encoder also reads them."""
    ds = model.rate.downsample
    factor = model.autoencoder.factor
    offsets = sorted(set(range(0, ds, max(1, ds // phases))))
    maps = []
    for dy in offsets:
        for dx in offsets:
            h, w = (latent.shape[1] - dy) // ds * ds, (latent.shape[2] - dx) // ds * ds
            if h < ds or w < ds:
                continue
            z = latent[None, :, dy : dy + h, dx : dx + w].to(model.device)
            x = None
            if image is not None:
                x = image[None, :, dy * factor : (dy + h) * factor, dx * factor : (dx + w) * factor]
                x = x.to(model.device)
            hyper = model.hyper_encoder(model._hyper_input(z, x))
            maps.append(model.quantizer.encode(hyper)[0].cpu().numpy())
    return maps
