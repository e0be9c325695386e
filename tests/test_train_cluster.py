"""The cluster paths in miniature: 2 gloo processes on shards, atomic checkpoints,
preemption signals. The multi-process tests are slow (each well under 2 minutes)."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import entry_point
from test_shards import SIZES, write_unequal_shards
from test_train import (
    _weights,
    compose_train,
    multi_rate_overrides,
    tiny_overrides,
    tiny_sweep,
    trained_module,
)

from perco.train import CheckpointError, checkpoint_status, train
from perco.train.checkpoints import Failpoint

RATE = "r0.0059"
STEPS_PER_EPOCH = sum(SIZES) // (2 * 2)  # 2 ranks x batch 2: every sample once per epoch
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def shard_overrides(shards, out, *extra):
    data = ["data=openimages", f"data.urls='{shards}'", "data.shuffle=4", "data.crop_size=64"]
    return tiny_overrides(
        None, out, "trainer.num_workers=2", "trainer.log_keys=true", *extra, data=data
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_unequal_shards(tmp_path_factory.mktemp("shards"))


def run_dir(out):
    return out / "tiny" / RATE


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args]


def run(cmd, timeout=300):
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def assert_each_key_once_per_epoch(run, epochs):
    per_epoch = collections.defaultdict(list)
    ranks = sorted((run / "keys").glob("rank*.jsonl"))
    assert len(ranks) == 2
    for path in ranks:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            per_epoch[record["epoch"]] += record["keys"]
    assert sorted(per_epoch) == list(range(epochs))
    everything = {f"s{shard}_{i}" for shard, size in enumerate(SIZES) for i in range(size)}
    for keys in per_epoch.values():
        assert collections.Counter(keys) == collections.Counter(everything)


@pytest.mark.slow
def test_two_processes_on_unequal_shards_train_every_key_once_per_epoch(shards, tmp_path):
    steps = 2 * STEPS_PER_EPOCH
    overrides = shard_overrides(shards, tmp_path, f"trainer.max_steps={steps}")
    done = run(torchrun("-m", "perco.train.cli", *overrides))
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == steps
    assert "2 process(es)" in done.stdout + done.stderr
    assert_each_key_once_per_epoch(run_dir(tmp_path), epochs=2)


@pytest.mark.slow
def test_accelerate_launch_as_the_readme_spells_it(shards, tmp_path):
    overrides = shard_overrides(shards, tmp_path, f"trainer.max_steps={STEPS_PER_EPOCH}")
    launch = [
        *("accelerate", "launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
    ]
    launch[0] = entry_point("accelerate")
    run([*launch, "-m", "perco.train.cli", *overrides])
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == STEPS_PER_EPOCH
    assert_each_key_once_per_epoch(run_dir(tmp_path), epochs=1)


@pytest.mark.slow
def test_two_processes_resume_mid_epoch_on_shards_exactly(shards, tmp_path):
    assert STEPS_PER_EPOCH % 4  # the checkpoint at step 4 falls inside an epoch
    last = ("trainer.max_steps=8", "trainer.checkpoint_every=4")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "a", *last)))
    first = ("trainer.max_steps=4", "trainer.checkpoint_every=4")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *first)))
    resume = (*last, "trainer.resume=latest")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *resume)))
    assert_same_weights(run_dir(tmp_path / "a"), run_dir(tmp_path / "b"))
    keys = [(run_dir(tmp_path / d) / "keys" / "rank1.jsonl").read_text() for d in "ab"]
    assert keys[0] == keys[1]  # the resumed rank 1 saw exactly the uninterrupted batches


@pytest.mark.slow
def test_a_transformer_trains_on_two_processes_on_shards_and_resumes_exactly(shards, tmp_path):
    """The FLUX.2 backbone with rectified flow on the cluster path: 2 gloo ranks on shards
    stay in sync, and a run resumed mid-epoch ends with the uninterrupted run's weights."""
    model = ("model=tiny_flux2",)
    last = (*model, "trainer.max_steps=8", "trainer.checkpoint_every=4")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "a", *last)))
    first = (*model, "trainer.max_steps=4", "trainer.checkpoint_every=4")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *first)))
    resume = (*last, "trainer.resume=latest")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *resume)))
    summary = json.loads((run_dir(tmp_path / "b") / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == 8
    assert_same_weights(run_dir(tmp_path / "a"), run_dir(tmp_path / "b"))
    saved = json.loads((run_dir(tmp_path / "a") / "model" / "perco.json").read_text())
    assert saved["backbone"] == "flux2"


@pytest.mark.slow
def test_two_processes_train_a_distilling_dmd_student_on_shards_and_resume_exactly(
    shards, tmp_path, assets
):
    """Stage 2 on 2 processes on shards, paired distillation, DMD and the adversarial term
    together: the critic and the discriminator are DDP-wrapped (their weights agree across
    ranks: the sync check covers the objective's modules), and a resumed run ends where an
    uninterrupted one does, critic and discriminator included."""
    from perco.models.student import one_step_student
    from perco.testing import tiny_perco

    teacher = tiny_perco(RATE).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    one_step_student(teacher).save_pretrained(tmp_path / "student")
    stage2 = ("objective=student", f"init={tmp_path / 'student'}",
              f"objective.teacher={tmp_path / 'teacher'}", "objective.dmd_weight=1.0",
              "objective.distill_weight=1.0", "objective.adversarial_weight=0.1",
              "trainer.sample_steps=null",
              f"objective.lpips_backbone={assets / 'lpips' / 'vgg16_features.safetensors'}",
              "trainer.checkpoint_every=2", "trainer.checkpoint_total_limit=5")  # fmt: skip
    last = (*stage2, "trainer.max_steps=4")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "a", *last)))
    first = (*stage2, "trainer.max_steps=2")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *first)))
    resume = (*last, "trainer.resume=latest")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *resume)))
    for d in "ab":
        summary = json.loads((run_dir(tmp_path / d) / "summary.json").read_text())
        assert summary["ranks_in_sync"] is True and summary["steps"] == 4
    assert_same_weights(run_dir(tmp_path / "a"), run_dir(tmp_path / "b"))
    for prefix in ("conv_in.", "heads."):  # the critic, the discriminator
        ours, theirs = (trained_module(run_dir(tmp_path / d), prefix) for d in "ab")
        assert ours.keys() == theirs.keys() and len(ours) >= 12
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def assert_same_weights(a, b):
    a, b = _weights(a / "model"), _weights(b / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# -- checkpoints cut short ------------------------------------------------------------------
def folder_overrides(photo_folder, out, *extra):
    return compose_train(*tiny_overrides(photo_folder, out, *extra))


@pytest.mark.parametrize("point", ["checkpoint:after-model", "checkpoint:before-marker"])
def test_a_write_cut_short_leaves_the_previous_checkpoint(
    photo_folder, tmp_path, monkeypatch, point
):
    common = ("trainer.checkpoint_every=2", "trainer.checkpoint_total_limit=1")
    whole = train(folder_overrides(photo_folder, tmp_path / "a", *common, "trainer.max_steps=6"))
    b = tmp_path / "b"
    monkeypatch.setenv("PERCO_FAILPOINT", point)
    with pytest.raises(Failpoint):  # the first save (step 2) already fails: nothing survives
        train(folder_overrides(photo_folder, b, *common, "trainer.max_steps=6"))
    assert not (run_dir(b) / "checkpoints" / "checkpoint_0").exists()
    monkeypatch.delenv("PERCO_FAILPOINT")
    train(folder_overrides(photo_folder, b, *common, "trainer.max_steps=2"))
    monkeypatch.setenv("PERCO_FAILPOINT", point)
    with pytest.raises(Failpoint):  # the second save fails, with a limit of one checkpoint
        train(
            folder_overrides(
                photo_folder, b, *common, "trainer.max_steps=6", "trainer.resume=latest"
            )
        )
    checkpoints = run_dir(b) / "checkpoints"
    assert checkpoint_status(checkpoints / "checkpoint_0") is None
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".checkpoint_1.partial",
        "checkpoint_0",
    ]
    monkeypatch.delenv("PERCO_FAILPOINT")
    resumed = train(
        folder_overrides(photo_folder, b, *common, "trainer.max_steps=6", "trainer.resume=latest")
    )
    assert whole["steps"] == resumed["steps"] == 6
    assert_same_weights(run_dir(tmp_path / "a"), run_dir(b))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_2"]


def test_resume_passes_over_an_incomplete_checkpoint_and_says_why(photo_folder, tmp_path, caplog):
    steps = ("trainer.checkpoint_every=2", "trainer.max_steps=4")
    train(folder_overrides(photo_folder, tmp_path, *steps))
    last = run_dir(tmp_path) / "checkpoints" / "checkpoint_1"
    for name in ("optimizer.bin", "train_state.json"):  # what a kill during a write leaves
        (last / name).unlink()
    assert "missing or cut short: optimizer.bin, train_state.json" in checkpoint_status(last)
    with caplog.at_level("INFO", logger="perco.train"):
        summary = train(folder_overrides(photo_folder, tmp_path, *steps, "trainer.resume=latest"))
    assert summary["steps"] == 4
    assert "resume=latest: checkpoint_0 (passed over checkpoint_1: incomplete" in caplog.text
    with pytest.raises(
        CheckpointError, match="cannot resume from .*checkpoint_1: it is incomplete"
    ):
        train(folder_overrides(photo_folder, tmp_path, *steps, f"trainer.resume={last}"))


def test_the_cli_refuses_an_incomplete_checkpoint_in_one_line(photo_folder, tmp_path):
    broken = tmp_path / "checkpoint_5"
    (broken / "perco").mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "perco.train.cli",
        *tiny_overrides(photo_folder, tmp_path / "runs", f"trainer.resume={broken}"),
    ]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("perco-train: error: cannot resume from")
    assert "Traceback" not in done.stderr


# -- preemption -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(overrides, log_dir):
    """Two ranks started the way SLURM's srun starts them: each its own process with the
    torch.distributed variables set, each receiving the scheduler's signal itself."""
    port, procs = _free_port(), []
    for rank in range(2):
        env = {
            **ENV,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        out = open(log_dir / f"rank{rank}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "perco.train.cli", *overrides]
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


@pytest.mark.slow
def test_sigterm_checkpoints_both_ranks_and_the_requeued_run_is_exact(photo_folder, tmp_path):
    steps = ("trainer.max_steps=12", "trainer.checkpoint_every=100", "trainer.log_every=1")
    procs = launch_ranks(tiny_overrides(photo_folder, tmp_path / "b", *steps), tmp_path)
    log0 = tmp_path / "rank0.log"
    deadline = time.monotonic() + 180
    while "step 2: train/loss" not in log0.read_text():
        assert time.monotonic() < deadline and procs[0].poll() is None, log0.read_text()[-3000:]
        time.sleep(0.2)
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=180) for proc in procs]
    text = log0.read_text()
    assert codes == [75, 75], text[-3000:]
    assert "SIGTERM: stopping after step" in text and "trainer.resume=latest" in text
    checkpoints = list((run_dir(tmp_path / "b") / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and checkpoint_status(checkpoints[0]) is None
    stopped = json.loads((checkpoints[0] / "train_state.json").read_text())["step"]
    assert 2 <= stopped < 12

    run(torchrun("-m", "perco.train.cli", *tiny_overrides(photo_folder, tmp_path / "a", *steps)))
    requeued = [*tiny_overrides(photo_folder, tmp_path / "b", *steps), "trainer.resume=latest"]
    run(torchrun("-m", "perco.train.cli", *requeued))
    assert_same_weights(run_dir(tmp_path / "a"), run_dir(tmp_path / "b"))


def test_fewer_samples_than_one_batch_is_refused_not_an_endless_loop(photo_folder, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 8 per process"):
        train(folder_overrides(photo_folder, tmp_path, "trainer.batch_size=8"))


@pytest.mark.slow
def test_a_student_trains_on_two_processes_on_shards_and_resumes_mid_epoch_exactly(
    shards, tmp_path, assets
):
    """objective=student as the PerCo loss runs: 2 gloo processes on shards (only the
    U-Net goes through DDP), ranks in sync at the end, and a run resumed mid-epoch ends
    with the uninterrupted run's weights."""
    from perco.testing import tiny_perco

    tiny_perco(RATE).save_pretrained(tmp_path / "teacher")
    backbone = assets / "lpips" / "vgg16_features.safetensors"
    student = ("objective=student", f"init={tmp_path / 'teacher'}", "trainer.sample_steps=null",
               f"objective.lpips_backbone={backbone}")  # fmt: skip
    last = (*student, "trainer.max_steps=8", "trainer.checkpoint_every=4")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "a", *last)))
    summary = json.loads((run_dir(tmp_path / "a") / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == 8
    first = (*student, "trainer.max_steps=4", "trainer.checkpoint_every=4")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *first)))
    resume = (*last, "trainer.resume=latest")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *resume)))
    assert_same_weights(run_dir(tmp_path / "a"), run_dir(tmp_path / "b"))
    teacher = _weights(tmp_path / "teacher")
    trained = _weights(run_dir(tmp_path / "a") / "model")
    assert any(not torch.equal(trained[k], teacher[k]) for k in teacher if k.startswith("unet"))
    assert all(torch.equal(trained[k], teacher[k]) for k in teacher
               if k.startswith(("hyper_encoder", "quantizer")))  # fmt: skip


@pytest.mark.slow
def test_a_multi_rate_student_trains_on_two_processes_on_shards_and_resumes_exactly(
    shards, tmp_path, assets
):
    """MultiRateStudentObjective as users run it: 2 gloo processes on shards, paired
    distillation and the discriminator on, the rungs stacked in each DDP call of the one
    U-Net. Ranks end in sync, and a run resumed mid-epoch writes every rung's student as
    the uninterrupted run does: the other rungs' students hold the resumed shared U-Net."""
    sweep = tmp_path / "sweep"
    tiny_sweep(sweep, ["r0.0019", RATE])
    student = (*multi_rate_overrides(sweep, assets), "trainer.checkpoint_every=2")
    last = (*student, "trainer.max_steps=4")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "a", *last)))
    summary = json.loads((run_dir(tmp_path / "a") / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["steps"] == 4
    first = (*student, "trainer.max_steps=2")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *first)))
    resume = (*last, "trainer.resume=latest")
    run(torchrun("-m", "perco.train.cli", *shard_overrides(shards, tmp_path / "b", *resume)))
    for rung in (RATE, "r0.0019"):
        a, b = (tmp_path / d / "tiny" / rung for d in "ab")
        assert_same_weights(a, b)
    ours, other = (_weights(tmp_path / "a" / "tiny" / r / "model") for r in (RATE, "r0.0019"))
    assert all(torch.equal(ours[k], other[k]) for k in ours if k.startswith("unet"))
    heads = [trained_module(run_dir(tmp_path / d), "heads.") for d in "ab"]  # discriminator
    assert heads[0].keys() == heads[1].keys() and heads[0]
    for key in heads[0]:
        torch.testing.assert_close(heads[0][key], heads[1][key], rtol=1e-5, atol=1e-6)
