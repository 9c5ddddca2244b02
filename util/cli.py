"""Command-line options of `sample_condition.py`: the parser, the method and its settings, paths,
the device and the shard.

Kept apart from the script so that the script reads as what it does (load, restore,
write) and these small rules can be tested on their own.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_TASK = "configs/tasks/demo/inpainting_config.yaml"
DEFAULT_METHOD = "ld_smc"
# The authors' sampler flags and the method setting each one sets.
FLAG_SETTINGS = {"--num_particles": "num_particles", "--kappa1": "kappa1", "--kappa2": "kappa2", "--rho": "rho",
                 "--s": "s", "--num_gibbs_iters": "num_gibbs_iters", "--ddim_steps": "num_steps",
                 "--preset": "preset"}
AUTHORS_MODEL = "configs/models/ffhq-ldm-vq-4.yaml"  # the authors' default model (FFHQ LDM)


def build_parser() -> argparse.ArgumentParser:
    """The command line: the authors' flags first, then ours. `None` defaults mean 'from the task / sampler'."""
    p = argparse.ArgumentParser(
        prog="sample_condition", description="Restore images with LD-SMC: measure each image of a folder, sample the posterior, write the outputs.")
    a = p.add_argument_group("the authors' flags")
    a.add_argument("--ldm_config", default=None,
                   help="model config YAML (CompVis layout); default: the task's model.config, else the FFHQ LDM "
                        f"({AUTHORS_MODEL}, the authors' default)")
    a.add_argument("--diffusion_config", default=None,
                   help="the LDM checkpoint (.ckpt or .safetensors); default: the model config's ckpt_path")
    a.add_argument("--task_config", default=DEMO_TASK, help=f"task YAML (DPS / LD-SMC layout); default: {DEMO_TASK}, the demo")
    a.add_argument("--save_dir", default="./results",
                   help="outputs go to SAVE_DIR/<method>/<task name>/ (default ./results)")
    a.add_argument("--ddim_steps", type=int, default=None,
                   help="timesteps on the chain 999 -> 0 (1000: the full chain, the authors' default)")
    a.add_argument("--kappa1", type=float, default=None, help="first gradient scale (default 1.0)")
    a.add_argument("--kappa2", type=float, default=None, help="second gradient scale (default 2.5)")
    a.add_argument("--rho", type=float, default=None, help="balance of the two guidance terms (default 0.75)")
    a.add_argument("--s", type=int, default=None, help="timestep at which the proposal switches (default 333)")
    a.add_argument("--num_particles", type=int, default=None, help="particles per image (default 1)")
    a.add_argument("--num_gibbs_iters", type=int, default=None, help="Gibbs iterations (default 1)")
    a.add_argument("--ddim_eta", type=float, default=1.0,
                   help="DDIM eta; LD-SMC's transitions are the eta = 1 (DDPM) ones, so only 1.0 is accepted")
    a.add_argument("--ddim_scale", type=float, default=1.0,
                   help="classifier-free guidance scale; the authors pass no unconditional conditioning, "
                        "so only 1.0 (no guidance) is accepted")
    a.add_argument("--model_config", default=None, help="accepted and unused, as in the authors' script")
    a.add_argument("--gpu", type=int, default=None,
                   help="CUDA device index (default 0, or LOCAL_RANK under torchrun); -1 or no CUDA: the CPU")
    a.add_argument("--seed", type=int, default=42, help="seed (default 42); image i draws from generators seeded by (seed, i)")
    o = p.add_argument_group("our flags")
    o.add_argument("--method", default=None,
                   help=f"posterior sampler (guided_diffusion.methods: ld_smc, ltds, ...); default: the task's "
                        f"conditioning.method, else {DEFAULT_METHOD}")
    o.add_argument("--preset", choices=("reference", "exact"), default=None,
                   help="'reference' reproduces the authors' code (default), 'exact' the model the paper's analysis assumes")
    o.add_argument("--protocol", choices=("per_image", "release"), default=None,
                   help="per_image: image i draws its mask, noise and sampler randomness from generators seeded by "
                        "(seed, i); release: every image the same draws, as the authors' release (default: the "
                        "task's protocol, else per_image)")
    o.add_argument("--batch_size", type=int, default=None, help="images sampled together (default: data.batch_size)")
    o.add_argument("--device", default=None, help="torch device (cpu, cuda, cuda:1, mps); wins over --gpu")
    o.add_argument("--max_images", type=int, default=None, help="restore only the first this many images")
    o.add_argument("--shard", default=None, metavar="K/N",
                   help="restore only images i with i mod N == K (several processes or GPUs share one task "
                        "folder); default: torchrun's RANK/WORLD_SIZE, else 0/1 (all images)")
    o.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist (default: resume)")
    o.add_argument("--no_figures", action="store_true", help="skip the per-image figures")
    o.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: torch's choice less the cores that other processes "
                        "keep busy, at least 1)")
    o.add_argument("overrides", nargs="*", metavar="key=value",
                   help="task config overrides, e.g. data.root=path measurement.noise.sigma=0.05")
    return p


def sampler_override_keys(overrides) -> set[str]:
    """The `sampler.KEY` names set by dotted overrides on the command line."""
    from util.config import parse_override

    keys = set()
    for text in overrides:
        parts, _ = parse_override(text)
        if parts[0] == "sampler" and len(parts) > 1:
            keys.add(parts[1])
    return keys


def resolve_method(args, task, log):
    """The `Method` to run and where each of its settings came from.

    Name: --method, else the task's conditioning.method, else ld_smc. Settings, later wins:
    the method's YAML defaults (configs/methods/<name>.yaml) < the task's `sampler:` section
    (keys the method does not have are skipped, with one log line naming them: the demo
    tasks' sections hold LD-SMC's particle settings) < the flags given. A flag, or a
    `sampler.KEY=...` override, that the method does not have is an error.
    """
    from guided_diffusion.methods import METHODS, MethodError, available_methods, get_method, method_fields
    from util.config import ConfigError, check_types

    name = args.method or task.conditioning.get("method") or DEFAULT_METHOD
    source = "--method" if args.method else ("conditioning.method" if task.conditioning.get("method") else None)
    if not isinstance(name, str) or name not in available_methods():
        raise MethodError(f"unknown method {name!r}{f' (from {source})' if source else ''}; "
                          f"choose one of {', '.join(available_methods())}")
    fields = method_fields([name])
    listed = ", ".join(sorted(fields))
    values, where = {}, {}
    from_overrides = sampler_override_keys(args.overrides)
    skipped = []
    for key, value in task.sampler.items():
        if key in fields:
            values[key], where[key] = value, f"sampler.{key}"
        elif key in from_overrides:
            raise ConfigError(f"sampler.{key}: method {name!r} has no setting {key!r}; its settings: {listed}")
        else:
            skipped.append(key)
    if skipped:
        log.info(f"method {name}: skipping the task's sampler setting(s) {', '.join(sorted(skipped))} "
                 f"(not settings of {name})")
    for flag, key in FLAG_SETTINGS.items():
        value = getattr(args, flag[2:])
        if value is None:
            continue
        if key not in fields:
            raise ConfigError(f"{flag}: method {name!r} has no setting {key!r}; drop the flag or choose a "
                              f"method that has it (its settings: {listed})")
        values[key], where[key] = value, flag
    noise = task.measurement.noise
    if "sigma_y" in fields and "sigma_y" not in values and noise["name"] == "gaussian":
        sigma = noise.get("sigma")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ConfigError(f"measurement.noise.sigma is {sigma}: method {name!r} needs a noise std > 0 for its "
                              f"likelihood (its sigma_y); for nearly noiseless measurements use e.g. "
                              f"measurement.noise.sigma=0.001, or set sampler.sigma_y")
        values["sigma_y"], where["sigma_y"] = float(sigma), "measurement.noise.sigma"
    check_types(METHODS[name].config_cls, values, where, who=f"method {name!r}")
    if "s" in values and not 0 <= values["s"] <= 1000:
        raise ConfigError(f"{where['s']} must be a timestep in [0, 1000] (the proposal switches at t <= s; "
                          f"the chain runs t = 999 -> 0), got {values['s']}")
    return get_method(name, dataset=task.data.name, **values)


def resolve_path(path: str | Path | None) -> Path | None:
    """`ldm.checkpoint.resolve_path` (current folder first, then the project root); None stays None."""
    from ldm.checkpoint import resolve_path as resolve

    return None if path is None else resolve(path)


def check_flags(args) -> None:
    """Range checks of the flags that are not method settings (those are checked by resolve_method)."""
    from util.config import ConfigError

    for flag, value in (("--ddim_eta", args.ddim_eta), ("--ddim_scale", args.ddim_scale)):
        if value != 1.0:
            raise ConfigError(f"{flag} {value} is not supported: LD-SMC (here and in the authors' code) "
                              f"runs with {flag} 1.0")
    for flag, value, low in (("--batch_size", args.batch_size, 1), ("--max_images", args.max_images, 1),
                             ("--threads", args.threads, 1), ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}"
                              + (" (leave it out for the default)" if flag == "--threads" else ""))


def cpu_snapshot():
    """(monotonic seconds, CPU seconds all processes have been busy, this process's CPU seconds),
    from Linux's /proc/stat; None elsewhere. Two snapshots give the cores other processes kept
    busy in between (`busy_cores`)."""
    import time

    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    # user nice system idle iowait irq softirq [steal ...]: busy = all but idle, iowait and steal
    busy = sum(fields[:3]) + sum(fields[5:7])
    own = os.times()
    return time.monotonic(), busy / ticks, own.user + own.system


# Taken when the CLI is imported, so that the start-up (imports, argument parsing) is the window
# over which the other processes' load is measured.
_START = cpu_snapshot()


def busy_cores(start=None, end=None, min_window: float = 0.25) -> float | None:
    """Cores other processes kept busy between two `cpu_snapshot`s (default: since this module was
    imported, until now, at least `min_window` seconds); None where it cannot be measured."""
    import time

    start = start if start is not None else _START
    if start is None:
        return None
    if end is None:
        time.sleep(max(0.0, min_window - (time.monotonic() - start[0])))
        end = cpu_snapshot()
        if end is None:
            return None
    wall = end[0] - start[0]
    if wall <= 0:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall)


def cpu_threads(torch_default: int, load: float | None = None, cores: int | None = None) -> int:
    """Threads for a CPU run without --threads: torch's default less the cores other processes keep busy.

    Torch's default (one thread per core) ignores other load, and an oversubscribed run is
    several times slower: the demo on a 2-core machine with one core busy took 166 s with 2
    threads and 66 s with 1 (35 s with 2 threads when idle). `load` is the number of busy
    cores: by default measured now (`busy_cores`: the machine's busy time less this
    process's, over the start-up), else the 1-minute load average, which lags a minute behind
    the machine (an idle machine just after a heavy job looks busy); `cores` the cores this
    process may use; at least 1 thread.
    """
    if load is None:
        load = busy_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            return torch_default
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch_default, cores - int(load + 0.5)))


def select_device(args):
    """--device wins; else cuda:<gpu> when CUDA is there and gpu >= 0; else the CPU (the authors' --gpu)."""
    import torch

    from util.config import ConfigError

    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ConfigError(f"--device {args.device!r} is not a torch device ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device} asked for CUDA, but torch sees no CUDA device: use --device cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {args.device}: there are only {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ConfigError(f"--device {args.device}: this torch build sees no MPS device (Apple GPUs only): "
                              f"use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            try:
                torch.empty(1, device=device)
            except Exception as e:  # noqa: BLE001 - any backend's failure means the same to the user
                raise ConfigError(f"--device {args.device}: torch cannot use it here ({type(e).__name__}): "
                                  f"use --device cpu") from None
        return device
    local_rank = os.environ.get("LOCAL_RANK", "0")
    if args.gpu is None and not local_rank.isdigit():
        raise ConfigError(f"LOCAL_RANK={local_rank!r} must be an integer >= 0 (as torchrun sets it)")
    gpu = args.gpu if args.gpu is not None else int(local_rank)
    if gpu >= 0 and torch.cuda.is_available():
        if gpu >= torch.cuda.device_count():
            raise ConfigError(f"--gpu {gpu}: there are only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(f"cuda:{gpu}")
    return torch.device("cpu")


def shard_of(text: str | None, env=os.environ) -> tuple[int, int]:
    """(K, N) from `--shard K/N`; else torchrun's RANK / WORLD_SIZE; else (0, 1).

    Image i belongs to shard i mod N. Every shard writes its own images into the same task
    folder (atomically), and each one's metrics.csv / summary.json covers all the images
    finished so far, so the last shard to end writes the complete tables.
    """
    from util.config import ConfigError

    if text is None:
        rank, world = env.get("RANK"), env.get("WORLD_SIZE")
        if rank is None and world is None:
            return 0, 1
        if rank is None or world is None:
            missing = "WORLD_SIZE" if world is None else "RANK"
            raise ConfigError(f"{'RANK' if rank is not None else 'WORLD_SIZE'} is set but {missing} is not: "
                              f"torchrun sets both; set both (or neither), or use --shard K/N")
        try:
            k, n = int(rank), int(world)
        except ValueError:
            raise ConfigError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers (as torchrun sets them)") \
                from None
        if not (n >= 1 and 0 <= k < n):
            raise ConfigError(f"RANK={k} WORLD_SIZE={n}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
        return k, n
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected K/N, e.g. --shard 0/4") from None
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"--shard {text}: need N >= 1 and 0 <= K < N")
    return k, n
