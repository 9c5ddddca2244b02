"""Sliced Wasserstein distance to the exact posterior against N, on the closed-form toy.

Spec section 5: Gaussian-mixture latent prior, linear decoder and operator, exact
posterior draws. Each configuration runs B independent copies of the same y0 as one
batch and takes one draw from each run's final weights (select="sample"); the distance
is SW_2 between those B draws and B exact posterior draws. Reference lines: two
independent exact samples of size B (the floor), and the plain guided sampler (N = 1).

    python scripts/posterior_benchmark.py                    # full run (~10 min on 2 CPU cores)
    python scripts/posterior_benchmark.py --quick            # smoke run
Prints a markdown table; writes the plot (--png) and the numbers (--json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from smc import LDSMCConfig, ld_smc_sample  # noqa: E402
from smc.closed_form import make_toy_problem, sliced_wasserstein  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1024, help="B: independent runs (copies of y0)")
    p.add_argument("--num-steps", type=int, default=50, help="timesteps of the strided chain")
    p.add_argument("--particles", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--gibbs-particles", type=int, nargs="+", default=[1, 4, 16, 64, 256],
                   help="N values for the LD-SMC (aux observations) Gibbs curves")
    p.add_argument("--gibbs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--kappa1", type=float, default=0.02)
    p.add_argument("--kappa2", type=float, default=0.05)
    p.add_argument("--sigma-y", type=float, default=0.3)
    p.add_argument("--dim", type=int, default=4, help="latent dimension d (= image dimension)")
    p.add_argument("--obs-dim", type=int, default=2, help="measurement dimension p")
    p.add_argument("--projections", type=int, default=1000)
    p.add_argument("--xhat-iters", type=int, default=500,
                   help="pseudo-inverse iterations (reference 5000; AdamW's weight decay keeps the "
                        "toy's loss above the 1e-10 stop, so all of them run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small grid, for a smoke test")
    p.add_argument("--png", type=Path, default=Path("docs/posterior_benchmark.png"))
    p.add_argument("--json", type=Path, default=Path("docs/posterior_benchmark.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.num_steps, args.particles = 64, 20, [1, 8]
        args.gibbs_particles, args.gibbs = [1, 8], [1, 2]
    if args.runs < 2 or min(args.particles + args.gibbs_particles) < 1:
        p.error("--runs must be >= 2 and particle counts >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)   # tiny tensors: one thread is much faster, above all on a busy machine
    model, op, y0, _ = make_toy_problem(d=args.dim, m=args.dim, p=args.obs_dim, sigma_y=args.sigma_y,
                                        seed=args.seed)
    B = args.runs
    g = torch.Generator().manual_seed(args.seed + 1)
    exact = lambda: model.sample_posterior(op.A, y0, args.sigma_y, B, g)
    # Distances are averaged over 3 independent exact target samples (less metric noise).
    targets = [exact() for _ in range(3)]
    sw_to_targets = lambda z: sum(sliced_wasserstein(z, t, args.projections, g) for t in targets) / 3
    floor = [sw_to_targets(exact()) for _ in range(5)]
    floor_mean = sum(floor) / len(floor)

    def distance(**kw):
        cfg = LDSMCConfig(num_steps=args.num_steps, kappa1=args.kappa1, kappa2=args.kappa2,
                          sigma_y=args.sigma_y, select="sample", refine=False,
                          xhat_max_iters=args.xhat_iters, **kw)
        t0 = time.time()
        res = ld_smc_sample(model, op, y0.expand(B, -1), cfg,
                            generator=torch.Generator().manual_seed(args.seed + 100 + kw["num_particles"]))
        sw = sw_to_targets(res.z0)
        print(f"  {kw} -> SW {sw:.4f} ({time.time() - t0:.1f} s)", flush=True)
        return sw

    curves = {}
    for preset in ("exact", "reference"):
        name = f"latent TDS ({preset})"
        print(name, flush=True)
        curves[name] = {N: distance(num_particles=N, preset=preset, aux_observations=False)
                        for N in args.particles}
    for J in args.gibbs:
        name = f"LD-SMC exact, J={J}"
        print(name, flush=True)
        curves[name] = {N: distance(num_particles=N, preset="exact", num_gibbs_iters=J)
                        for N in args.gibbs_particles}
    name = "LD-SMC reference, J=1"
    print(name, flush=True)
    curves[name] = {N: distance(num_particles=N, preset="reference") for N in args.gibbs_particles}
    guided = curves["latent TDS (exact)"].get(1)

    # Table (markdown).
    cols = sorted({N for c in curves.values() for N in c})
    print("\n| sampler | " + " | ".join(f"N={N}" for N in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, c in curves.items():
        print(f"| {name} | " + " | ".join(f"{c[N]:.3f}" if N in c else "" for N in cols) + " |")
    print(f"\nexact vs exact (B={B}): {floor_mean:.3f} (min {min(floor):.3f}, max {max(floor):.3f}); "
          f"plain guided sampler (N=1): {guided}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                              for k, v in vars(args).items()},
                                     "exact_vs_exact": floor, "curves": curves}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        ns = sorted(c)
        style = "-o" if "TDS" in name else "--s"
        ax.plot(ns, [c[N] for N in ns], style, label=name, ms=4)
    ax.axhline(floor_mean, color="k", lw=1, label=f"exact vs exact (B={B})")
    if guided is not None:
        ax.axhline(guided, color="gray", ls=":", label="plain guided sampler (N=1)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("particles N")
    ax.set_ylabel("sliced Wasserstein-2 to exact posterior")
    ax.set_title(f"Closed-form GMM toy: d={args.dim}, p={args.obs_dim}, sigma_y={args.sigma_y}, "
                 f"{args.num_steps} steps, B={B} runs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png} and {args.json}")


if __name__ == "__main__":
    main()
