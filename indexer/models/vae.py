"""A convolutional variational autoencoder trained on the photos themselves (the classic CNN-VAE).

The VAE gives the project a latent space learned from pixels alone, to compare with the pretrained encoders'
embedding spaces: reconstructions, samples from the prior, walks between two photos, and per-layer activation
sparsity of the encoder.

Model: ``log2(S) - 2`` stride-2 convolution blocks (conv -> BatchNorm -> activation) take an S x S photo down to
4 x 4, one linear layer each gives the posterior mean and log-variance, and a mirrored stack of transposed
convolutions with a sigmoid output decodes a latent vector back to an image in [0, 1].

Loss per image: ``recon + beta * KL(q(z|x) || N(0, I))``, both summed over an image (pixels, latent dims) and
averaged over the batch, so ``beta = 1`` is the real evidence lower bound. The reconstruction term is a Bernoulli
likelihood (binary cross-entropy on the decoder logits) by default; a Gaussian one (summed squared error) is an
option. Whichever is trained, the reported quality is the same comparable number: the validation mean squared
error per pixel, reconstructing from the posterior mean.

Determinism: one seed fixes the train/val split, the initial weights, the batch order, the flips and the
reparameterisation noise (the weights from ``torch.manual_seed(seed)``, every later draw from one seeded
``torch.Generator``). On the CPU the same seed,
thread count (``VAEConfig.num_threads``) and torch build give bit-identical weights; a different thread count or
torch build may change the float summation order and so the last bits.
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.utils import make_grid
from tqdm import tqdm

from indexer.errors import UsageError
from indexer.images import ImageError, load_image
from indexer.models.checkpoint import CheckpointFormat, read_checkpoint, save_checkpoint
from indexer.models.scoped import eval_mode, num_threads
from indexer.store.atomic import atomic_write

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ConvVAE",
    "VAEConfig",
    "VAEError",
    "VAEResult",
    "decode_latents",
    "encode_images",
    "interpolate",
    "load_images",
    "load_vae",
    "save_reconstruction_grid",
    "save_sample_grid",
    "save_vae",
    "to_pil",
    "train_vae",
    "vae_transform",
]

FORMAT = "mammals-space-vae"
FORMAT_VERSION = 1
WEIGHTS_FILE = "vae.safetensors"
META_FILE = "vae.json"

_SIZES = (64, 128)
_BOTTOM = 4  # spatial side of the last encoder feature map, whatever the input size
_DEFAULT_CHANNELS = {64: (32, 64, 128, 256), 128: (32, 64, 128, 256, 256)}
_ACTIVATIONS = ("leaky_relu", "relu")
_RECON_LOSSES = ("bce", "mse")
_LR_SCHEDULES = ("cosine", "constant")
_EVAL_BATCH = 256
_GRID_PADDING = 2


class VAEError(UsageError):
    """A VAE file or argument that cannot be used (wrong format, shapes that do not match, bad settings)."""


CHECKPOINT = CheckpointFormat(FORMAT, FORMAT_VERSION, WEIGHTS_FILE, META_FILE, VAEError, "VAE")


# --------------------------------------------------------------------------------------------------- config


def _n_blocks(image_size: int) -> int:
    return int(math.log2(image_size)) - int(math.log2(_BOTTOM))


@dataclass
class VAEConfig:
    """Everything that defines a trained VAE: architecture, loss and training settings (saved beside the weights).

    The defaults train on the 1,140 shared 64 px photos in about a minute and a half on a 2-core CPU.
    """

    image_size: int = 64
    """Side of the square input and output images: 64 or 128 (128 adds a fifth block)."""
    latent_dim: int = 64
    beta: float = 1.0
    """KL weight; 1 is the true ELBO (with sums over pixels the KL is small next to the reconstruction term)."""
    kl_warmup_epochs: float = 0.0
    """Raise the KL weight linearly from 0 to ``beta`` over this many epochs (0: full weight from the first step)."""
    epochs: int = 25
    batch_size: int = 64
    lr: float = 2e-3
    lr_schedule: str = "cosine"
    """``cosine`` (decay per step to 5% of ``lr`` by the end: the last epochs settle instead of jittering) or
    ``constant``."""
    channels: tuple[int, ...] = ()
    """Encoder channels per stride-2 block, one per halving down to 4 x 4; empty means the default for the size
    (64 px: 32-64-128-256, 128 px: 32-64-128-256-256). The decoder mirrors them."""
    activation: str = "leaky_relu"
    """``leaky_relu`` (slope 0.2, the usual VAE/GAN choice) or ``relu`` (exact zeros, for sparsity studies)."""
    recon_loss: str = "bce"
    """``bce`` (Bernoulli likelihood on the logits) or ``mse`` (summed squared error, a fixed-variance Gaussian).

    BCE by default: its gradient per logit is ``p - x`` where the squared error's, through the sigmoid, is
    ``2 (p - x) p (1 - p)``, so it drives pixels harder against the KL term and never stalls on saturated pixels.
    On the 1,140 pets (25 epochs, constant lr) it reached a val MSE per pixel of 0.020 against 0.031 with the
    summed squared error, whose first epoch also blew up the KL. (Pixel targets in (0, 1) are not binary, so the
    BCE has a nonzero floor; only its gradient matters, and MSE is what the report compares.)"""
    hflip: bool = True
    """Random horizontal flips of training images: pets are left-right symmetric, so this is free extra data."""
    val_fraction: float = 0.1
    seed: int = 0
    num_threads: int = 2
    """CPU threads while training; part of the config because it is part of what makes a run reproducible."""

    def __post_init__(self) -> None:
        if self.image_size not in _SIZES:
            raise VAEError(f"image_size must be one of {_SIZES}, not {self.image_size}")
        self.channels = tuple(int(c) for c in self.channels) or _DEFAULT_CHANNELS[self.image_size]
        need = _n_blocks(self.image_size)
        if len(self.channels) != need:
            raise VAEError(
                f"{self.image_size} px needs {need} encoder blocks (one per halving down to {_BOTTOM} px), "
                f"got channels={self.channels}"
            )
        if any(c < 1 for c in self.channels):
            raise VAEError(f"channels must be positive, got {self.channels}")
        if self.latent_dim < 1:
            raise VAEError(f"latent_dim must be at least 1, got {self.latent_dim}")
        if self.activation not in _ACTIVATIONS:
            raise VAEError(f"activation must be one of {_ACTIVATIONS}, not {self.activation!r}")
        if self.recon_loss not in _RECON_LOSSES:
            raise VAEError(f"recon_loss must be one of {_RECON_LOSSES}, not {self.recon_loss!r}")
        if self.lr_schedule not in _LR_SCHEDULES:
            raise VAEError(f"lr_schedule must be one of {_LR_SCHEDULES}, not {self.lr_schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_threads < 1:
            raise VAEError("epochs, batch_size and num_threads must be at least 1")
        if not self.lr > 0 or self.beta < 0 or self.kl_warmup_epochs < 0:
            raise VAEError("lr must be positive; beta and kl_warmup_epochs must not be negative")
        if not 0.0 < self.val_fraction < 1.0:
            raise VAEError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)  # JSON has no tuples
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            # A config from a newer version: refuse rather than silently build a different model.
            raise VAEError(f"unknown VAE config keys: {sorted(unknown)}")
        kwargs = dict(d)
        if "channels" in kwargs:
            kwargs["channels"] = tuple(kwargs["channels"])
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------- model


def _activation(name: str) -> nn.Module:
    # A fresh module per use: sparsity hooks need one module per layer, not a shared (or functional) one.
    return nn.LeakyReLU(0.2) if name == "leaky_relu" else nn.ReLU()


class ConvVAE(nn.Module):
    """The convolutional VAE. Inputs and outputs are float images ``(N, 3, S, S)`` in [0, 1].

    BatchNorm layers make train and eval mode differ: call ``eval()`` before inference (the helpers in this
    module do, and put the model back in the mode they found it in).
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VAEConfig()
        ch = config.channels
        blocks: list[tuple[str, nn.Module]] = []
        prev = 3
        for i, c in enumerate(ch):
            # k=4, s=2, p=1 halves the side exactly; no conv bias because BatchNorm's shift replaces it.
            blocks.append(
                (
                    f"block{i}",
                    nn.Sequential(
                        OrderedDict(
                            conv=nn.Conv2d(prev, c, 4, 2, 1, bias=False),
                            bn=nn.BatchNorm2d(c),
                            act=_activation(config.activation),
                        )
                    ),
                )
            )
            prev = c
        self.encoder = nn.Sequential(OrderedDict(blocks))
        flat = ch[-1] * _BOTTOM * _BOTTOM
        self.fc_mu = nn.Linear(flat, config.latent_dim)
        self.fc_logvar = nn.Linear(flat, config.latent_dim)

        self.fc_decode = nn.Linear(config.latent_dim, flat)
        self.decode_act = _activation(config.activation)
        up: list[tuple[str, nn.Module]] = []
        rev = list(reversed(ch))
        for i in range(len(rev) - 1):
            up.append(
                (
                    f"block{i}",
                    nn.Sequential(
                        OrderedDict(
                            conv=nn.ConvTranspose2d(rev[i], rev[i + 1], 4, 2, 1, bias=False),
                            bn=nn.BatchNorm2d(rev[i + 1]),
                            act=_activation(config.activation),
                        )
                    ),
                )
            )
        # The last layer has no BatchNorm: it produces pixel logits, whose scale must be free.
        up.append(("out", nn.ConvTranspose2d(rev[-1], 3, 4, 2, 1)))
        self.decoder = nn.Sequential(OrderedDict(up))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, 3, S, S)`` in [0, 1] -> posterior mean and log-variance, each ``(N, latent_dim)``."""
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, latent_dim)`` -> pixel logits ``(N, 3, S, S)`` (the BCE loss wants logits for stability)."""
        c = self.config.channels[-1]
        h = self.decode_act(self.fc_decode(z)).view(-1, c, _BOTTOM, _BOTTOM)
        out: torch.Tensor = self.decoder(h)
        return out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(N, latent_dim)`` -> images ``(N, 3, S, S)`` in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct through a sampled latent in training mode and through the mean in eval mode.

        Returns ``(x_hat, mu, logvar)``; ``x_hat`` is in [0, 1].
        """
        mu, logvar = self.encode(x)
        z = _reparameterise(mu, logvar, None) if self.training else mu
        return self.decode(z), mu, logvar

    def activation_layers(self, *, include_decoder: bool = False) -> list[tuple[str, nn.Module]]:
        """The encoder's activation modules in execution order, as ``(qualified name, module)``.

        For per-layer activation sparsity via forward hooks. With LeakyReLU no output is exactly zero: count the
        negative outputs instead (they are exactly the units whose pre-activation was negative).
        """
        modules = list(self.encoder.named_modules(prefix="encoder"))
        if include_decoder:
            modules += [("decode_act", self.decode_act), *self.decoder.named_modules(prefix="decoder")]
        return [(name, m) for name, m in modules if isinstance(m, nn.ReLU | nn.LeakyReLU)]


def _reparameterise(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # z = mu + sigma * eps keeps the sample differentiable in mu and logvar; the noise comes from the run's
    # generator so that training is reproducible.
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


def _kl_per_image(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent dims, one value per image (closed form)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def _recon_per_image(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        per_pixel = (torch.sigmoid(logits) - x).pow(2)
    return per_pixel.flatten(1).sum(dim=1)


# --------------------------------------------------------------------------------------------------- images


class _ToRGB:
    """Picklable ``img.convert("RGB")`` (a lambda would not survive the trip to a DataLoader worker)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


def _geometry(image_size: int) -> list[Callable[[Any], Any]]:
    # Shorter side to S, then the central S x S: keeps the aspect ratio and the (usually centred) animal.
    return [
        _ToRGB(),
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
    ]


def vae_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor ``(3, S, S)`` in [0, 1] (RGB, shorter side resized to S, centre crop). Picklable."""
    if image_size not in _SIZES:
        raise VAEError(f"image_size must be one of {_SIZES}, not {image_size}")
    return transforms.Compose([*_geometry(image_size), transforms.ToTensor()])


class _PhotoDataset(torch.utils.data.Dataset[tuple[int, torch.Tensor | None, str]]):
    """Paths -> uint8 tensors; a failure comes back as an error string, so the main process can name the file."""

    def __init__(self, paths: Sequence[str], image_size: int) -> None:
        self.paths = list(paths)
        self.transform = transforms.Compose([*_geometry(image_size), transforms.PILToTensor()])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            _, img = load_image(Path(self.paths[i]))
            return i, self.transform(img), ""
        except ImageError as e:
            return i, None, e.reason
        except Exception as e:  # anything else too: it is reported with the file's name in the main process
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> list[tuple[int, torch.Tensor | None, str]]:
    return batch


def load_images(paths: Sequence[str], image_size: int, *, workers: int = 1) -> torch.Tensor:
    """Decode every photo once into one uint8 tensor ``(N, 3, S, S)`` (1,140 photos at 64 px are 14 MB).

    Training then never touches the disk or the JPEG decoder again. ``workers`` decode processes (0: decode in
    this process). Raises ``ImageError`` naming the first file that cannot be read.
    """
    if image_size not in _SIZES:
        raise VAEError(f"image_size must be one of {_SIZES}, not {image_size}")
    paths = [str(p) for p in paths]
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    if not paths:
        return out
    loader = torch.utils.data.DataLoader(
        _PhotoDataset(paths, image_size),
        batch_size=32,
        num_workers=max(0, workers),
        collate_fn=_collate,
    )
    for batch in loader:
        for i, tensor, error in batch:
            if tensor is None:
                raise ImageError(paths[i], error)
            out[i] = tensor
    return out


def _as_float_images(images: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) images, one ``(3, S, S)`` or a batch -> float32 batch in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise VAEError(f"images must be a torch.Tensor, got {type(images).__name__}")
    x = images.unsqueeze(0) if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] != 3:
        raise VAEError(f"images must be (N, 3, S, S) or (3, S, S), got {tuple(images.shape)}")
    if image_size is not None and (x.shape[2] != image_size or x.shape[3] != image_size):
        raise VAEError(f"images are {x.shape[3]}x{x.shape[2]} px, the model takes {image_size}x{image_size}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise VAEError(f"images must be uint8 or float, got {x.dtype}")
    return x.float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images in [0, 1] (or uint8), ``(N, 3, S, S)`` or ``(3, S, S)`` -> RGB PIL images."""
    x = _as_float_images(images.detach().cpu())
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


# ------------------------------------------------------------------------------------------------- training


@dataclass
class VAEResult:
    """A trained VAE (in eval mode) with its config, seeded split, summary report and per-epoch history."""

    model: ConvVAE
    config: VAEConfig
    split: dict[str, str]
    """Image id -> ``"train"`` or ``"val"``."""
    report: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _evaluate(model: ConvVAE, images: torch.Tensor, kind: str) -> dict[str, float]:
    """Mean per-pixel squared error (reconstructing from the mean), mean KL per image and the loss, on images."""
    sq = kl = recon = 0.0
    with eval_mode(model):
        for start in range(0, len(images), _EVAL_BATCH):
            x = _as_float_images(images[start : start + _EVAL_BATCH])
            mu, logvar = model.encode(x)
            logits = model.decode_logits(mu)
            sq += (torch.sigmoid(logits) - x).pow(2).sum().item()
            kl += _kl_per_image(mu, logvar).sum().item()
            recon += _recon_per_image(logits, x, kind).sum().item()
    n = len(images)
    return {"recon_mse": sq / (n * images[0].numel()), "kl": kl / n, "recon": recon / n}


def train_vae(
    images: torch.Tensor,
    ids: Sequence[str],
    config: VAEConfig | None = None,
    *,
    progress: bool = True,
) -> VAEResult:
    """Train a VAE on ``images`` ``(N, 3, S, S)`` (uint8 or float in [0, 1]) whose ids are ``ids``.

    A seeded ``val_fraction`` of the images is held out; after every epoch the model is evaluated on it (eval mode,
    reconstructing from the posterior mean, so the numbers of every epoch are measured the same way). The report
    holds ``val_recon_mse_first_epoch`` / ``val_recon_mse_last_epoch`` (mean squared error per pixel after the
    first and the last epoch), ``val_kl`` (mean KL per image, last epoch) and ``train_seconds``.
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
        images = _as_float_images(images)
        if images.numel() and (images.min() < 0 or images.max() > 1):
            # BCE targets must be probabilities; 0..255 floats are the usual mistake.
            raise VAEError("float images must be in [0, 1] (pass uint8 for 0..255)")

    with num_threads(config.num_threads):
        return _train(images, ids, config, progress)


def _train(images: torch.Tensor, ids: list[str], config: VAEConfig, progress: bool) -> VAEResult:
    # Weight initialisation draws from torch's global generator: seed it, inside fork_rng so that the caller's
    # global random state is the same after training as before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = ConvVAE(config)
    # Every other random draw (split, batch order, flips, reparameterisation noise) comes from this one.
    gen = torch.Generator().manual_seed(config.seed)
    train_idx, val_idx = _split(len(images), config.val_fraction, gen)
    train_images, val_images = images[train_idx], images[val_idx]
    split = {ids[i]: "train" for i in train_idx.tolist()} | {ids[i]: "val" for i in val_idx.tolist()}

    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    n_train = len(train_images)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    warmup_steps = config.kl_warmup_epochs * steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=0.05 * config.lr)
        if config.lr_schedule == "cosine"
        else None
    )

    untrained = _evaluate(model, val_images, config.recon_loss)
    history: list[dict[str, float]] = []
    step = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(1, config.epochs + 1), desc="VAE", unit="epoch", file=sys.stderr, disable=not progress)
    for epoch in bar:
        model.train()
        t_epoch, cpu_epoch = time.perf_counter(), time.process_time()
        tot_loss = tot_recon = tot_kl = 0.0
        perm = torch.randperm(n_train, generator=gen)
        beta = config.beta
        for start in range(0, n_train, config.batch_size):
            x = _as_float_images(train_images[perm[start : start + config.batch_size]])
            if config.hflip:
                flip = torch.rand(len(x), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            beta = config.beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else config.beta
            mu, logvar = model.encode(x)
            logits = model.decode_logits(_reparameterise(mu, logvar, gen))
            recon = _recon_per_image(logits, x, config.recon_loss).mean()
            kl = _kl_per_image(mu, logvar).mean()
            loss = recon + beta * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            tot_loss += loss.item() * len(x)
            tot_recon += recon.item() * len(x)
            tot_kl += kl.item() * len(x)
        val = _evaluate(model, val_images, config.recon_loss)
        row = {
            "epoch": float(epoch),
            "beta": beta,
            "train_loss": tot_loss / n_train,
            "train_recon": tot_recon / n_train,
            "train_kl": tot_kl / n_train,
            "val_recon_mse": val["recon_mse"],
            "val_recon": val["recon"],
            "val_kl": val["kl"],
            "seconds": time.perf_counter() - t_epoch,
            "cpu_seconds": time.process_time() - cpu_epoch,
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.1f}", val_mse=f"{val['recon_mse']:.4f}", kl=f"{val['kl']:.1f}")
    bar.close()
    train_seconds = time.perf_counter() - t0
    # CPU time of all threads: on a shared machine wall time says more about the neighbours than about us.
    train_cpu_seconds = time.process_time() - cpu0
    model.eval()

    report = {
        "val_recon_mse_untrained": untrained["recon_mse"],
        "val_recon_mse_first_epoch": history[0]["val_recon_mse"],
        "val_recon_mse_last_epoch": history[-1]["val_recon_mse"],
        "val_kl": history[-1]["val_kl"],
        "train_loss_last_epoch": history[-1]["train_loss"],
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "epochs": float(config.epochs),
        "n_train": float(n_train),
        "n_val": float(len(val_images)),
    }
    return VAEResult(model=model, config=config, split=split, report=report, history=history)


# ------------------------------------------------------------------------------------------------ save/load


def save_vae(result: VAEResult, directory: Path) -> dict[str, Any]:
    """Write ``vae.safetensors`` (weights) and ``vae.json`` (format, config, split, report, history, weights
    sha256), each atomically, weights first (see :mod:`indexer.models.checkpoint`); ``load_vae`` checks that
    sha256, so a reader that catches an overwrite half-way gets a clear error instead of another run's weights.

    Returns ``{"sha256": <weights sha256>, "weights": path, "meta": path}``.
    """
    return save_checkpoint(CHECKPOINT, directory, result.model.state_dict(), {
        "config": result.config.to_dict(),
        "split": result.split,
        "report": result.report,
        "history": result.history,
    })


def load_vae(directory: Path) -> tuple[ConvVAE, dict[str, Any]]:
    """Read a VAE written by ``save_vae``: ``(model in eval mode, the vae.json contents)``.

    Only safetensors are read (no pickles). Raises ``VAEError`` when a file is missing, the format is unknown,
    a tensor's name or shape does not match the config, or the weights are not the ones the JSON names.
    """
    ckpt = read_checkpoint(CHECKPOINT, directory)
    try:
        config = VAEConfig.from_dict(ckpt.meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise VAEError(f"{ckpt.meta_path}: bad config ({e})") from None
    model = ConvVAE(config)
    ckpt.load_into(model.state_dict(), needs="the config")
    model.load_state_dict(ckpt.state)
    model.eval()
    return model, ckpt.meta


# ------------------------------------------------------------------------------------------------ inference


def encode_images(model: ConvVAE, images: torch.Tensor) -> np.ndarray:
    """Posterior means ``(N, latent_dim)`` float32 for images ``(N, 3, S, S)`` (the VAE's embedding of a photo)."""
    out = []
    with eval_mode(model):
        for start in range(0, len(images), _EVAL_BATCH):
            mu, _ = model.encode(_as_float_images(images[start : start + _EVAL_BATCH], model.image_size))
            out.append(mu)
    if not out:
        return np.zeros((0, model.latent_dim), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def decode_latents(model: ConvVAE, z: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Latents ``(N, latent_dim)`` or one ``(latent_dim,)`` (tensor or numpy) -> images ``(N, 3, S, S)`` in [0, 1]."""
    zt = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z).detach().cpu().float()
    if zt.dim() == 1:
        zt = zt.unsqueeze(0)
    if zt.dim() != 2 or zt.shape[1] != model.latent_dim:
        raise VAEError(f"latents must be (N, {model.latent_dim}), got {tuple(zt.shape)}")
    out = []
    with eval_mode(model):
        for start in range(0, len(zt), _EVAL_BATCH):
            out.append(model.decode(zt[start : start + _EVAL_BATCH]))
    if not out:
        s = model.image_size
        return torch.zeros((0, 3, s, s))
    return torch.cat(out)


def _reconstruct(model: ConvVAE, images: torch.Tensor) -> torch.Tensor:
    return decode_latents(model, encode_images(model, images))


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors a and b at fractions t ``(T,)`` -> ``(T, D)``.

    Follows the great circle between the two directions while blending the norms; parallel (or anti-parallel, or
    zero) vectors have no unique great circle, so those fall back to the straight line.
    """
    a64, b64, t64 = a.double(), b.double(), t.double()[:, None]
    na, nb = a64.norm(), b64.norm()
    if na < 1e-12 or nb < 1e-12:
        return ((1 - t64) * a64 + t64 * b64).to(a.dtype)
    cos = torch.clamp(torch.dot(a64 / na, b64 / nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    if so < 1e-6:
        return ((1 - t64) * a64 + t64 * b64).to(a.dtype)
    out = (torch.sin((1 - t64) * omega) / so) * a64 + (torch.sin(t64 * omega) / so) * b64
    return out.to(a.dtype)


def interpolate(model: ConvVAE, a: torch.Tensor, b: torch.Tensor, steps: int, mode: str = "linear") -> torch.Tensor:
    """Walk from image a to image b through the latent space: ``(steps, 3, S, S)`` in [0, 1].

    a and b ``(3, S, S)`` (uint8 or float) are encoded to their posterior means; the walk is a straight line
    (``linear``) or a great-circle arc (``slerp``, which keeps the norm typical of Gaussian latents instead of
    cutting through the low-norm middle). The first and last images are the reconstructions of a and b.
    """
    if steps < 2:
        raise VAEError(f"steps must be at least 2 (both ends are included), got {steps}")
    if mode not in ("linear", "slerp"):
        raise VAEError(f"mode must be 'linear' or 'slerp', not {mode!r}")
    for name, img in (("a", a), ("b", b)):
        if img.dim() != 3:
            raise VAEError(f"{name} must be one image (3, S, S), got {tuple(img.shape)}")
    mus = torch.from_numpy(encode_images(model, torch.stack([_as_float_images(a)[0], _as_float_images(b)[0]])))
    t = torch.linspace(0.0, 1.0, steps)
    z = (1 - t)[:, None] * mus[0] + t[:, None] * mus[1] if mode == "linear" else _slerp(mus[0], mus[1], t)
    return decode_latents(model, z)


# ------------------------------------------------------------------------------------------------------ grids


def _save_png(grid: torch.Tensor, path: Path) -> None:
    img = to_pil(grid)[0]
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def save_reconstruction_grid(model: ConvVAE, images: torch.Tensor, path: Path, n: int = 16) -> None:
    """PNG of the first n images (top row) over their reconstructions (bottom row), with 2 px padding."""
    x = _as_float_images(images, model.image_size)[:n]
    if len(x) == 0:
        raise VAEError("no images to reconstruct")
    recon = _reconstruct(model, x)
    _save_png(make_grid(torch.cat([x, recon]), nrow=len(x), padding=_GRID_PADDING), path)


def save_sample_grid(model: ConvVAE, path: Path, n: int = 64, seed: int = 0) -> None:
    """PNG of n decodes of z ~ N(0, I) (seeded), in a near-square grid (8 x 8 for 64), 2 px padding."""
    if n < 1:
        raise VAEError(f"n must be at least 1, got {n}")
    z = torch.randn((n, model.latent_dim), generator=torch.Generator().manual_seed(seed))
    nrow = math.ceil(math.sqrt(n))
    _save_png(make_grid(decode_latents(model, z), nrow=nrow, padding=_GRID_PADDING), path)
