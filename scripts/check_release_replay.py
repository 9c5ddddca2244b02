"""Replay a recording of the authors' released LD-SMC sampler through ours, step by step.

    python scripts/check_release_replay.py tests/fixtures/ldsmc-release/replay_J1.pt
    python scripts/check_release_replay.py tests/fixtures/ldsmc-release/replay_J2.pt
    python scripts/check_release_replay.py REC.pt --set log_prior_new_moments=false   # must fail

A recording (format 'ldsmc-release-replay/1', see tests/fixtures/ldsmc-release/README.md
and its generator) holds one small run of the release with every random draw it made.
This script builds the compact model (tests/fixtures/compact/compact_ldm.ckpt) with the
recording's T-step schedule (its float32 alphas_cumprod, exactly as the release read it),
answers every random draw of `smc.ld_smc_sample` from the recording (a `smc.DrawSource`:
eps of torch.normal, multinomial indices, randn values), runs the `reference` preset with
the recording's settings, collects our per-step tensors through the sampler's `trace` hook
and compares every recorded quantity. It prints the worst relative error per quantity
(max |ours - release| / max |release|, over Gibbs iterations and steps) and exits 0 only
when every quantity is within --rtol and every index, draw and pairing matches; otherwise
1, naming the failing quantities. A recording whose Gibbs iteration 0 omits tensors
(replay_J2.pt) takes them from --base (default: replay_J1.pt beside it).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from smc import DrawSource, LDSMCConfig, ld_smc_sample  # noqa: E402
from smc.auxiliary import selected_path  # noqa: E402

COMPACT = ROOT / "tests" / "fixtures" / "compact"
FORMAT = "ldsmc-release-replay/1"
# our draw kind -> (torch function, release line) of the recorded draw it must meet
SITES = {"x_hat_init": ("torch.randn", 636), "path": ("torch.randn_like", (433, 439)),
         "particles": ("torch.normal", 660), "proposal": ("torch.normal", 724)}


class ReplayError(RuntimeError):
    """Our sampler asked for a draw the recording does not have at this point."""


def load_recording(path: Path, base: Path | None = None) -> dict:
    """The recording, with the tensors its Gibbs iteration 0 omits filled in from `base`."""
    rec = torch.load(path, weights_only=True)
    if rec.get("format") != FORMAT:
        raise SystemExit(f"{path}: not a release replay recording (format {rec.get('format')!r}, want {FORMAT!r})")
    g0 = rec["gibbs"][0]
    if "omitted" in g0:
        base = base or path.with_name("replay_J1.pt")
        if not base.exists():
            raise SystemExit(f"{path} omits iteration 0's tensors ({g0['omitted']['identical_to']}); "
                             f"pass --base with that file")
        b0 = torch.load(base, weights_only=True)
        n = len(b0["draws"])
        same = all(torch.equal(a["value"], b["value"]) for a, b in zip(b0["draws"], rec["draws"][:n]))
        if not same or b0["inputs"]["y"].ne(rec["inputs"]["y"]).any():
            raise SystemExit(f"{base} does not share {path}'s first {n} draws and inputs: wrong --base")
        bg = b0["gibbs"][0]
        g0["ys"] = bg["ys"]
        for part in ("init", "aux"):
            g0[part].update({k: bg[part][k] for k, v in g0[part].items() if v is None})
        for t, bt in zip(g0["transitions"], bg["transitions"]):
            t.update({k: bt[k] for k, v in t.items() if v is None and bt[k] is not None})
    return rec


def compact_model(rec: dict, ckpt: Path):
    """The compact LDM with the recording's schedule (alphas_cumprod exactly as recorded)."""
    import ldm
    io = torch.load(COMPACT / "compact_ldm_io.pt", weights_only=True)
    params = {"linear_start": io["linear_start"], "linear_end": io["linear_end"], "timesteps": io["timesteps"],
              "image_size": io["unet_config"]["image_size"],
              "unet_config": {"target": "UNetModel", "params": dict(io["unet_config"])},
              "first_stage_config": {"target": "VQModelInterface", "params": {
                  "embed_dim": io["embed_dim"], "n_embed": io["n_embed"], "ddconfig": io["ddconfig"]}},
              "cond_stage_config": "__is_unconditional__"}
    model = ldm.load_model({"model": {"target": "LatentDiffusion", "params": params}}, ckpt=ckpt)
    sched = rec["schedule"]
    model.set_schedule(sched["betas_float64"])
    # The release's wrapper computed cumprod in float32 (up to 6e-8 from ours): take it as recorded.
    model.alphas_cumprod = sched["alphas_cumprod_float32"].clone()
    return model


class ReplayDraws(DrawSource):
    """Answers our sampler's draws from the recording, in order, checking each one's kind."""

    def __init__(self, draws: list, N: int):
        self.draws, self.pos, self.N = draws, 0, N
        self.probs = []   # (ours, recorded) resampling probabilities

    def _next(self, fn, line, what):
        if self.pos >= len(self.draws):
            raise ReplayError(f"our sampler drew {what} after the recording's {len(self.draws)} draws")
        d = self.draws[self.pos]
        lines = line if isinstance(line, tuple) else (line,)
        if d["fn"] != fn or d["site_line"] not in lines:
            raise ReplayError(f"draw {self.pos}: our sampler drew {what}, the release drew {d['fn']} "
                              f"at line {d['site_line']} ({d['site_func']})")
        self.pos += 1
        return d

    def randn(self, kind, shape, device, dtype):
        if kind not in SITES:
            raise ReplayError(f"our sampler drew {kind!r}, which the release never draws")
        d = self._next(*SITES[kind], what=f"{kind!r} {list(shape)}")
        v = d["eps"] if d["fn"] == "torch.normal" else d["value"]
        if kind == "particles":
            v = v.transpose(0, 1)            # [N, 1, ...] (batch 1, sample shape N) -> [1, N, ...]
        if tuple(v.shape[1:]) != tuple(shape):
            raise ReplayError(f"draw {d['k']}: shape {list(v.shape)} does not fit our {kind!r} {list(shape)}")
        return v.to(device=device, dtype=dtype).clone()

    def resample(self, log_w, rows, scheme):
        d = self._next("torch.multinomial", 703, what="resampling indices")
        if scheme != "multinomial":
            raise ReplayError(f"the release resamples multinomially, ours is {scheme!r}")
        self.probs.append((log_w.exp().float(), d["probs"]))
        return d["value"].view(1, self.N).to(log_w.device)

    def categorical(self, log_w):
        raise ReplayError("the release selects the max-weight particle; select='sample' draws")


class Trace:
    """Collects the sampler's trace events (clones of every value)."""

    def __init__(self):
        self.ev = defaultdict(list)

    def __call__(self, event, **values):
        level = values.pop("level", None)
        if level is not None:
            values.update({f"level.{k}": v for k, v in vars(level).items()})
        self.ev[event].append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in values.items()})

    def of(self, event, j):
        return [e for e in self.ev[event] if e.get("gibbs_iter") == j]


def config_for(rec: dict, overrides: dict) -> LDSMCConfig:
    s = rec["settings"]
    kw = dict(preset="reference", num_particles=s["num_particles"], num_steps=s["num_timesteps"],
              kappa1=s["kappa1"], kappa2=s["kappa2"], rho=s["rho"], s=s["s"], sigma_y=s["sigma_y"],
              num_gibbs_iters=s["num_gibbs_iters"], xhat_max_iters=s["pixel_opt_max_iters"],
              xhat_lr=s["pixel_opt_lr"], refine_max_iters=s["latent_opt_max_iters"],
              refine_lr=s["latent_opt_lr"], select="max_weight", refine=True)
    kw.update(overrides)
    return LDSMCConfig(**kw)


class Comparison:
    """Worst relative error per quantity; exact checks for indices, pairings and draws."""

    def __init__(self):
        self.err, self.where, self.bad = {}, {}, []

    def close(self, name, ours, rec, where=""):
        if rec is None:
            return
        if ours is None or tuple(torch.as_tensor(ours).shape) != tuple(torch.as_tensor(rec).shape):
            e = math.inf
        else:
            o, r = torch.as_tensor(ours).double().cpu(), torch.as_tensor(rec).double().cpu()
            e = float((o - r).abs().max() / r.abs().max().clamp_min(1e-30)) if r.numel() else 0.0
            e = math.inf if math.isnan(e) else e
        if e >= self.err.get(name, -1.0):
            self.err[name], self.where[name] = e, where

    def same(self, name, ours, rec, where=""):
        ok = torch.equal(torch.as_tensor(ours).cpu(), rec.cpu()) if torch.is_tensor(rec) else ours == rec
        e = 0.0 if ok else math.inf
        if e >= self.err.get(name, -1.0):
            self.err[name], self.where[name] = e, where

    def failing(self, rtol):
        return sorted(n for n, e in self.err.items() if not e <= rtol) + self.bad


def compare_iteration(c: Comparison, tr: Trace, rec: dict, j: int, T: int, N: int):
    """Compare Gibbs iteration j. With N = 1 both samplers skip the weights (and the moments
    of z_0, which only the log prior uses): those terms are not compared then."""
    g = rec["gibbs"][j]
    at = lambda i: f"gibbs {j}, step {i}"
    skip = {"ll_yt_zt", "ll_y0_zt", "log_weights", "log_prior", "log_pi", "log_weights_normalized"} if N == 1 else set()
    # Section 2: pseudo-inverse and heuristic path (iteration 0), auxiliary observations (all).
    if j == 0:
        (pinv,) = tr.ev["pseudo_inverse"]
        c.close("z0_init", pinv["z_init"], rec["z0_init"])
        c.close("aux.x_hat_start", pinv["x_init"], g["aux"]["x_hat_start"])
        c.close("aux.x_hat_end", pinv["x_hat"], g["aux"]["x_hat_end"])
        c.close("aux.z0_hat", pinv["zhat0"], g["aux"]["z0_hat"])
        c.close("aux.pixel_losses", torch.stack([e["loss"][0] for e in tr.ev["pseudo_inverse_step"]]),
                g["aux"]["pixel_losses"])
    (aux,) = tr.of("aux_observations", j)
    if j == 0:
        c.close("aux.z_path", aux["path"], g["aux"]["z_path"])
    # release ys[k] belongs to the particles with alpha index k: our level m <-> k = T - m
    c.close("ys", aux["ys"], g["ys"].flip(0)[:-1], f"gibbs {j}")
    c.same("ys[0] is y", True, bool(torch.equal(g["ys"][0], rec["inputs"]["y"])))
    # Section 3, Start.
    (st,) = tr.of("start", j)
    ini = g["init"]
    c.same("init.ts", st["t"], ini["ts"], f"gibbs {j}")
    c.same("init.alpha_index", st["a"], ini["alpha_index"], f"gibbs {j}")
    for name, ours in (("z", st["level.z"]), ("e_t", st["level.eps"]), ("mu", st["level.mu"]),
                       ("bar_z0", st["level.zbar0"]), ("ll_yt_zt", st["l_aux"]), ("ll_y0_zt", st["level.lbar"]),
                       ("log_weights", st["log_w"][0]), ("sigma", st["sigma"]), ("y_t_std", st["y_var"] ** 0.5),
                       ("y_t_std", st["twist_var"] ** 0.5)):
        if name not in skip:
            c.close(f"init.{name}", ours, ini.get(name), f"gibbs {j}")
    # Section 3, loop: release pass i <-> our transition i.
    steps = tr.of("transition", j)
    c.same("number of transitions", len(steps), len(g["transitions"]), f"gibbs {j}")
    parent = st
    for i, (ours, t) in enumerate(zip(steps, g["transitions"])):
        a = ours["ancestors"][0]
        c.same("transitions.resampled", bool(ours["resampled"][0]), t["resampled"], at(i))
        if t["resampled"]:
            c.same("transitions.ancestors", a, t["ancestors"], at(i))
        pick = lambda v: None if v is None else v[a]   # the release's pre-resampling rows, ours after
        c.close("transitions.g1", parent["level.g1"], t["g1"], at(i))
        c.close("transitions.g1_norm_raw", parent["level.g1_norm"], t["g1_norm_raw"], at(i))
        c.same("transitions.proposal_branch", ours["g2"] is not None, t["g2"] is not None or t["g2_norm_raw"] is not None, at(i))
        c.close("transitions.g2", ours["g2"], pick(t["g2"]), at(i))
        c.close("transitions.g2_norm_raw", ours["g2_norm"], pick(t["g2_norm_raw"]), at(i))
        c.close("transitions.proposal_mean", ours["m_pi"], pick(t["proposal_mean"]), at(i))
        c.close("transitions.proposal_std", ours["sigma"], t["proposal_std"], at(i))
        if not skip:
            c.close("transitions.log_normalized_weights", ours["log_w_prev"][0], t["log_normalized_weights"], at(i))
            c.close("transitions.ll_y0_ztp1", ours["lbar_prev"], t["ll_y0_ztp1"], at(i))
        c.close("transitions.z_new", ours["level.z"], t["z_new"], at(i))
        c.same("transitions.ts_unet", ours["t"], t["ts_unet"], at(i))
        c.same("transitions.alpha_index", ours["a"], t["moments_alpha_index"], at(i))
        c.same("transitions.y_index", T - (i + 1), t["y_index"], at(i))
        if not (skip and t["last_step"]):
            c.close("transitions.e_t", ours["level.eps"], t["e_t"], at(i))
            # the release's moments at z_new are both the next proposal's mean and its log prior's
            c.close("transitions.mu", ours["level.mu"] if not t["last_step"] else ours["level.mu_prior"],
                    t["mu"], at(i))
            c.close("transitions.mu (log prior)", ours["level.mu_prior"], t["mu"], at(i))
            c.close("transitions.bar_z0", ours["level.zbar0"], t["bar_z0"], at(i))
            c.close("transitions.sigma_used", ours["sigma_prior"], t["sigma_used"], at(i))
        if not t["last_step"]:
            c.close("transitions.sigma_moments", ours["sigma_prior"], t["sigma_moments"], at(i))
            # the release's twist shares the std of l(y_t | z_t)
            c.close("transitions.y_t_std (twist)", ours["twist_var"] ** 0.5, t.get("y_t_std"), at(i))
        c.close("transitions.y_t_std", ours["y_var"] ** 0.5, t.get("y_t_std"), at(i))
        terms = (("ll_yt_zt", ours["l_aux"]), ("ll_y0_zt", ours["level.lbar"]), ("log_prior", ours["log_prior"]),
                 ("log_pi", ours["log_pi"]), ("log_weights", ours["log_w"][0]),
                 ("log_weights_normalized", torch.log_softmax(ours["log_w"][0].double(), 0)))
        for name, value in terms:
            if name not in skip:
                c.close(f"transitions.{name}", value, t.get(name), at(i))
        c.same("transitions.last_step", i == len(steps) - 1, t["last_step"], at(i))
        parent = ours
    # End: selection, the selected ancestry, x0; refinement.
    (sel,) = tr.of("select", j)
    c.same("final.selected_index", int(sel["selected"][0]), g["final"]["selected_index"], f"gibbs {j}")
    states = torch.stack([st["level.z"].view(1, N, -1)] + [s["level.z"].view(1, N, -1) for s in steps])
    path = selected_path(states, sel["ancestors"], sel["selected"])[:, 0]
    c.close("final.z_path_selected", path.flip(0).view(g["final"]["z_path_selected"].shape),
            g["final"]["z_path_selected"], f"gibbs {j}")
    c.close("final.z0", sel["z0"], g["final"]["z0"], f"gibbs {j}")
    c.close("final.x0", sel["x0"][0], g["final"]["x0"], f"gibbs {j}")
    refine_steps = [e for e in tr.ev["refine_step"] if e["gibbs_iter"] == j]
    refined = tr.of("refine", j)
    c.same("refine ran", len(refined), 1, f"gibbs {j}")
    if refine_steps and refined:
        c.close("refine.init_loss", refine_steps[0]["loss"][0], g["refine"]["init_loss"], f"gibbs {j}")
        c.close("refine.losses", torch.stack([e["loss"][0] for e in refine_steps]), g["refine"]["losses"], f"gibbs {j}")
        c.close("refine.iterates", torch.stack([sel["z0"]] + [e["z"] for e in refine_steps]),
                g["refine"]["iterates"], f"gibbs {j}")
        c.close("refine.z0_opt", refined[0]["z_opt"], g["refine"]["z0_opt"], f"gibbs {j}")
        c.close("refine.x0_opt", refined[0]["x_opt"][0], g["refine"]["x0_opt"], f"gibbs {j}")


def replay(rec: dict, overrides: dict | None = None, ckpt: Path = COMPACT / "compact_ldm.ckpt",
           model=None) -> Comparison:
    """Run our sampler on the recording's draws and compare; returns the Comparison.

    model: a compact model to reuse (its schedule is set to the recording's); None loads `ckpt`.
    """
    torch.set_num_threads(1)
    s = rec["settings"]
    T, N, J = s["num_timesteps"], s["num_particles"], s["num_gibbs_iters"]
    if model is None:
        model = compact_model(rec, ckpt)
    else:
        model.set_schedule(rec["schedule"]["betas_float64"])
        model.alphas_cumprod = rec["schedule"]["alphas_cumprod_float32"].clone()
    mask = rec["inputs"]["mask"]
    draws, tr, c = ReplayDraws(rec["draws"], N), Trace(), Comparison()
    try:
        res = ld_smc_sample(model, lambda x: x * mask, rec["inputs"]["y"], config_for(rec, overrides or {}),
                            generator=draws, trace=tr)
    except ReplayError as e:
        c.bad.append(f"draw sequence ({e})")
        return c
    c.same("draws consumed", draws.pos, len(rec["draws"]))
    for ours, probs in draws.probs:
        c.close("draws.probs (resampling)", ours, probs)
    for j in range(J):
        compare_iteration(c, tr, rec, j, T, N)
    c.close("outputs.x0", res.x0_per_gibbs[:, 0], rec["outputs"]["x0"])
    c.close("outputs.x0_opt", None if res.x0_refined_per_gibbs is None else res.x0_refined_per_gibbs[:, 0],
            rec["outputs"]["x0_opt"])
    return c


def parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return None if low == "none" else text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recording", type=Path)
    p.add_argument("--base", type=Path, default=None, help="recording with the tensors iteration 0 omits")
    p.add_argument("--rtol", type=float, default=1e-5, help="largest relative error accepted")
    p.add_argument("--ckpt", type=Path, default=COMPACT / "compact_ldm.ckpt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sampler setting (e.g. a release switch turned off: the check must then fail)")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set wants KEY=VALUE, got {item!r}")
        overrides[key] = parse_value(value)
    rec = load_recording(args.recording, args.base)
    c = replay(rec, overrides, args.ckpt)
    s = rec["settings"]
    print(f"{args.recording}: N={s['num_particles']} T={s['num_timesteps']} J={s['num_gibbs_iters']}, "
          f"{len(rec['draws'])} draws; preset reference{' with ' + str(overrides) if overrides else ''}")
    print(f"{'quantity':44s} {'worst rel. err':>14s}  where")
    for name in sorted(c.err):
        e = c.err[name]
        mark = "" if e <= args.rtol else "  FAIL"
        print(f"{name:44s} {e:14.2e}  {c.where[name]}{mark}")
    failing = c.failing(args.rtol)
    if failing:
        print(f"NOT reproduced (rtol {args.rtol:g}): " + "; ".join(failing))
        return 1
    print(f"reproduced: every recorded quantity within rtol {args.rtol:g}, every index and draw exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
