"""One way to name a model everywhere: :func:`load_model`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..fingerprint import fingerprint
from .perco import PerCo
from .serialization import CONFIG_NAME

__all__ = ["load_model", "load_models", "model_folder", "SHAREABLE", "TINY"]

TINY = "tiny"


def load_model(spec: str, rate: str | None = None) -> PerCo:
    """A PerCo in eval mode from ``spec``: a saved model folder, a training run or sweep
    folder holding it in ``model/``, ``<rate>/`` or ``<rate>/model/`` (the layout
    ``perco-train`` writes), a hub id, or ``"tiny"`` (the random test-size model of
    :mod:`perco.testing`, for trying the codec offline). ``rate`` picks the rung of a
    sweep folder and is checked against the model's."""
    if spec == TINY:
        from ..testing import tiny_perco

        return tiny_perco(rate or "r0.0019").eval()
    path = Path(spec)
    if path.is_dir():
        path = model_folder(spec, rate)
    else:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec))
        except Exception as e:  # offline, unknown repo, ...: one line, not a traceback
            raise FileNotFoundError(f"cannot fetch model {spec!r}: {type(e).__name__}") from e
    model = PerCo.from_pretrained(path).eval()
    if rate and model.rate.name != rate:
        raise ValueError(f"model {spec} is at {model.rate.name}, not {rate}")
    return model


# the parts several rungs may hold alike: a sweep's frozen autoencoder and text encoder,
# a multi-rate student's denoiser (held under its backbone's name)
SHAREABLE = ("denoiser", "autoencoder", "text_encoder")


def load_models(spec: str, rates: Sequence[str]) -> dict[str, PerCo]:
    """:func:`load_model` at each of ``rates``, the rungs sharing one module for each part
    of :data:`SHAREABLE` whose weights are the same in several: serving a sweep then
    holds its frozen autoencoder and text encoder once, and a multi-rate student
    (:class:`perco.train.objectives.MultiRateStudentObjective`) its denoiser too."""
    models, held = {}, {}
    for rate in rates:
        model = load_model(spec, rate)
        for name in SHAREABLE:
            attribute = model.backbone.attribute if name == "denoiser" else name
            part = getattr(model, attribute)
            key = (attribute, fingerprint({attribute: part}, {}))
            setattr(model, attribute, held.setdefault(key, part))
        models[rate] = model
    return models


def model_folder(spec: str, rate: str | None = None) -> Path:
    """The saved model folder a local ``spec`` names (see :func:`load_model`)."""
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"{spec} is not a folder")
    candidates = [path, path / "model"]
    if rate:
        candidates += [path / rate, path / rate / "model"]
    found = next((c for c in candidates if (c / CONFIG_NAME).is_file()), None)
    if found is None:
        where = ", ".join(str(c.relative_to(path)) for c in candidates)
        raise FileNotFoundError(f"{spec}: no {CONFIG_NAME} in {where}")
    return found
