"""mIoU of a semantic segmenter's predictions on reconstructions vs. ground-truth label maps.

The paper uses ViT-Adapter, which transformers does not provide; any transformers
segmenter whose image processor has ``post_process_semantic_segmentation`` (SegFormer,
MaskFormer, Mask2Former, ...) can be used here, so the numbers are **not comparable**
with the paper's. Predictions are mapped to the label maps' classes by class name;
pixels labelled 255 are ignored.

Each image contributes integer intersection and union counts per class; the dataset
mIoU is the mean over classes of ΣI / ΣU, which is exact whatever the order or sharding
of the images.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Segmenter", "intersections_unions", "mean_iou", "IGNORE", "DEFAULT_SEGMENTER"]

IGNORE = 255
DEFAULT_SEGMENTER = "facebook/mask2former-swin-large-coco-panoptic"


def _norm(name: str) -> str:
    return name.lower().replace("-merged", "").replace("-other", "").replace("_", " ").strip()


class Segmenter(nn.Module):
    """A transformers segmentation model and its image processor."""

    def __init__(self, model: nn.Module, processor, name: str = "custom"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.labels = {int(k): v for k, v in model.config.id2label.items()}

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_SEGMENTER) -> Segmenter:
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModelForSemanticSegmentation,
            AutoModelForUniversalSegmentation,
        )

        config = AutoConfig.from_pretrained(name)
        universal = config.model_type in ("maskformer", "mask2former", "oneformer")
        auto = AutoModelForUniversalSegmentation if universal else AutoModelForSemanticSegmentation
        return cls(auto.from_pretrained(name), AutoImageProcessor.from_pretrained(name), name)

    def class_map(self, names: dict[int, str]) -> torch.Tensor:
        """Lookup from the model's class ids to the label maps' ids (-1 where none)."""
        by_name = {_norm(n): i for i, n in names.items()}
        table = torch.full((max(self.labels) + 1,), -1, dtype=torch.long)
        for i, name in self.labels.items():
            table[i] = by_name.get(_norm(name), -1)
        return table

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` → ``(B, H, W)`` class ids of the model."""
        arrays = [(img.permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy() for img in images]
        inputs = self.processor(images=arrays, return_tensors="pt").to(images.device)
        outputs = self.model(**inputs)
        sizes = [tuple(images.shape[-2:])] * len(images)
        maps = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        return torch.stack(maps)


def intersections_unions(pred: torch.Tensor, target: torch.Tensor) -> dict[int, list[int]]:
    """Per class of ``target`` or ``pred`` (ignoring ``IGNORE`` pixels): ``[I, U]``."""
    keep = target != IGNORE
    pred, target = pred[keep], target[keep]
    out = {}
    for c in torch.unique(torch.cat([target, pred[pred >= 0]])).tolist():
        p, t = pred == c, target == c
        out[int(c)] = [int((p & t).sum()), int((p | t).sum())]
    return out


def mean_iou(counts: list[dict[int, list[int]]]) -> float:
    """Dataset mIoU from per-image counts: mean over classes of ΣI / ΣU."""
    totals: dict[int, list[int]] = {}
    for image in counts:
        for c, (i, u) in image.items():
            t = totals.setdefault(int(c), [0, 0])
            t[0] += i
            t[1] += u
    ious = [i / u for i, u in totals.values() if u > 0]
    return sum(ious) / len(ious) if ious else float("nan")
