"""Text conditioning: the caption ``z_g`` → cross-attention context, and the null text.

The null text stands in for the caption in the unconditional branch of classifier-free
guidance, in the 10% of training samples whose caption is dropped, and when an image
has no caption. Two settings (``NullTextEmbedding(learned=...)``):

* ``learned=True`` — a constant learned text embedding (paper §3.2), initialised from the
  empty-prompt embedding and trained;
* ``learned=False`` — the empty-prompt embedding, fixed (PerCo (SD)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..captioning.text_codec import TokenCaption

__all__ = ["NullTextEmbedding", "encode_captions", "text_shape", "check_tokenizer", "drop_captions"]


class NullTextEmbedding(ModelMixin, ConfigMixin):
    """The embedding used in place of a caption, ``(1, sequence_length, dim)``."""

    @register_to_config
    def __init__(self, sequence_length: int = 77, dim: int = 1024, learned: bool = True):
        super().__init__()
        value = torch.zeros(1, sequence_length, dim)
        if learned:
            self.embedding = nn.Parameter(value)
        else:
            self.register_buffer("embedding", value)

    @torch.no_grad()
    def initialise(self, empty_prompt_embedding: torch.Tensor) -> None:
        """Set the value to the text encoder's embedding of the empty prompt."""
        self.embedding.copy_(empty_prompt_embedding.reshape(self.embedding.shape))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.expand(batch_size, -1, -1)


def check_tokenizer(tokenizer, source: str) -> None:
    """Fail loudly on a tokenizer that did not load.

    Offline, ``CLIPTokenizer.from_pretrained(hub_id)`` can return a tokenizer with only its
    special tokens instead of raising; every caption would then encode to nothing.
    """
    if len(tokenizer) < 1000:
        raise RuntimeError(
            f"the tokenizer loaded from {source!r} has only {len(tokenizer)} tokens; its "
            "vocabulary files are missing (offline without a cached copy?)"
        )


def _causal_lm(text_encoder: nn.Module) -> bool:
    """A decoder-only language model used as a text encoder (FLUX.2 [klein]'s Qwen3)."""
    return type(text_encoder).__name__.endswith("ForCausalLM")


#: the prompt length FLUX.2 [klein]'s pipeline pads to
LM_TEXT_LENGTH = 512


def lm_layers(text_encoder: nn.Module) -> tuple[int, int, int]:
    """The hidden-state layers a FLUX.2 [klein] text encoder contributes: a quarter, half
    and three quarters of its depth (Qwen3-4B's 36 layers: the pipeline's 9, 18, 27)."""
    n = text_encoder.config.num_hidden_layers
    return n // 4, n // 2, 3 * n // 4


def text_shape(tokenizer, text_encoder: nn.Module) -> tuple[int, int]:
    """``(length, dim)`` of the context :func:`encode_captions` returns (the null text's)."""
    hidden = text_encoder.config.hidden_size
    if _causal_lm(text_encoder):
        return LM_TEXT_LENGTH, len(lm_layers(text_encoder)) * hidden
    return tokenizer.model_max_length, hidden


def encode_captions(
    tokenizer, text_encoder: nn.Module, captions: Sequence[str], max_length: int | None = None
) -> torch.Tensor:
    """Captions → the text context ``(B, length, dim)`` the denoiser attends to.

    A CLIP text encoder: its last hidden state, padded to the tokenizer's
    ``model_max_length`` (77) as SD was trained. A
    :class:`~perco.captioning.text_codec.TokenCaption` (a caption read back from its token
    ids) is not tokenized again: its ids go in as the tokenizer would place them. A causal
    language model (FLUX.2 [klein]'s Qwen3): the FLUX.2 pipeline's own features
    (``Flux2KleinPipeline._get_qwen3_prompt_embeds``: the chat-templated prompt, padded to
    512, three hidden layers concatenated).
    """
    if _causal_lm(text_encoder):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder, tokenizer, [str(c) for c in captions],
            max_sequence_length=max_length or LM_TEXT_LENGTH,
            hidden_states_layers=lm_layers(text_encoder),
        )  # fmt: skip
    length = max_length or tokenizer.model_max_length
    ids = tokenizer(
        [str(c) for c in captions],
        padding="max_length",
        max_length=length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    for row, caption in enumerate(captions):
        if isinstance(caption, TokenCaption):
            ids[row] = token_row(tokenizer, caption.ids, length)
    return text_encoder(ids.to(text_encoder.device))[0]


def token_row(tokenizer, ids: Sequence[int], length: int) -> torch.Tensor:
    """``BOS, ids…, EOS, padding`` to ``length``: the tokenizer's layout for given ids."""
    body = [tokenizer.bos_token_id, *list(ids)[: length - 2], tokenizer.eos_token_id]
    return torch.tensor(body + [tokenizer.pad_token_id] * (length - len(body)))


def drop_captions(
    text: torch.Tensor, null: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each sample's text embedding by the null one with probability ``p``."""
    keep = torch.rand(text.shape[0], generator=generator) >= p
    keep = keep.to(text.device)[:, None, None]
    return torch.where(keep, text, null.to(text.dtype))
