"""Where the caption ``z_g`` comes from: a vision-language model, a file, ground truth, none.

PerCo conditions on an automatically generated caption (BLIP-2, at most 32 tokens; PerCo
(SD) uses ``Salesforce/blip2-opt-2.7b-coco``). Every source has one interface::

    captioner = load_captioner("blip2")                    # or an HF name, "file:...", ...
    captions = captioner(images, keys)                     # PIL images, their ids

Heavy models are imported and loaded on first use. Decoding is deterministic (greedy, no
sampling) and the settings are in ``captioner.settings``, which outputs record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ..io import read_captions

__all__ = [
    "Captioner",
    "VisionLanguageCaptioner",
    "Blip2Captioner",
    "FileCaptions",
    "GroundTruthCaptions",
    "NoCaptions",
    "load_captioner",
    "DEFAULT_BLIP2",
]

DEFAULT_BLIP2 = "Salesforce/blip2-opt-2.7b-coco"


class Captioner:
    """``captioner(images, keys) -> captions`` (``None``: no caption for that image)."""

    name: str = "captioner"
    needs_images: bool = True

    @property
    def settings(self) -> dict:
        return {"captioner": self.name}

    def __call__(self, images: Sequence[Image.Image], keys: Sequence[str]) -> list[str | None]:
        raise NotImplementedError


class VisionLanguageCaptioner(Captioner):
    """Any transformers image-to-text model (BLIP-2, IDEFICS, …) behind one interface.

    Args:
        model: a hub name or local folder, loaded with ``AutoModelForImageTextToText``
            and ``AutoProcessor``; or an already built ``(model, processor)`` pair.
        prompt: text prompt for instruction-following models (``None``: plain
            captioning, as BLIP-2's COCO checkpoints are used).
        max_new_tokens: PerCo keeps captions to 32 tokens.
        batch_size: images per ``generate`` call.
        device: default CUDA when available, else the CPU.
        dtype: default bfloat16 on CUDA, float32 on the CPU.
    """

    def __init__(
        self,
        model: str | os.PathLike | tuple = DEFAULT_BLIP2,
        *,
        prompt: str | None = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.source = model if isinstance(model, tuple) else str(model)
        self.name = "custom" if isinstance(model, tuple) else str(model)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self._loaded: tuple | None = None

    @property
    def settings(self) -> dict:
        return {
            "captioner": self.name,
            "prompt": self.prompt,
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": False,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def _load(self) -> tuple:
        if self._loaded is None:
            if isinstance(self.source, tuple):
                model, processor = self.source
            else:
                model, processor = self._from_pretrained(self.source)
            self._loaded = (model.to(self.device, self.dtype).eval(), processor)
        return self._loaded

    def _from_pretrained(self, name: str) -> tuple:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return AutoModelForImageTextToText.from_pretrained(name), AutoProcessor.from_pretrained(
            name
        )

    def _prompt_text(self, processor) -> str:
        """The prompt in the model's chat format (image placeholder included) when the
        processor has a chat template (IDEFICS2, LLaVA, ...), else as given."""
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": self.prompt}]
            return processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        return self.prompt

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], keys: Sequence[str]) -> list[str | None]:
        model, processor = self._load()
        out: list[str | None] = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            kwargs = {"images": batch, "return_tensors": "pt"}
            if self.prompt is not None:
                kwargs["text"] = [self._prompt_text(processor)] * len(batch)
            inputs = processor(**kwargs).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            generated = model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams,
                do_sample=False,
            )
            if "input_ids" in inputs and generated.shape[1] > inputs["input_ids"].shape[1]:
                generated = generated[:, inputs["input_ids"].shape[1] :]  # the prompt echoed
            out += [t.strip() for t in processor.batch_decode(generated, skip_special_tokens=True)]
        return out


class Blip2Captioner(VisionLanguageCaptioner):
    """BLIP-2 (Li et al. 2023) through ``Blip2ForConditionalGeneration``; PerCo's captioner."""

    def __init__(self, model: str | os.PathLike | tuple = DEFAULT_BLIP2, **kwargs):
        super().__init__(model, **kwargs)

    def _from_pretrained(self, name: str) -> tuple:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        return Blip2ForConditionalGeneration.from_pretrained(name), Blip2Processor.from_pretrained(
            name
        )


class FileCaptions(Captioner):
    """User-provided captions: JSON ``{name or stem: caption}``, JSONL or TSV (see
    :func:`perco.io.read_captions`); images without one get ``None``."""

    needs_images = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self.captions = read_captions(self.path)

    def __call__(self, images, keys: Sequence[str]) -> list[str | None]:
        return [self.captions.get(k, self.captions.get(Path(k).stem)) for k in keys]


class GroundTruthCaptions(Captioner):
    """COCO ground truth: the ``index``-th caption of each image from a prepared folder's
    ``captions.json`` (``{stem: [captions]}``, :mod:`perco.data.coco`)."""

    needs_images = False

    def __init__(self, path: str | os.PathLike, index: int = 0):
        self.name = f"ground-truth:{path}#{index}"
        self.captions = json.loads(Path(path).read_text(encoding="utf-8"))
        self.index = index

    def __call__(self, images, keys: Sequence[str]) -> list[str | None]:
        out = []
        for k in keys:
            caps = self.captions.get(k, self.captions.get(Path(k).stem, []))
            out.append(caps[self.index] if len(caps) > self.index else None)
        return out


class NoCaptions(Captioner):
    """No global context: the null text (PerCo's "w/ only spatial encoding" ablation)."""

    name, needs_images = "none", False

    def __call__(self, images, keys: Sequence[str]) -> list[str | None]:
        return [None] * len(keys)


def load_captioner(spec: str = "blip2", **kwargs) -> Captioner:
    """A captioner from a short spec.

    ``"blip2"`` (PerCo (SD)'s ``Salesforce/blip2-opt-2.7b-coco``), ``"blip2:<name>"``
    (another BLIP-2 checkpoint or folder), ``"vlm:<name>"`` (any image-to-text model, e.g.
    IDEFICS, with ``prompt=``), ``"file:<path>"``, ``"ground-truth:<captions.json>"``,
    ``"none"``. ``kwargs`` go to the model captioners.
    """
    kind, _, arg = spec.partition(":")
    if kind == "blip2":
        return Blip2Captioner(arg or DEFAULT_BLIP2, **kwargs)
    if kind == "vlm" and arg:
        return VisionLanguageCaptioner(arg, **kwargs)
    if kind == "file" and arg:
        return FileCaptions(arg)
    if kind == "ground-truth" and arg:
        return GroundTruthCaptions(arg)
    if spec == "none":
        return NoCaptions()
    raise ValueError(
        f"unknown captioner {spec!r}: use blip2[:name], vlm:name, file:path, "
        "ground-truth:captions.json or none"
    )
