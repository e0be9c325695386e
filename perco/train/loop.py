"""The PerCo finetuning loop: Accelerate, one model per rate, resumable.

Follows the diffusers training skeleton: frozen modules (autoencoder, text encoder) are
cast to the mixed-precision dtype; the step runs under ``accelerator.accumulate``;
clipping, logging, validation and checkpoints happen when gradients are synchronised.
Checkpoints are ``save_state`` folders (``checkpoints/checkpoint_N``) holding a
``save_pretrained`` PerCo folder and ``train_state.json``, written aside and renamed into
place when complete (:mod:`perco.train.checkpoints`); on a preemption signal the run writes
one and stops (:mod:`perco.train.preemption`). The final model is written to
``<run>/model``. The run folder also gets the resolved ``config.yaml`` and a
``summary.json`` (fixed-set loss at start and end, samples/s, peak memory, trainable
share, whether all ranks ended with identical weights and codebooks).

Options: an EMA of the trained weights (``trainer.ema_decay``; the exported model then
carries the averaged weights, checkpoints keep both), and LPIPS between each image and
the decoding of the U-Net's x0 estimate (``trainer.lpips_weight``; the paper's optional
image-level loss, useful at high rates, where x0 is close to the image), timesteps drawn
from an N-step sampler grid (``trainer.timestep_grid``; the paper trains with 50), and
Min-SNR-γ loss weighting (``trainer.snr_gamma``).

Shard datasets (iterable) are not passed to ``prepare``: accelerate would turn their loader
into a dispatcher that reads every rank's batch on rank 0. They plan each rank's share
themselves (:class:`perco.data.shards.ShardStream`), equal in batches, so ranks stay in
lockstep, and skip to a mid-epoch position when resuming.

What is optimised is an objective the loop is handed (``objective``, see
:mod:`perco.train.objectives`): PerCo's loss by default, or a one-step student's. The
objective says which module goes through ``prepare``: PerCo's whole module (DDP only
reduces gradients of the parameters that require them, the frozen parts carry none, and
``find_unused_parameters`` covers the null text, which a batch without dropped captions
does not use), or a student's U-Net alone.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset

from ..fingerprint import fingerprint
from ..io import atomic_write
from ..models.perco import Capability, PerCo
from .checkpoints import failpoint, next_index, resume_checkpoint, save_checkpoint
from .objectives import PerCoObjective
from .preemption import Preempted, Preemption
from .validation import FixedValidation

__all__ = ["train", "TrainState", "run_dir"]

log = logging.getLogger("perco.train")


@dataclass
class TrainState:
    """Progress saved with every checkpoint (as JSON)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation each epoch, a function of ``(seed, epoch)`` only."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())


def run_dir(cfg: DictConfig) -> Path:
    """``<paths.output_dir>/<trainer.run_name>/<rate>``: the same on every rank."""
    return Path(cfg.paths.output_dir) / cfg.trainer.run_name / cfg.rate.name


def _set_epoch(loader, dataset, epoch: int, skip: int = 0) -> None:
    """Tell the sampler (through the prepared loader) or the dataset which epoch this is;
    shard streams also learn how many of the epoch's batches to skip."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if hasattr(dataset, "skip"):
        dataset.skip(skip)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def trainable_report(model: PerCo) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    unet = sum(p.numel() for p in model.denoiser.parameters())
    unet_trained = sum(p.numel() for p in model.denoiser.parameters() if p.requires_grad)
    return {
        "trainable_params": trained,
        "total_params": total,
        "trainable_share": trained / total,
        "unet_trainable_share": unet_trained / unet,
    }


def make_optimizer(params, tc: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """``trainer.optimizer``: ``adamw`` (torch), or ``adamw8bit`` (bitsandbytes' 8-bit
    AdamW, CUDA only: its two states take 2 bytes a parameter instead of 8, about 5 GB less
    for SD 2.1's full U-Net)."""
    kind = tc.get("optimizer", "adamw")
    options = {"lr": tc.lr, "betas": tuple(tc.betas), "weight_decay": tc.weight_decay}
    if kind == "adamw":
        return torch.optim.AdamW(params, **options)
    if kind != "adamw8bit":
        raise ValueError(f"trainer.optimizer must be adamw or adamw8bit, got {kind!r}")
    if device.type != "cuda":
        raise ValueError(f"trainer.optimizer=adamw8bit needs a CUDA device, not {device}")
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError("trainer.optimizer=adamw8bit needs bitsandbytes: "
                         "pip install 'perco[gpu]'") from None  # fmt: skip
    return bitsandbytes.optim.AdamW8bit(params, **options)


def initial_model(cfg: DictConfig) -> PerCo:
    """The model a run starts from: ``cfg.model`` built fresh, or with ``init=<folder>``
    a saved or imported model (a model folder, or a run or sweep folder at ``cfg.rate``)
    with all its state: weights, quantizer buffers, null text, index prior. Its settings
    are the folder's; ``model=`` is not used."""
    from hydra.utils import instantiate

    if not cfg.get("init"):
        return instantiate(cfg.model, _convert_="all")
    from ..models.loading import load_model

    model = load_model(str(cfg.init), cfg.rate.name)
    log.info("init: %s (model %s), its own settings", cfg.init, model.fingerprint[:2].hex())
    return model.train()


def fit_global_codebooks(model, loader, dataset, tc: DictConfig) -> None:
    """PerCo-Image: k-means of the image embedding's product quantizer on training crops
    (``trainer.codebook_fit_samples`` per rank; epochs numbered apart from training's)."""
    if bool(model.image_quantizer.fitted):
        return

    def batches():
        for epoch in range(10**6, 10**6 + 1000):
            _set_epoch(loader, dataset, epoch)
            yield from loader

    start = time.perf_counter()
    wanted = tc.get("codebook_fit_samples", 16384)
    generator = torch.Generator().manual_seed(tc.seed)
    used = model.fit_global_codebooks(batches(), wanted, generator)
    log.info("fitted the image codebooks on %d embeddings in %.1f s", used,
             time.perf_counter() - start)  # fmt: skip


def train(cfg: DictConfig) -> dict:
    """Train one PerCo model as ``cfg`` says; returns the summary (also in summary.json)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from hydra.utils import instantiate
    from safetensors.torch import load_file, save_file

    if cfg.trainable.mode == "lora":
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from ..data import collate

    tc = cfg.trainer
    out = run_dir(cfg)
    # accelerate runs several CPU processes (gloo) only when told it is on the CPU
    cpu = (not torch.cuda.is_available()) if tc.cpu is None else tc.cpu
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=tc.grad_accum,
        mixed_precision=tc.mixed_precision,
        log_with="tensorboard" if tc.tensorboard else None,
        project_config=ProjectConfiguration(
            project_dir=str(out),
            logging_dir=str(out / "logs"),
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(cfg, resolve=True)
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    set_seed(tc.seed)  # the same initial weights on every rank

    objective = instantiate(cfg.objective) if cfg.get("objective") else PerCoObjective()
    model = objective.model(initial_model(cfg))  # the PerCo this run trains and saves
    options = cfg.trainable.get("options", {})
    trained, params = objective.trainable(model, cfg.trainable.mode, **options)
    shares = trainable_report(model)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    model.to(accelerator.device)
    model.autoencoder.to(dtype=weight_dtype)
    model.text_encoder.to(dtype=weight_dtype)
    if tc.gradient_checkpointing:
        model.denoiser.enable_gradient_checkpointing()

    dataset = instantiate(cfg.data)
    iterable = isinstance(dataset, IterableDataset)
    if iterable:  # an equal share of the shards per rank (and worker), planned per epoch
        rank, world = accelerator.process_index, accelerator.num_processes
        dataset.distribute(rank, world, tc.batch_size, tc.grad_accum)
    sampler = None if iterable else EpochSampler(len(dataset), tc.seed)
    loader = DataLoader(
        dataset,
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=tc.num_workers,
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(tc.seed),  # keeps the global RNG untouched
    )
    optimizer = make_optimizer(params, tc, accelerator.device)
    lr_scheduler = get_scheduler(
        tc.lr_schedule,
        optimizer,
        num_warmup_steps=tc.warmup_steps * accelerator.num_processes,
        num_training_steps=tc.max_steps * accelerator.num_processes,
    )
    validation = FixedValidation.build(cfg) if main else None
    ema = EMAModel(params, decay=tc.ema_decay) if tc.ema_decay else None
    objective.setup(tc, accelerator.device)

    state = TrainState()

    def save(tensors: dict, path: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)

    def save_hook(models, weights, output_dir):
        if main:
            folder = Path(output_dir)
            perco = model  # the PerCo around the prepared module (itself, or its U-Net)
            perco.save_pretrained(folder / "perco")
            (folder / "train_state.json").write_text(json.dumps(asdict(state)))
            failpoint("checkpoint:after-model")
            if perco.has_lora:  # perco/ holds merged weights: keep the adapters apart
                save(get_peft_model_state_dict(perco.denoiser), folder / "lora.safetensors")
            if ema is not None:
                shadow = {str(i): p for i, p in enumerate(ema.shadow_params)}
                save(shadow, folder / "ema.safetensors")
        if weights:  # the model's (prepared first) is saved above as a PerCo folder;
            weights.pop(0)  # an objective's own modules (a critic) stay for accelerate

    def load_hook(models, input_dir):
        folder = Path(input_dir)
        models.pop(0)  # the prepared module (the PerCo, or its U-Net), read from perco/
        target = model
        loaded = PerCo.from_pretrained(folder / "perco").state_dict()
        own = target.state_dict()
        # with LoRA the saved U-Net is merged: its adapted layers appear in `own` only as
        # frozen `base_layer`s (pretrained, unchanged) plus adapters, loaded below
        target.load_state_dict({k: v for k, v in loaded.items() if k in own}, strict=False)
        if target.has_lora:
            set_peft_model_state_dict(target.denoiser, load_file(folder / "lora.safetensors"))
        state.__dict__.update(json.loads((folder / "train_state.json").read_text()))
        if ema is not None:
            shadow = load_file(folder / "ema.safetensors")
            for i, p in enumerate(ema.shadow_params):
                p.copy_(shadow[str(i)])
            ema.optimization_step = state.step

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if iterable:
        trained, optimizer, lr_scheduler = accelerator.prepare(trained, optimizer, lr_scheduler)
    else:
        trained, optimizer, loader, lr_scheduler = accelerator.prepare(
            trained, optimizer, loader, lr_scheduler
        )
        if len(loader) == 0:  # an epoch without a batch would loop forever
            raise ValueError(
                f"the dataset has {len(dataset)} samples: fewer than one batch of "
                f"{tc.batch_size} per process; lower trainer.batch_size"
            )
    objective.prepare(accelerator)  # its own modules after the model: checkpoints hold them
    unwrapped: PerCo = model
    grid = None
    if tc.get("timestep_grid"):
        grid = unwrapped.schedule.grid(tc.timestep_grid)

    checkpoint_index = next_index(out)
    if tc.resume:
        checkpoint = resume_checkpoint(out, str(tc.resume))
        if checkpoint is None:
            log.info("resume=latest: no checkpoint in %s, starting fresh", out)
        else:
            accelerator.load_state(str(checkpoint))
            log.info("resumed from %s at step %d", checkpoint, state.step)
    if unwrapped.capabilities & Capability.GLOBAL_CODEBOOKS:  # unless resumed fitted
        fit_global_codebooks(unwrapped, loader, dataset, tc)

    if tc.tensorboard:
        accelerator.init_trackers("perco")
    if main:
        log.info(
            "training %s at %s: %s of %s parameters trainable (%.1f%%; U-Net %.1f%%), "
            "%d process(es)",
            cfg.trainable.mode,
            unwrapped.rate.name,
            f"{shares['trainable_params']:,}",
            f"{shares['total_params']:,}",
            100 * shares["trainable_share"],
            100 * shares["unet_trainable_share"],
            accelerator.num_processes,
        )
    summary = {"rate": unwrapped.rate.name, "trainable": cfg.trainable.mode, **shares}
    if cfg.get("init"):
        summary["init"] = {"from": str(cfg.init), "fingerprint": unwrapped.fingerprint.hex()}
    if validation is not None:
        with accelerator.autocast():  # the frozen parts are cast to the run's dtype
            summary["fixed_loss_start"] = validation.loss(unwrapped)
        accelerator.log({"val/fixed_loss": summary["fixed_loss_start"]}, step=state.step)
        log.info("step %d: fixed-set loss %.4f", state.step, summary["fixed_loss_start"])

    preemption = None
    if tc.preemption.signals:
        preemption = Preemption(list(tc.preemption.signals), tc.preemption.grace_s)
    keys_log = None
    if tc.get("log_keys"):  # which samples each rank trained on, batch by batch
        (out / "keys").mkdir(parents=True, exist_ok=True)
        keys_log = open(out / "keys" / f"rank{accelerator.process_index}.jsonl", "a")  # noqa: SIM115

    def checkpoint() -> Path:
        nonlocal checkpoint_index
        start = time.perf_counter()
        folder = save_checkpoint(
            accelerator, out, checkpoint_index, state.step, tc.checkpoint_total_limit
        )
        checkpoint_index += 1
        if preemption is not None:
            preemption.check_write_time(time.perf_counter() - start)
        return folder

    skipped = torch.zeros((), device=accelerator.device)
    train_seconds, window_samples, window_start = 0.0, 0, time.perf_counter()
    per_step = tc.batch_size * accelerator.num_processes * tc.grad_accum
    try:
        trained.train()
        while state.step < tc.max_steps:
            epoch_loader = loader
            if state.batch_in_epoch and not iterable:  # shard streams skip by themselves
                epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
            # the prepared loader passes the epoch to the sampler (it would otherwise use its
            # own iteration count, which restarts at 0 on resume) but not to a dataset whose
            # sampler takes it, so the crops' epoch is set here
            _set_epoch(epoch_loader, dataset, state.epoch, state.batch_in_epoch)
            for batch in epoch_loader:
                if iterable:
                    batch = {
                        k: v.to(accelerator.device) if torch.is_tensor(v) else v
                        for k, v in batch.items()
                    }
                state.batch_in_epoch += 1
                skipped += batch["skipped"]
                log.debug("epoch %d batch %d: %s", state.epoch, state.batch_in_epoch, batch["keys"])
                if keys_log is not None:
                    record = {
                        "epoch": state.epoch,
                        "batch": state.batch_in_epoch,
                        "keys": batch["keys"],
                    }
                    keys_log.write(json.dumps(record) + "\n")
                    keys_log.flush()
                if not len(batch["captions"]):
                    continue
                # noise, timesteps and caption drop are a function of (seed, step, micro-batch,
                # rank), so a resumed run draws exactly what an uninterrupted one would
                generator = torch.Generator().manual_seed(
                    hash((tc.seed, state.step, state.batch_in_epoch, accelerator.process_index))
                    % 2**63
                )
                timesteps = None
                if grid is not None:  # t from the sampler's grid (paper: trained with 50 steps)
                    n = len(batch["captions"])
                    timesteps = grid[torch.randint(len(grid), (n,), generator=generator)]
                with accelerator.accumulate(trained):
                    # under the run's autocast as a whole: an objective computes outside the
                    # prepared module too (a student encodes with the bf16 autoencoder)
                    with accelerator.autocast():
                        loss, terms = objective(trained, unwrapped, batch, generator, timesteps)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tc.grad_clip:
                        accelerator.clip_grad_norm_(params, tc.grad_clip)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                if ema is not None:
                    ema.step(params)
                state.step += 1
                state.samples += per_step
                window_samples += per_step
                if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                    elapsed = time.perf_counter() - window_start
                    train_seconds += elapsed
                    logs = {
                        "train/loss": loss.item(),
                        **{name: value.item() for name, value in terms.items()},
                        "lr": lr_scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples / elapsed,
                        "data/skipped": accelerator.reduce(skipped, "sum").item(),
                    }
                    accelerator.log(logs, step=state.step)
                    if main:
                        log.info(
                            "step %d: %s",
                            state.step,
                            " ".join(f"{k}={v:.4g}" for k, v in logs.items()),
                        )
                    window_samples, window_start = 0, time.perf_counter()
                if validation is not None and (
                    state.step % tc.val_every == 0 or state.step == tc.max_steps
                ):
                    pause = time.perf_counter()
                    with accelerator.autocast():
                        fixed = validation.loss(unwrapped)
                        validation.reconstruct(
                            unwrapped, out / "samples" / f"step_{state.step:07d}.png"
                        )
                    accelerator.log({"val/fixed_loss": fixed}, step=state.step)
                    log.info("step %d: fixed-set loss %.4f", state.step, fixed)
                    summary["fixed_loss_end"] = fixed
                    window_start += time.perf_counter() - pause
                folder = None
                if state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps:
                    pause = time.perf_counter()
                    folder = checkpoint()
                    window_start += time.perf_counter() - pause
                if preemption is not None and preemption.requested(accelerator):
                    received = preemption.received
                    name = received.name if received is not None else "a signal to another rank"
                    folder = folder or checkpoint()
                    log.warning("%s: stopping after step %d; wrote %s", name, state.step, folder)
                    raise Preempted(name, state.step, folder)
                if state.step >= tc.max_steps:
                    break
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
    finally:
        if preemption is not None:
            preemption.close()
        if keys_log is not None:
            keys_log.close()
    accelerator.wait_for_everyone()
    train_seconds += time.perf_counter() - window_start
    unwrapped.forget_fingerprint()  # trained, in whatever mode the objective kept it

    summary["steps"] = state.step
    summary["samples_per_s"] = state.samples / train_seconds if train_seconds else math.nan
    summary["peak_memory_mb"] = _peak_memory_mb(accelerator.device)
    summary["skipped_images"] = int(accelerator.reduce(skipped, "sum").item())
    if tc.check_sync:
        own = {f"objective.{i}": accelerator.unwrap_model(m)  # e.g. a critic
               for i, m in enumerate(objective.modules())}  # fmt: skip
        digest = unwrapped.fingerprint + (fingerprint(own, {}) if own else b"")
        digest = torch.tensor(list(digest), device=accelerator.device)
        everyone = accelerator.gather(digest[None]).view(accelerator.num_processes, -1)
        summary["ranks_in_sync"] = bool((everyone == everyone[0]).all())
    if ema is not None:
        ema.copy_to(params)  # the exported model carries the averaged weights
        summary["ema_decay"] = tc.ema_decay
    if main:
        objective.export(unwrapped, out)  # <run>/model (a multi-rate student: each rung)
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(text))
        log.info("done: %s", json.dumps(summary))
    accelerator.end_training()
    return summary
