"""``perco-eval``: the Hydra entry point (``configs/eval.yaml``) and backbone loading.

    perco-eval checkpoint=runs/tiny_taef2 rate=r0.0019 dataset=kodak metrics=offline
    perco-eval preset=tiny_taef2        # the small model's three rungs: one table
    accelerate launch --multi_gpu --num_processes 8 -m perco.eval \
        checkpoint=runs/paper rate=r0.0019 dataset=coco30k protocol=paper
    perco-eval -m checkpoint=runs/paper 'rate=glob(*)' dataset=coco30k  # one job per rung
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from ..metrics import LPIPSDistance
from .codecs import CodecUnavailable
from .settings import Backbones, EvalSettings

__all__ = ["BackboneUnavailable", "load_backbones", "settings_from_config", "run", "main"]


class BackboneUnavailable(RuntimeError):
    """A metric's pretrained network could not be loaded (said in one line)."""


def _backbone(what: str, load):
    try:
        return load()
    except Exception as e:  # offline, missing file, unknown name: one line, not a traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BackboneUnavailable(
            f"cannot load the {what} ({type(e).__name__}: {reason[:200]}); without network "
            "access use metrics=offline (the assets' LPIPS and AlexNet weights)"
        ) from e


def load_backbones(cfg, device) -> Backbones:
    """Backbones from a ``metrics`` config (see configs/metrics/)."""
    from ..metrics.fid_kid import load_extractor

    lpips = _backbone(
        f"LPIPS {cfg.lpips.net} backbone", lambda: LPIPSDistance(cfg.lpips.net, cfg.lpips.backbone)
    )
    features = None
    if cfg.get("features"):
        features = _backbone(
            f"FID feature network ({cfg.features.name})",
            lambda: load_extractor(cfg.features.name, cfg.features.get("weights")),
        )
    clip = segmenter = None
    if cfg.get("clip"):
        from ..metrics.clip_score import ClipScorer

        clip = _backbone(
            f"CLIP model {cfg.clip.model}/{cfg.clip.pretrained}",
            lambda: ClipScorer.from_pretrained(cfg.clip.model, cfg.clip.pretrained),
        )
    if cfg.get("segmenter"):
        from ..metrics.miou import Segmenter

        segmenter = _backbone(
            f"segmenter {cfg.segmenter}", lambda: Segmenter.from_pretrained(cfg.segmenter)
        )
    dists = None
    if cfg.get("dists"):
        from ..metrics.dists import DISTS

        dists = _backbone("DISTS VGG16 backbone", lambda: DISTS(cfg.dists.get("backbone")))
    lpips_vgg = None
    if cfg.get("lpips_vgg"):
        lpips_vgg = _backbone(
            "LPIPS vgg backbone", lambda: LPIPSDistance("vgg", cfg.lpips_vgg.get("backbone"))
        )
    backbones = Backbones(lpips, features, clip, segmenter, dists, lpips_vgg)
    for module in (lpips, features, clip, segmenter, dists, lpips_vgg):
        if module is not None:
            module.to(device)
    return backbones


def settings_from_config(cfg) -> EvalSettings:
    """:class:`EvalSettings` from a resolved ``perco-eval`` config."""
    e = cfg.eval
    return EvalSettings(
        samples=e.samples,
        steps=list(e.steps),
        guidance=e.guidance,
        guidance_scale=e.guidance_scale,
        timestep_spacing=e.get("timestep_spacing"),
        captions=str(e.captions),
        captioner=str(e.get("captioner", "blip2")),
        caption_codec=e.get("caption_codec"),
        seed=e.seed,
        ceiling=e.ceiling,
        jpeg=list(e.get("jpeg") or []),
        control=bool(e.get("control", False)),
        references=list(e.get("references") or []),
        reference_bpp=None if e.get("reference_bpp") is None else list(e.reference_bpp),
        bd_anchor=e.get("bd_anchor"),
        batch_size=e.batch_size,
        fid_variant=cfg.dataset.fid_variant,
        patch_size=cfg.metrics.patch_size,
        kid_subset_size=cfg.metrics.kid_subset_size,
        save_reconstructions=e.save_reconstructions,
        grid_images=e.grid_images,
    )


def run(cfg) -> dict | None:
    """Everything ``perco-eval`` does, from a resolved config."""
    from accelerate import PartialState

    from ..data.eval_sets import load_eval_set
    from ..models.loading import load_model, load_models
    from .family import evaluate_family
    from .runner import evaluate

    for module in cfg.get("imports") or []:  # e.g. perco.eval.register(...) calls
        importlib.import_module(module)
    state = PartialState()
    device = torch.device(cfg.device) if cfg.device else state.device
    ds = cfg.dataset
    data = load_eval_set(
        ds.kind, ds.root, name=ds.name, captions=ds.captions, transform=ds.transform,
        size=ds.size, limit=cfg.eval.limit,
    )  # fmt: skip
    rate = cfg.rate.name if cfg.get("rate") else None
    rates = list(cfg.get("rates") or [])
    if rate and rates:
        raise ValueError(f"give rate={rate} or rates={rates}, not both")
    settings = settings_from_config(cfg)
    backbones = load_backbones(cfg.metrics, device)
    compare = {Path(str(folder)).name: str(folder) for folder in cfg.get("compare") or []}
    if compare and not rates:
        raise ValueError("compare=[...] adds rows to the table of several rungs: give rates=[...]")
    if cfg.name in compare or len(compare) < len(cfg.get("compare") or []):
        raise ValueError(
            f"compare={list(cfg.compare)}: each folder's name labels its rows, so the names "
            f"must differ from each other and from name={cfg.name}"
        )
    if rates:
        models = {r: m.to(device) for r, m in load_models(str(cfg.checkpoint), rates).items()}
        others = {label: {r: m.to(device) for r, m in load_models(folder, rates).items()}
                  for label, folder in compare.items()}  # fmt: skip
        repeats = int(cfg.eval.get("timing_repeats") or 0)
        return evaluate_family(models, data, settings, backbones, cfg.output_dir, cfg.name,
                               repeats, others)  # fmt: skip
    model = load_model(str(cfg.checkpoint), rate).to(device)
    out = Path(cfg.output_dir) / model.rate.name
    return evaluate(model, data, settings, backbones, out, name=cfg.name)


def main() -> None:
    import hydra

    from .. import CONFIG_DIR

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
    def _main(cfg) -> None:
        try:
            run(cfg)
        except (FileNotFoundError, ValueError, KeyError, BackboneUnavailable,
                CodecUnavailable) as e:  # fmt: skip
            print(f"perco-eval: error: {e}", file=sys.stderr)
            sys.exit(1)

    _main()
