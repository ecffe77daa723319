"""Training the VAE: the seeded split, the optimisation loop, the per-epoch validation and the report."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from indexer.encoders.common import resolve_device
from indexer.models.scoped import num_threads
from indexer.models.vae.config import VAEConfig, VAEError
from indexer.models.vae.evaluate import evaluate_vae
from indexer.models.vae.losses import FeatureMatch, kl_per_image, recon_per_image
from indexer.models.vae.model import ConvVAE, VAEResult, as_float_images, reparameterise


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def train_vae(
    images: torch.Tensor,
    ids: Sequence[str],
    config: VAEConfig | None = None,
    *,
    progress: bool = True,
    perceptual: FeatureMatch | None = None,
    device: str | torch.device = "cpu",
) -> VAEResult:
    """Train a VAE on ``images`` ``(N, 3, S, S)`` (uint8 or float in [0, 1]) whose ids are ``ids``.

    A seeded ``val_fraction`` of the images is held out; after every epoch the model is evaluated on it (eval mode,
    reconstructing from the posterior mean, so the numbers of every epoch are measured the same way). The report
    holds ``val_recon_mse_first_epoch`` / ``val_recon_mse_last_epoch`` (mean squared error per pixel after the
    first and the last epoch), ``val_kl`` (mean KL per image, last epoch) and ``train_seconds``.

    ``perceptual`` (a :class:`FeatureMatch` around the store's frozen encoder) is required when
    ``config.perceptual_weight`` is positive.

    ``device``: where the model (and ``perceptual``'s network, for the run) computes: ``"auto"`` picks CUDA when
    present. The photos stay in host memory (pinned on a GPU run) and travel a batch at a time as uint8; every
    random draw comes from one CPU generator, so a seed gives the same split, batches and noise on any device.
    The trained model is returned on the CPU, and ``perceptual`` is moved back where it was.
    """
    config = config or VAEConfig()
    ids = [str(i) for i in ids]
    if images.dim() != 4 or images.shape[1] != 3:
        raise VAEError(f"images must be (N, 3, S, S), got {tuple(images.shape)}")
    if len(ids) != len(images):
        raise VAEError(f"{len(images)} images but {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise VAEError("ids must be unique")
    if len(images) < 2:
        raise VAEError("need at least 2 images (one to train on, one to validate with)")
    s = config.image_size
    if images.shape[2] != s or images.shape[3] != s:
        raise VAEError(f"images are {images.shape[3]}x{images.shape[2]} px but config.image_size is {s}")
    if images.dtype != torch.uint8:
        images = as_float_images(images)
        if images.numel() and (images.min() < 0 or images.max() > 1):
            # BCE targets must be probabilities; 0..255 floats are the usual mistake.
            raise VAEError("float images must be in [0, 1] (pass uint8 for 0..255)")

    if config.perceptual_weight > 0 and perceptual is None:
        raise VAEError("perceptual_weight > 0 needs the frozen encoder (perceptual=FeatureMatch(...))")
    dev = resolve_device(device, "VAE training")
    term = perceptual if config.perceptual_weight > 0 else None
    home = next(term.net.parameters()).device if term is not None else dev
    try:
        with num_threads(config.num_threads):
            return _train(images, ids, config, progress, term.to(dev) if term is not None else None, dev)
    finally:
        if term is not None:
            term.to(home)  # the store's cached encoder: a query after training expects it where it was


def _train(images: torch.Tensor, ids: list[str], config: VAEConfig, progress: bool,
           perceptual: FeatureMatch | None, device: torch.device) -> VAEResult:
    # Weight initialisation draws from torch's global generator: seed it, inside fork_rng so that the caller's
    # global random state is the same after training as before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ConvVAE(config).to(device)
    # Every other random draw (split, batch order, flips, reparameterisation noise) comes from this one.
    gen = torch.Generator().manual_seed(config.seed)
    train_idx, val_idx = _split(len(images), config.val_fraction, gen)
    train_images, val_images = images[train_idx], images[val_idx]
    cuda = device.type == "cuda"
    if cuda:
        train_images = train_images.pin_memory()  # lets the copies below overlap the GPU's work
    split = {ids[i]: "train" for i in train_idx.tolist()} | {ids[i]: "val" for i in val_idx.tolist()}

    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    n_train = len(train_images)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=0.05 * config.lr)
        if config.lr_schedule == "cosine"
        else None
    )

    untrained = evaluate_vae(model, val_images, config.recon_loss)
    history: list[dict[str, float]] = []
    step = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(1, config.epochs + 1), desc="VAE", unit="epoch", file=sys.stderr, disable=not progress)
    for epoch in bar:
        model.train()
        t_epoch, cpu_epoch = time.perf_counter(), time.process_time()
        tot_loss = tot_recon = tot_kl = tot_feat = 0.0
        seen = 0
        perm = torch.randperm(n_train, generator=gen)
        beta = config.beta
        for start in range(0, n_train, config.batch_size):
            if step >= total_steps:
                break
            batch = train_images[perm[start : start + config.batch_size]]
            x = as_float_images(batch.pin_memory().to(device, non_blocking=True) if cuda else batch)
            if config.hflip:
                flip = (torch.rand(len(x), generator=gen) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            beta = config.beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else config.beta
            mu, logvar = model.encode(x)
            logits = model.decode_logits(reparameterise(mu, logvar, gen))
            recon = recon_per_image(logits, x, config.recon_loss).mean()
            kl = kl_per_image(mu, logvar).mean()
            loss = recon + beta * kl
            if perceptual is not None:
                feat = perceptual(torch.sigmoid(logits), x, gen).mean()
                loss = loss + config.perceptual_weight * feat
                tot_feat += feat.item() * len(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            tot_loss += loss.item() * len(x)
            tot_recon += recon.item() * len(x)
            tot_kl += kl.item() * len(x)
            seen += len(x)
        val = evaluate_vae(model, val_images, config.recon_loss)
        row = {
            "epoch": float(epoch),
            "beta": beta,
            "train_loss": tot_loss / seen,
            "train_recon": tot_recon / seen,
            "train_kl": tot_kl / seen,
            "train_perceptual": tot_feat / seen,
            "val_recon_mse": val["recon_mse"],
            "val_recon": val["recon"],
            "val_kl": val["kl"],
            "seconds": time.perf_counter() - t_epoch,
            "cpu_seconds": time.process_time() - cpu_epoch,
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.1f}", val_mse=f"{val['recon_mse']:.4f}", kl=f"{val['kl']:.1f}")
        if step >= total_steps:
            break
    bar.close()
    train_seconds = time.perf_counter() - t0
    # CPU time of all threads: on a shared machine wall time says more about the neighbours than about us.
    train_cpu_seconds = time.process_time() - cpu0
    model = model.cpu().eval()

    report: dict[str, float | str] = {
        "device": str(device),
        "val_recon_mse_untrained": untrained["recon_mse"],
        "val_recon_mse_first_epoch": history[0]["val_recon_mse"],
        "val_recon_mse_last_epoch": history[-1]["val_recon_mse"],
        "val_kl": history[-1]["val_kl"],
        "train_loss_last_epoch": history[-1]["train_loss"],
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "epochs": step / steps_per_epoch,
        "steps": float(step),
        "n_train": float(n_train),
        "n_val": float(len(val_images)),
    }
    return VAEResult(model=model, config=config, split=split, report=report, history=history)
