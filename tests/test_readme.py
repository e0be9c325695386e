"""The README's shell blocks, run as a user would (slow).

Each ```bash block of README.md is preceded by ``<!-- readme-test: KIND -->``:

- ``cpu``: every command is run, in README order, in a scratch folder laid out like a
  clone (``scripts/`` and ``../shared/assets`` beside it), shrunk to a few seconds of work:
  ``perco-train`` gets ``trainer.max_steps=2`` (and, for the small TAEF2 model, two
  training photos instead of 300), ``perco-eval`` ``eval.limit=2``, the bench scripts
  ``--limit`` (see :func:`shrink`). A block can only use what an earlier block made, so
  an example can never point at a folder the main job does not create.
- ``gpu``: checked, not run: Hydra commands compose (one job of a sweep), other commands accept
  their options (each ``--option`` appears in ``--help``); the third-party tools of
  :data:`EXTERNAL` (a download client) are left to their own documentation.
- ``install``: package installs, which ``.ci/run`` itself performs as the README says.

Commands of the SPRDiff-style model need the ``sprdiff`` extra (CompressAI pins
numpy<2, so the default environment goes without it): without it they are left out of
the run in order, and :func:`test_the_sprdiff_commands_run` (``-m sprdiff``) runs them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ASSETS, HAS_COMPRESSAI, NEEDS_COMPRESSAI, ROOT
from hydra import compose, initialize_config_dir

from perco import CONFIG_DIR

BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```bash\n(.*?)```", re.S)
BIN = Path(sys.executable).parent
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install", "python -m pytest")
HYDRA = {"perco-train": "perco.train.cli", "perco-eval": "perco.eval"}
EXTERNAL = {"gdown"}  # not perco's and not installed here: Google Drive downloads
SLURM = importlib.util.find_spec("hydra_plugins") is not None and (
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
)


def blocks(kind: str) -> list[list[list[str]]]:
    """The commands of each README block of ``kind``: argument lists, ``&&`` chains split."""
    text = (ROOT / "README.md").read_text()
    out = []
    for found_kind, body in BLOCK.findall(text):
        if found_kind != kind:
            continue
        commands = []
        for line in body.replace("\\\n", " ").splitlines():
            for part in line.split(" && "):
                argv = shlex.split(part, comments=True)
                if argv and not any(part.strip().startswith(s) for s in SETUP):
                    commands.append(argv)
        out.append(commands)
    return out


def test_every_shell_block_is_marked():
    text = (ROOT / "README.md").read_text()
    assert text.count("```bash") == len(BLOCK.findall(text)) > 0
    assert {kind for kind, _ in BLOCK.findall(text)} == {"cpu", "gpu", "install"}


def shrink(argv: list[str], photos: Path, tmp: Path) -> list[str]:
    """The same command with a few seconds of work (what a user can do to try it)."""
    name = argv[0]
    if name == "perco-train":
        argv = [*argv, "trainer.max_steps=2", "trainer.val_every=1", "trainer.log_every=1"]
        if any("tiny_taef2" in a for a in argv):  # two photos, not BSDS500's 300
            argv += [f"model.folders=[{photos}]", "trainer.batch_size=2",
                     f"model.latent_cache={tmp / 'taef2_latents.safetensors'}"]  # fmt: skip
        if any("tiny_taef2_image" in a for a in argv):  # k-means of 16 entries, not 1024
            argv += ["trainer.codebook_fit_samples=64", "model.image_quantizer.codebook_size=16"]
        return argv
    if name == "perco-eval":
        return [*argv, "eval.limit=2", "eval.timing_repeats=1"]
    if argv[:2] == ["perco", "fit-prior"]:  # the two photos, a few steps
        i, j = argv.index("--images"), argv.index("--latent-cache")
        argv = [*argv[: i + 1], str(photos), *argv[j:]]
        argv[argv.index("--latent-cache") + 1] = str(tmp / "taef2_latents.safetensors")
        return [*argv, "--steps", "3"]
    if argv[:2] == ["python", "scripts/bench_entropy.py"]:
        return [*argv, "--train-folders", str(photos), "--latent-cache",
                str(tmp / "taef2_latents.safetensors"), "--kodak-images", "2", "--test-images", "2",
                "--repeats", "1",
                "--keeps", "1", "0.5", "--hybrid-images", "1"]  # fmt: skip
    if argv[:2] == ["python", "scripts/bench_variants.py"]:
        argv = [*(a if a != "8" else "1" for a in argv)]
        return argv if HAS_COMPRESSAI else [*argv, "--models", "PerCo", "PerCo-Image"]
    return argv


def needs_compressai(argv: list[str]) -> bool:
    return any("sprdiff" in a for a in argv)


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which(argv[0], path=str(BIN)) or argv[0]
    if argv[0] == "python":
        exe = sys.executable
    env = {**os.environ, "PERCO_ASSETS": str(ASSETS.resolve()), "OMP_NUM_THREADS": "2"}
    return subprocess.run([exe, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip


def scratch_clone(tmp_path: Path, assets: Path) -> tuple[Path, Path]:
    """A folder laid out like a clone (``scripts/``, ``../shared/assets`` beside it) and
    two BSDS500 training photos, the shrunk main job's training set."""
    work = tmp_path / "clone"
    work.mkdir()
    (work / "scripts").symlink_to(ROOT / "scripts")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "assets").symlink_to(assets.resolve())
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted((assets / "bsds500" / "train").glob("*.jpg"))[:2]:
        (photos / p.name).symlink_to(p.resolve())
    return work, photos


@pytest.mark.slow
def test_the_cpu_blocks_run_in_order(assets, tmp_path):
    work, photos = scratch_clone(tmp_path, assets)
    seconds = {}
    for block in blocks("cpu"):
        for argv in block:
            if needs_compressai(argv) and not HAS_COMPRESSAI:
                print(f"left out ({NEEDS_COMPRESSAI}): {shlex.join(argv)}")
                continue
            command = shrink(argv, photos, tmp_path)
            start = time.perf_counter()
            done = run(command, work)
            assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr[-3000:]}"
            seconds[shlex.join(argv)] = time.perf_counter() - start
    for command, s in seconds.items():  # shown with -rP
        print(f"{s:6.1f} s  {command}")
    assert (work / "outputs" / "recon" / "kodim23.png").is_file()
    assert (work / "runs" / "eval" / "kodak" / "tiny_taef2" / "grid.png").is_file()
    assert (work / "outputs" / "kodak.png").is_file()


def _hydra_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, overrides) of a perco-train / perco-eval command, however launched."""
    if argv[0] in HYDRA:
        return HYDRA[argv[0]], argv[1:]
    for module in HYDRA.values():
        if module in argv:
            return module, argv[argv.index(module) + 1 :]
    return None


def _one_job(overrides: list[str]) -> list[str]:
    """A sweep's first job: ``-m`` dropped, ``rate=glob(*)`` and ``k=a,b`` take one value."""
    out = []
    for o in overrides:
        if o in ("-m", "--multirun"):
            continue
        key, _, value = o.partition("=")
        if value.startswith("glob("):
            value = "r0.0019"
        elif "," in value and not value.startswith(("[", "{", "'")):
            value = value.split(",")[0]
        out.append(f"{key}={value}" if _ else o)
    return out


@pytest.mark.slow
@pytest.mark.sprdiff
def test_the_sprdiff_commands_run(assets, tmp_path):
    """The README's SPRDiff-style commands, shrunk, after the main job's training they
    build on: run in the step of CI that installs the ``sprdiff`` extra."""
    pytest.importorskip("compressai", reason=NEEDS_COMPRESSAI)
    work, photos = scratch_clone(tmp_path, assets)
    commands = [c for b in blocks("cpu") for c in b]
    main_job = next(c for c in commands if c[:3] == ["perco-train", "-m", "experiment=tiny_taef2"])
    sprdiff = [c for c in commands if needs_compressai(c)]
    assert sprdiff, "the README has no SPRDiff-style command"
    sprdiff += [c for c in commands if c[:2] == ["python", "scripts/bench_variants.py"]]
    for argv in [main_job, *sprdiff]:
        command = shrink(argv, photos, tmp_path)
        if command[:2] == ["python", "scripts/bench_variants.py"]:
            command += ["--models", "PerCo", "SPRDiff-style"]
        done = run(command, work)
        assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_the_gpu_blocks_compose_and_parse():
    checked = 0
    for block in blocks("gpu"):
        for argv in block:
            hydra = _hydra_args(argv)
            if hydra is not None:
                module, overrides = hydra
                if any("hydra/launcher=slurm" in o for o in overrides) and not SLURM:
                    continue  # needs perco[slurm]; test_slurm_launcher_config_composes
                name = {"perco.train.cli": "train", "perco.eval": "eval"}[module]
                with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
                    compose(name, overrides=_one_job(overrides), return_hydra_config=True)
            elif argv[0] in EXTERNAL:
                continue
            else:
                exe = argv[0] if argv[0] != "python" else argv[1]
                prefix = [sys.executable, str(ROOT / exe)] if exe.endswith(".py") else [
                    shutil.which(exe, path=str(BIN)),
                    *([argv[1]] if exe == "perco" else []),
                ]  # fmt: skip
                assert prefix[-1], f"{exe} is not installed"
                done = subprocess.run([*prefix, "--help"], capture_output=True, text=True,
                                      timeout=300)  # fmt: skip
                assert done.returncode == 0, f"{exe} --help\n{done.stderr[-2000:]}"
                for option in (a.split("=")[0] for a in argv if a.startswith("--")):
                    assert option in done.stdout, f"{shlex.join(argv)}: {option} unknown"
            checked += 1
    assert checked >= 15
