"""Cost of LD-SMC per transition: time, peak memory, UNet and decoder calls (spec section 6).

    python scripts/bench_smc.py --small-fixture --steps 6                       # CPU, fixture LDM
    python scripts/bench_smc.py --config configs/models/ffhq-ldm-vq-4.yaml --random-weights \\
        --device cuda --steps 20

Random weights are fine for timing. Times come from the sampler's callback (the
transitions only: the pseudo-inverse, the auxiliary path and the refinement are
reported separately as "setup+end"). Call counts are averaged over the transitions
between the first and the last (the first has no resampling; the last, to t = 0, takes no
guidance gradient for a next step, and in the reference preset (log_prior_new_moments)
makes one UNet forward for the moments at z_0). Peak memory is CUDA
max_memory_allocated on CUDA, else the process's peak RSS (it only grows: the rows
after the first include everything before).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from smc import LDSMCConfig, ld_smc_sample  # noqa: E402
from smc.counting import CountingModel  # noqa: E402

SMALL_IO = ROOT / "tests" / "fixtures" / "compact" / "compact_ldm_io.pt"


def small_fixture_config() -> dict:
    """CompVis-layout config of the fixture's reduced LDM (settings stored in tests/fixtures/compact/compact_ldm_io.pt)."""
    io = torch.load(SMALL_IO, weights_only=True)
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": io["linear_start"], "linear_end": io["linear_end"], "timesteps": io["timesteps"],
        "unet_config": {"target": "UNetModel", "params": dict(io["unet_config"])},
        "first_stage_config": {"target": "VQModelInterface", "params": {
            "ddconfig": io["ddconfig"], "embed_dim": io["embed_dim"], "n_embed": io["n_embed"]}},
        "cond_stage_config": "__is_unconditional__"}}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="model config YAML (CompVis layout)")
    src.add_argument("--small-fixture", action="store_true", help="the fixture's reduced LDM (random weights)")
    p.add_argument("--random-weights", action="store_true", help="build from the config without a checkpoint")
    p.add_argument("--ckpt", default=None, help="checkpoint (default: the config's ckpt_path)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="num_steps of the strided schedule")
    p.add_argument("--batch", type=int, default=1, help="images B")
    p.add_argument("--particles", type=int, nargs="+", default=[1, 5])
    p.add_argument("--task", choices=["inpainting", "super_resolution"], default="inpainting")
    p.add_argument("--xhat-iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.config and not args.random_weights and args.ckpt is None:
        print("note: loading the config's checkpoint (pass --random-weights to time without one)")
    if not 4 <= args.steps <= 1000:
        p.error("--steps must be in [4, 1000] (calls are counted between two transitions with t' > 0)")
    return args


def build(args):
    import ldm
    cfg = small_fixture_config() if args.small_fixture else args.config
    if args.small_fixture or args.random_weights:
        torch.manual_seed(0)  # random weights only: the benchmark measures cost, not quality
        model = ldm.build_model(cfg, device=args.device)
        model.requires_grad_(False)
        return model
    return ldm.load_model(cfg, device=args.device, ckpt=args.ckpt)


def make_operator(task, image_shape, batch, device):
    from guided_diffusion.measurements import get_operator
    C, H, W = image_shape
    if task == "inpainting":
        mask = torch.ones(batch, 1, H, W, device=device)
        mask[:, :, H // 4: 3 * H // 4, W // 4: 3 * W // 4] = 0
        return get_operator("inpainting", device=device).set_mask(mask)
    return get_operator("super_resolution", in_shape=(1, C, H, W), scale_factor=4, device=device)


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(model, op, y, N, args):
    counted = CountingModel(model)
    cfg = LDSMCConfig(num_particles=N, num_steps=args.steps, xhat_max_iters=args.xhat_iters, refine=False)
    marks = []

    def callback(state):
        if torch.device(args.device).type == "cuda":
            torch.cuda.synchronize()
        marks.append((time.perf_counter(), state.t_next, counted.snapshot()))

    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    t0 = time.perf_counter()
    ld_smc_sample(counted, op, y, cfg, generator=torch.Generator(args.device).manual_seed(0), callback=callback)
    total = time.perf_counter() - t0
    # transitions 1 .. K-2 (t' > 0), measured between consecutive callbacks
    n = len(marks) - 2
    per = (marks[-2][0] - marks[0][0]) / n
    calls = {k: (marks[-2][2][k] - marks[0][2][k]) / n
             for k in ("unet_fwd", "unet_bwd", "decoder_fwd", "decoder_bwd")}
    return dict(N=N, transitions=len(marks), s_per_transition=per, s_per_transition_image=per / y.shape[0],
                total_s=total, setup_end_s=total - (marks[-1][0] - marks[0][0]) - per,
                peak_mb=peak_memory_mb(args.device), **calls)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args)
    g = torch.Generator(args.device).manual_seed(1)
    x = torch.rand((args.batch, *model.image_shape), generator=g, device=args.device) * 2 - 1
    op = make_operator(args.task, model.image_shape, args.batch, args.device)
    y = op(x)
    rows = [run_one(model, op, y, N, args) for N in args.particles]
    print(f"\nLD-SMC cost: {args.config or 'small fixture LDM'}, device {args.device}, task {args.task}, "
          f"B={args.batch}, {args.steps} steps (reference preset, s=333)")
    head = ("N", "s/transition", "s/transition/image", "UNet fwd", "UNet bwd", "dec fwd", "dec bwd",
            "setup+end s", "total s", "peak MB")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['N']} | {r['s_per_transition']:.3f} | {r['s_per_transition_image']:.3f} | "
              f"{r['unet_fwd']:.2f} | {r['unet_bwd']:.2f} | {r['decoder_fwd']:.2f} | {r['decoder_bwd']:.2f} | "
              f"{r['setup_end_s']:.1f} | {r['total_s']:.1f} | {r['peak_mb']:.0f} |")
    print("Calls are per transition with t' > 0, for the whole batch of B x N particles (one call "
          "each); decoder calls include g2's D(mu) only when t' <= s.")


if __name__ == "__main__":
    main()
