"""Restore images with LD-SMC (or another method): measure each image of a folder, sample the posterior,
write the outputs.

    python sample_condition.py                     # the demo: box inpainting of held-out digits
    python sample_condition.py --task_config configs/tasks/inpainting_config.yaml --num_particles 5
    python sample_condition.py --method ltds       # latent TDS, a baseline of the paper

Takes the authors' flags (`--ldm_config`, `--diffusion_config` = the LDM checkpoint,
`--task_config`, `--save_dir`, `--ddim_steps`, `--kappa1`, `--kappa2`, `--rho`, `--s`,
`--num_particles`, `--num_gibbs_iters`, `--gpu`, `--seed`) and ours (`--method`, `--preset`,
`--batch_size`, `--device`, `--max_images`, `--shard`, `--overwrite`, and dotted `key=value`
overrides of the task config, e.g. `data.root=../shared/data/ffhq-samples`).

The method (`guided_diffusion.methods`): --method, else the task's conditioning.method, else
ld_smc. Its settings, later wins: its YAML defaults (configs/methods/<name>.yaml) < the task's
`sampler:` section (keys it does not have are skipped) < the flags given (see
util/cli.resolve_method). Outputs go to <save_dir>/<method>/<task>/.
Every image i gets its own torch.Generator seeded from (seed, i), used for its mask, its
measurement noise and its sampler draws, so a result does not depend on the batch it ran
in, and a rerun resumes where the last one stopped (see util/outputs.py for the tree).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from util.cli import (AUTHORS_MODEL, PROJECT_ROOT, build_parser, resolve_method, resolve_path, select_device,
                      shard_of)


class Restorer:
    """One run's model, operator, noise, data and outputs; `restore(indices)` does a batch of images."""

    def __init__(self, task, method, device, seed: int, ldm_config: Path, ckpt: Path | None, task_path: Path,
                 resolve, log):
        from data.dataset import get_dataset
        from guided_diffusion.measurements import get_noise, get_operator
        from ldm import load_model
        from util.config import ConfigError
        from util.masks import MaskGenerator

        self.task, self.method, self.device, self.seed, self.log = task, method, device, seed, log
        self.ldm_config, self.ckpt, self.task_path = ldm_config, ckpt, task_path
        if method.settings().get("select") == "all":
            raise ConfigError("sampler.select=all keeps every particle; the CLI writes one reconstruction "
                              "per image: use select=max_weight or select=sample")
        meas = task.measurement
        op_kwargs = {k: v for k, v in meas.operator.items() if k != "name"}
        if meas.operator["name"] == "motion_blur" and "seed" not in op_kwargs and "kernel" not in op_kwargs:
            op_kwargs["seed"] = seed  # one motion kernel per run, from --seed
        try:
            self.operator = get_operator(meas.operator["name"], device=device, **op_kwargs)
            self.noise = get_noise(meas.noise["name"], **{k: v for k, v in meas.noise.items() if k != "name"})
            self.masks = MaskGenerator.from_config(meas.mask_opt) if meas.operator["name"] == "inpainting" else None
        except (TypeError, ValueError, NameError, KeyError) as e:
            raise ConfigError(f"task {task_path}, section measurement: {e}") from None
        method.check_applicable(self.operator, meas.operator["name"])  # before the (slow) model load
        self.model = load_model(ldm_config, device=device, ckpt=ckpt)
        if self.ckpt is None:  # the model config's own ckpt_path: record the file that was read
            from ldm.checkpoint import resolve_path as resolve_ckpt
            from ldm.config import read_config
            path = read_config(ldm_config).get("params", {}).get("ckpt_path")
            self.ckpt = resolve_ckpt(path) if path else None
        size = self.model.image_shape[-1]
        checks = [("data.image_size", task.data.image_size),
                  ("measurement.mask_opt.image_size", (meas.mask_opt or {}).get("image_size")),
                  ("measurement.operator.in_shape", (meas.operator.get("in_shape") or [None])[-1])]
        for key, value in checks:
            if value is not None and int(value) != size:
                raise ConfigError(f"task {task_path}: {key} is {value}, but the model {ldm_config} makes "
                                  f"{size}x{size} images: use a task made for this model, or set {key}={size}")
        self.dataset = get_dataset(task.data.name, resolve(task.data.root), image_size=size)
        self.labels = self._labels(resolve) if self.model.cond_stage is not None else None
        self.lpips, self.lpips_note = self._lpips()

    def _labels(self, resolve):
        """Class labels per image for a class-conditional model: data.class_label or data.labels_file."""
        from util.config import ConfigError

        data = self.task.data
        if data.class_label is not None:
            return [int(data.class_label)] * len(self.dataset)
        if data.labels_file is None:
            raise ConfigError(f"the model {self.ldm_config} is class-conditional: give data.class_label=<label> "
                              f"or data.labels_file=<file of 'filename label' lines>")
        path = resolve(data.labels_file)
        if not path.is_file():
            raise ConfigError(f"data.labels_file {path} does not exist (a text file of 'filename label' lines)")
        table = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.replace(",", " ").split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ConfigError(f"{path}, line {n}: expected 'filename label', got {line!r}")
            table[parts[0]] = int(parts[1])
        missing = [f.name for f in self.dataset.files if f.name not in table]
        if missing:
            raise ConfigError(f"{path} has no label for {missing[:3]} (and {max(0, len(missing) - 3)} more)")
        return [table[f.name] for f in self.dataset.files]

    def _lpips(self):
        """LPIPS(alex) if its backbone weights are on disk; else None and the reason (never random weights)."""
        from util.metrics import LPIPS, MissingWeightsError

        try:
            return LPIPS("alex", device=self.device), "LPIPS(alex)"
        except (MissingWeightsError, ImportError) as e:
            self.log.info(f"LPIPS unavailable: {e}")
            return None, f"unavailable: {e}"

    def prepare_outputs(self, save_dir, overwrite: bool, only=None):
        """The output tree, checked against (or reset to, for images `only` if given) this run's settings."""
        from util.outputs import OutputTree

        self.tree = OutputTree(save_dir, self.method.name, self.task.name)
        self.tree.prepare(self.settings(), overwrite=overwrite, only=only)
        return self.tree

    def settings(self) -> dict:
        """What determines the results (a resumed run must match it)."""
        return {"task": self.task.to_dict(), "method": self.method.name, "sampler": self.method.settings(),
                "seed": self.seed,
                "model_config": str(self.ldm_config.resolve()),
                "checkpoint": str(self.ckpt.resolve()) if self.ckpt else None}

    def restore(self, indices: list[int], make_figures: bool = True) -> None:
        """Measure, sample and write the outputs of images `indices` (one generator per image)."""
        import torch
        from tqdm import tqdm

        from util.config import ConfigError
        from util.figures import measurement_images, restoration_figure
        from util.images import to_uint8
        from util.masks import generator_for_index, mask_for_index
        from util.files import atomic_write_bytes

        try:
            items = [self.dataset[i] for i in indices]
        except ValueError as e:  # an unreadable image file: the message names it
            raise ConfigError(str(e)) from None
        x = torch.stack([item[1] for item in items]).to(self.device)
        gens = [generator_for_index(self.seed, i, "sample", device=self.device) for i in indices]
        mask = None
        if self.masks is not None:
            mask = torch.stack([mask_for_index(self.masks, self.seed, i, device=self.device) for i in indices])
            self.operator.set_mask(mask)
        with torch.no_grad():
            y = self.noise(self.operator(x), generator=gens)
        cond = (torch.tensor([self.labels[i] for i in indices], device=self.device)
                if self.labels is not None else None)
        steps = self.method.num_callbacks(len(self.model.alphas_cumprod))
        with tqdm(total=steps, desc=f"images {indices[0]}-{indices[-1]}", unit="step", leave=False,
                  dynamic_ncols=True) as bar:
            t0 = time.time()
            res = self.method(self.model, self.operator, y, generator=gens, cond=cond,
                              callback=lambda state: bar.update(1))
            seconds = (time.time() - t0) / len(indices)
        ess, selected = getattr(res, "ess", None), getattr(res, "selected", None)  # SMC methods only
        n_particles = self.method.settings().get("num_particles")
        label_img = measurement_images(y, self.task.measurement.operator["name"])
        m = self._metrics(x, res.x0, res.x0_refined, y if label_img is not None and y.shape == x.shape else None)
        tree = self.tree
        for b, i in enumerate(indices):
            tree.save_png("input", i, to_uint8(x[b]))
            if label_img is not None:
                tree.save_png("label", i, label_img[b])
            tree.save_png("recon", i, to_uint8(res.x0[b]))
            if res.x0_refined is not None:
                tree.save_png("recon_opt", i, to_uint8(res.x0_refined[b]))
            if mask is not None:
                tree.save_png("mask", i, to_uint8(mask[b], value_range=(0.0, 1.0))[..., 0])
            if make_figures:
                panels = [("measurement", label_img[b] if label_img is not None else None),
                          (self.method.name, to_uint8(res.x0[b]))]
                if res.x0_refined is not None:
                    panels.append(("refined", to_uint8(res.x0_refined[b])))
                panels.append(("ground truth", to_uint8(x[b])))
                title = f"{self.task.name} {i:05d} ({items[b][2]}), {self.method.name}"
                atomic_write_bytes(tree.path("figures", i), restoration_figure(
                    panels, ess[b].cpu().numpy() if ess is not None else None, n_particles or 1,
                    title=title + (f", N = {n_particles}" if n_particles else "")))
            record = {"index": i, "file": items[b][2], "seconds": seconds,
                      "class_label": None if self.labels is None else self.labels[i],
                      "selected_particle": int(selected[b]) if selected is not None else None,
                      "final_ess": float(ess[b, -1]) if ess is not None else None}
            record.update({k: v[b] for k, v in m.items()})
            tree.save_record(i, record)  # last: marks image i as done

    def _metrics(self, x, recon, recon_opt, measurement) -> dict:
        """Per-image PSNR / SSIM (on [0, 1]) and LPIPS (on [-1, 1]) of each output against the ground truth."""
        import torch

        from util.images import to_unit
        from util.metrics import psnr, ssim

        out = {}
        for name, img in (("recon", recon), ("recon_opt", recon_opt), ("measurement", measurement)):
            if img is None:
                continue
            img = img.clamp(-1, 1)
            out[f"psnr_{name}"] = psnr(to_unit(img), to_unit(x)).tolist()
            out[f"ssim_{name}"] = ssim(to_unit(img), to_unit(x)).tolist()
            if self.lpips is not None:
                with torch.no_grad():
                    out[f"lpips_{name}"] = self.lpips(img, x).tolist()
        return out

    def summarise(self, indices) -> dict:
        """Write metrics.csv and summary.json for images `indices`; return the summary."""
        import torch

        from util.logging import git_commit, package_version
        from util.outputs import METRIC_COLUMNS, mean_std

        records = self.tree.records(indices)
        self.tree.write_metrics_csv(records)
        keys = [k for k in METRIC_COLUMNS if k.split("_")[0] in ("psnr", "ssim", "lpips")] + ["seconds"]
        stats = mean_std(records, keys)

        def mean(k):
            return stats[k]["mean"] if stats.get(k) else None
        summary = {
            "task": self.task.name, "task_config": str(self.task_path), "images": len(records),
            "comparison": {"n": len(records), "psnr_recon": mean("psnr_recon"),
                           "psnr_recon_opt": mean("psnr_recon_opt"),
                           "psnr_measurement": mean("psnr_measurement"),
                           "psnr_gain_db": (mean("psnr_recon") - mean("psnr_measurement")
                                            if mean("psnr_recon") is not None and mean("psnr_measurement") is not None
                                            else None)},
            "metrics": stats, "lpips": self.lpips_note, "method": self.method.name,
            "preset": self.method.settings().get("preset"), "sampler": self.method.settings(),
            "config": self.settings(),
            "version": package_version(), "git_commit": git_commit(), "device": str(self.device),
            "torch": torch.__version__,
        }
        self.tree.write_summary(summary)
        return summary


def run(args) -> dict:
    """Load everything, restore the images not yet done, write metrics.csv and summary.json; return the summary."""
    import torch
    from tqdm import tqdm

    from guided_diffusion.methods import method_fields
    from util.config import ConfigError, load_task
    from util.logging import get_logger

    log = get_logger()
    if args.threads:
        torch.set_num_threads(args.threads)
    task_path = resolve_path(args.task_config)
    task = load_task(task_path, args.overrides, sampler_fields=sorted(method_fields()))
    method = resolve_method(args, task, log)
    device = select_device(args)
    shard, n_shards = shard_of(args.shard)
    for flag, value in (("--ddim_eta", args.ddim_eta), ("--ddim_scale", args.ddim_scale)):
        if value != 1.0:
            raise ConfigError(f"{flag} {value} is not supported: LD-SMC (here and in the authors' code) "
                              f"runs with {flag} 1.0")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ConfigError(f"--max_images must be >= 1, got {args.max_images}")

    restorer = Restorer(task, method, device, seed=args.seed,
                        ldm_config=resolve_path(args.ldm_config or task.model.config or AUTHORS_MODEL),
                        ckpt=resolve_path(args.diffusion_config or task.model.ckpt),
                        task_path=task_path, resolve=resolve_path, log=log)
    max_images = args.max_images or task.data.max_images
    n_total = len(restorer.dataset) if max_images is None else min(max_images, len(restorer.dataset))
    mine = [i for i in range(n_total) if i % n_shards == shard]
    tree = restorer.prepare_outputs(args.save_dir, overwrite=args.overwrite, only=mine if n_shards > 1 else None)
    todo = [i for i in mine if not tree.is_done(i)]
    where = f" (shard {shard}/{n_shards}: {len(mine)} of them)" if n_shards > 1 else ""
    shown = ", ".join(f"{k} {v}" for k, v in method.settings().items()
                      if k in ("preset", "num_particles", "num_steps"))
    log.info(f"task {task.name}: {n_total} images{where}, {len(mine) - len(todo)} already done; model "
             f"{restorer.ldm_config}; device {device}; method {method.name} ({shown}); outputs in {tree.root}")
    batch_size = args.batch_size or task.data.batch_size
    with tqdm(total=len(todo), desc="images", unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            restorer.restore(todo[start:start + batch_size], make_figures=not args.no_figures)
            bar.update(len(todo[start:start + batch_size]))
    summary = restorer.summarise(range(n_total))
    comp = summary["comparison"]
    if comp["psnr_recon"] is not None:
        line = (f"mean PSNR over {comp['n']} images: reconstruction {comp['psnr_recon']:.2f} dB, "
                f"refined {comp['psnr_recon_opt']:.2f} dB" if comp["psnr_recon_opt"] is not None else
                f"mean PSNR over {comp['n']} images: reconstruction {comp['psnr_recon']:.2f} dB")
        if comp["psnr_measurement"] is not None:
            line += (f", measurement {comp['psnr_measurement']:.2f} dB "
                     f"({comp['psnr_recon'] - comp['psnr_measurement']:+.2f} dB)")
        print(line)
    print(f"outputs: {tree.root}")
    return summary


def user_errors() -> tuple:
    """The project's error classes whose message tells the user what to fix (printed without a traceback)."""
    from util.config import ConfigError

    errors = [ConfigError, FileNotFoundError, NotADirectoryError]
    for module, name in (("ldm", "CheckpointNotFoundError"), ("ldm", "CheckpointMismatchError"),
                         ("ldm", "ConfigError"), ("util.metrics", "MissingWeightsError"),
                         ("guided_diffusion.methods", "MethodError")):
        try:
            cls = getattr(__import__(module, fromlist=[name]), name, None)
        except ImportError:
            cls = None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: returns 0 on success, 2 on a user error (printed as `error: ...`, no traceback)."""
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    args = build_parser().parse_intermixed_args(argv)
    try:
        run(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished images are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
