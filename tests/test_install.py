"""The install most users take: a wheel in a fresh virtual environment, used from an
empty folder outside the repository (no source tree, no editable install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = shutil.ignore_patterns(
    ".git", ".venv", "venv", "runs", "outputs", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", ".ruff_cache", ".hypothesis",
)  # fmt: skip


def _run(cmd, cwd, env, timeout=600):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with perco installed from a freshly built wheel; returns its ``bin`` folder.

    The wheel is built from a copy of the source tree (an in-place build could pick up
    stale files from ``build/``). Its dependencies come from this environment through a
    path entry, which adds their folder to ``sys.path`` without running its ``.pth``
    files, so the editable install of perco there stays invisible.
    """
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SHIPPED)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "dist"), str(source)], tmp, env)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("perco-*.whl")
    shutil.rmtree(source)

    target = tmp / "venv"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    site = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    ).strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp, env)
    where = _run([python, "-c", "import perco; print(perco.__file__)"], tmp, env).stdout
    assert where.strip().startswith(site), f"perco imported from {where.strip()}, not the wheel"
    return target / "bin"


@pytest.mark.slow
def test_wheel_install_trains_and_evaluates_from_an_empty_folder(installed, assets, tmp_path):
    from perco.io import save_image

    photos = tmp_path / "photos"
    import torch

    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_image(torch.rand(3, 72, 80, generator=g), photos / f"img{i}.png")
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "PERCO_ASSETS": str(assets.resolve()), "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)
    tiny = ["trainer.batch_size=2", "trainer.val_every=100", "trainer.val_images=1",
            "trainer.val_pairs=2", "trainer.sample_steps=1", "trainer.tensorboard=false",
            "data.crop_size=64", f"data.root={photos}"]  # fmt: skip
    _run([installed / "perco-train", "experiment=tiny", "trainer.max_steps=2", *tiny], work, env)
    model = work / "runs" / "tiny" / "r0.0059" / "model"
    assert (model / "perco.json").is_file()

    done = _run(
        [installed / "perco-eval", f"checkpoint={model}", "dataset=folder",
         f"dataset.root={photos}", "metrics=offline", "metrics.patch_size=64", "eval.steps=[1]",
         "name=wheel"],
        work, env,
    )  # fmt: skip
    results = work / "runs" / "eval" / "folder" / "wheel" / "r0.0059" / "results.json"
    assert results.is_file() and '"images": 3' in results.read_text(), done.stdout[-2000:]

    # a user's own config folder on top of the shipped ones (Hydra's search path)
    mine = work / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\n\ntrainer:\n  run_name: mine\n"
    )
    _run([installed / "perco-train", "hydra.searchpath=[file://my_configs]",
          "experiment=mine", "trainer.max_steps=1", *tiny], work, env)  # fmt: skip
    assert (work / "runs" / "mine" / "r0.0059" / "model" / "perco.json").is_file()
