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
Protocol `per_image` (ours, the default): every image i gets its own torch.Generators seeded
from (seed, i), used for its mask, its measurement noise and its sampler draws, so a result
does not depend on the batch it ran in. Protocol `release` (the paper's task configs, or
--protocol release): as the authors' release, which re-seeds before every image, every image
uses the generators of index 0 (same mask, same noise draw, same starting particles). A
rerun resumes where the last one stopped (see util/outputs.py for the tree).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from util.cli import (AUTHORS_MODEL, PROJECT_ROOT, build_parser, check_flags, cpu_threads, resolve_method,
                      resolve_path, select_device, shard_of)


class SamplingError(RuntimeError):
    """The sampler failed on an image in a way the user can act on (the message names the image file)."""


def non_finite_weights_error() -> tuple:
    """smc.NonFiniteWeightsError where the sampler defines it (looked up, so older samplers still work)."""
    import smc

    cls = getattr(smc, "NonFiniteWeightsError", None)
    return (cls,) if isinstance(cls, type) and issubclass(cls, BaseException) else ()


class Restorer:
    """One run's model, operator, noise, data and outputs; `restore(indices)` does a batch of images."""

    def __init__(self, task, method, device, seed: int, ldm_config: Path, ckpt: Path | None, task_path: Path,
                 resolve, log):
        from data.dataset import get_dataset, read_labels
        from guided_diffusion.measurements import get_noise, get_operator
        from ldm import load_model
        from util.config import ConfigError
        from util.logging import git_commit
        from util.masks import MaskGenerator

        self.task, self.method, self.device, self.seed, self.log = task, method, device, seed, log
        self.ldm_config, self.ckpt, self.task_path = ldm_config, ckpt, task_path
        if method.settings().get("select") == "all":
            raise ConfigError("sampler.select=all keeps every particle; the CLI writes one reconstruction "
                              "per image: use select=max_weight or select=sample")
        meas = task.measurement
        self.operator_name = meas.operator["name"]
        op_kwargs = {k: v for k, v in meas.operator.items() if k != "name"}
        if self.operator_name == "motion_blur" and "seed" not in op_kwargs and "kernel" not in op_kwargs:
            op_kwargs["seed"] = seed  # one motion kernel per run, from --seed
        try:
            self.operator = get_operator(self.operator_name, device=device, **op_kwargs)
            self.noise = get_noise(meas.noise["name"], **{k: v for k, v in meas.noise.items() if k != "name"})
            self.masks = MaskGenerator.from_config(meas.mask_opt) if self.operator_name == "inpainting" else None
        except (TypeError, ValueError, NameError, KeyError) as e:
            raise ConfigError(f"task {task_path}, section measurement: {e}") from None
        method.check_applicable(self.operator, self.operator_name)  # before the (slow) model load
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
        try:
            self.dataset = get_dataset(task.data.name, resolve(task.data.root), image_size=size,
                                       resize=task.data.resize)
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ConfigError(f"data.root: {e}; set data.root=path/to/images (on the command line, or in the "
                              f"task's data: section)") from None
        self.labels = None
        if self.model.cond_stage is not None:
            data = task.data
            if data.class_label is not None:
                self.labels = [int(data.class_label)] * len(self.dataset)
            elif data.labels_file is None:
                raise ConfigError(f"the model {ldm_config} is class-conditional: give data.class_label=<label> "
                                  f"or data.labels_file=<file of 'filename label' lines>")
            else:
                try:
                    self.labels = read_labels(resolve(data.labels_file), self.dataset.files)
                except (FileNotFoundError, ValueError) as e:
                    raise ConfigError(str(e)) from None
        self.lpips, self.lpips_note = self._lpips()
        self.git_commit = git_commit()

    def _lpips(self):
        """LPIPS(alex) if its backbone weights are on disk; else None and the reason (never random weights)."""
        from util.config import ConfigError
        from util.metrics import LPIPS, MissingWeightsError

        try:
            return LPIPS("alex", device=self.device), "LPIPS(alex)"
        except (MissingWeightsError, ImportError) as e:
            self.log.info(f"LPIPS unavailable: {e}")
            return None, f"unavailable: {e}"
        except ValueError as e:  # a weights file that is there but unreadable: say so before sampling
            raise ConfigError(str(e)) from None

    def draw_index(self, i: int) -> int:
        """Whose generators image i uses: its own (per_image), or image 0's for all (release, see util/config.py)."""
        return 0 if self.task.protocol == "release" else i

    def settings(self) -> dict:
        """What determines the results (a resumed run must match it); batch size and image count do not."""
        task = self.task.to_dict()
        task["data"] = {k: v for k, v in task["data"].items() if k not in ("batch_size", "max_images")}
        return {"task": task, "protocol": self.task.protocol, "method": self.method.name,
                "sampler": self.method.settings(), "seed": self.seed,
                "model_config": str(self.ldm_config.resolve()),
                "checkpoint": str(self.ckpt.resolve()) if self.ckpt else None}

    def restore(self, indices: list[int], make_figures: bool = True) -> None:
        """Measure, sample and write the outputs of images `indices` (one generator per image)."""
        import torch

        from util.config import ConfigError
        from util.figures import baseline, measurement_images
        from util.images import to_uint8
        from util.masks import generator_for_index, mask_for_index

        try:
            items = [self.dataset[i] for i in indices]
        except ValueError as e:  # an image that became unreadable after the start-up check: the message names it
            raise ConfigError(str(e)) from None
        names = [item[2] for item in items]
        x = torch.stack([item[1] for item in items]).to(self.device)
        draws = [self.draw_index(i) for i in indices]
        gens = [generator_for_index(self.seed, d, "sample", device=self.device) for d in draws]
        mask = None
        if self.masks is not None:
            mask = torch.stack([mask_for_index(self.masks, self.seed, d, device=self.device) for d in draws])
            self.operator.set_mask(mask)
        with torch.no_grad():
            y = self.noise(self.operator(x), generator=gens)
        cond = (torch.tensor([self.labels[i] for i in indices], device=self.device)
                if self.labels is not None else None)
        t0 = time.time()
        res = self._sample(y, gens, cond, indices, names)
        seconds = (time.time() - t0) / len(indices)
        label_img = measurement_images(y, self.operator_name)
        base_name, base_img = baseline(x, y, self.operator_name)
        m = self._metrics(x, {"recon": res.x0, "recon_opt": res.x0_refined, "baseline": base_img,
                              "measurement": y if label_img is not None and y.shape == x.shape else None})
        ess, selected = getattr(res, "ess", None), getattr(res, "selected", None)  # SMC methods only
        for b, i in enumerate(indices):
            self.tree.save_png("input", i, to_uint8(x[b]))
            if label_img is not None:
                self.tree.save_png("label", i, label_img[b])
            self.tree.save_png("recon", i, to_uint8(res.x0[b]))
            if res.x0_refined is not None:
                self.tree.save_png("recon_opt", i, to_uint8(res.x0_refined[b]))
            if mask is not None:
                self.tree.save_png("mask", i, to_uint8(mask[b], value_range=(0.0, 1.0))[..., 0])
            if make_figures:
                self._figure(i, names[b], x[b], label_img[b] if label_img is not None else None, res.x0[b],
                             res.x0_refined[b] if res.x0_refined is not None else None,
                             ess[b] if ess is not None else None)
            record = {"index": i, "file": names[b], "seconds": seconds,
                      "class_label": None if self.labels is None else self.labels[i],
                      "selected_particle": int(selected[b]) if selected is not None else None,
                      "final_ess": float(ess[b, -1]) if ess is not None else None, "baseline": base_name}
            record.update({k: v[b] for k, v in m.items()})
            self.tree.save_record(i, record)  # last: marks image i as done

    def _sample(self, y, gens, cond, indices, names):
        """The method on one batch, with a progress bar; non-finite weights become an error naming the file."""
        from tqdm import tqdm

        steps = self.method.num_callbacks(len(self.model.alphas_cumprod))
        try:
            with tqdm(total=steps, desc=f"images {indices[0]}-{indices[-1]}", unit="step", leave=False,
                      dynamic_ncols=True) as bar:
                return self.method(self.model, self.operator, y, generator=gens, cond=cond,
                                   callback=lambda state: bar.update(1))
        except non_finite_weights_error() as e:
            b = getattr(e, "image", None)
            which = (f"image {names[b]} (index {indices[b]})" if isinstance(b, int) and 0 <= b < len(names)
                     else f"one of the images {', '.join(names)}")
            step, t = getattr(e, "step", None), getattr(e, "t", "?")
            where = f" in transition {step} (t = {t})" if step is not None else f" at the start (t = {t})"
            ckpt = f"the checkpoint {self.ckpt}" if self.ckpt else "the checkpoint"
            raise SamplingError(
                f"{which}: the importance weights of {self.method.name} became non-finite{where}. Likely causes: "
                f"a guidance setting too large for this task (--kappa1, --kappa2), or a corrupted checkpoint "
                f"whose noise predictions are not finite (download {ckpt} again). The images finished before "
                f"this batch are kept; the same command resumes after a fix") from None

    def _figure(self, i, name, x, label_img, recon, recon_opt, ess) -> None:
        from util.figures import restoration_figure
        from util.files import atomic_write_bytes
        from util.images import to_uint8

        n = self.method.settings().get("num_particles")
        panels = [("measurement", label_img), (self.method.name, to_uint8(recon))]
        if recon_opt is not None:
            panels.append(("refined", to_uint8(recon_opt)))
        panels.append(("ground truth", to_uint8(x)))
        title = f"{self.task.name} {i:05d} ({name}), {self.method.name}" + (f", N = {n}" if n else "")
        atomic_write_bytes(self.tree.path("figures", i), restoration_figure(
            panels, ess.cpu().numpy() if ess is not None else None, n or 1, title=title))

    def _metrics(self, x, outputs: dict) -> dict:
        """Per-image PSNR / SSIM (on [0, 1]) and LPIPS (on [-1, 1]) of each output against the ground truth."""
        import torch

        from util.images import to_unit
        from util.metrics import psnr, ssim

        out = {}
        for name, img in outputs.items():
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
        """Write metrics.csv and summary.json for the finished images among `indices`; return the summary."""
        import torch

        from util.figures import baseline_note
        from util.logging import package_version
        from util.outputs import METRIC_COLUMNS, comparison, mean_std

        records = self.tree.records(indices)
        self.tree.write_metrics_csv(records)
        keys = [k for k in METRIC_COLUMNS if k.split("_")[0] in ("psnr", "ssim", "lpips")] + ["seconds"]
        stats = mean_std(records, keys)
        base = next((r.get("baseline") for r in records if r.get("baseline")), None)
        settings = self.method.settings()
        summary = {
            "task": self.task.name, "task_config": str(self.task_path), "images": len(records),
            "comparison": comparison(stats, len(records), base, baseline_note(base, self.operator_name)),
            "metrics": stats, "lpips": self.lpips_note, "protocol": self.task.protocol, "method": self.method.name,
            "preset": settings.get("preset"), "sampler": settings, "config": self.settings(),
            "version": package_version(), "git_commit": self.git_commit, "device": str(self.device),
            "torch": torch.__version__,
        }
        self.tree.write_summary(summary)
        return summary


def run(args) -> dict:
    """Load everything, restore the images not yet done (writing the tables after every batch); return the summary."""
    import torch
    from tqdm import tqdm

    from guided_diffusion.methods import method_fields
    from util.config import ConfigError, load_task
    from util.logging import get_logger
    from util.outputs import OutputTree, comparison_lines

    log = get_logger()
    check_flags(args)
    device = select_device(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(cpu_threads(torch.get_num_threads()))
    task_path = resolve_path(args.task_config)
    task = load_task(task_path, args.overrides, sampler_fields=sorted(method_fields()))
    if args.protocol is not None:
        task = dataclasses.replace(task, protocol=args.protocol)
    method = resolve_method(args, task, log)
    shard, n_shards = shard_of(args.shard)
    restorer = Restorer(task, method, device, seed=args.seed,
                        ldm_config=resolve_path(args.ldm_config or task.model.config or AUTHORS_MODEL),
                        ckpt=resolve_path(args.diffusion_config or task.model.ckpt),
                        task_path=task_path, resolve=resolve_path, log=log)
    dataset = restorer.dataset
    max_images = args.max_images or task.data.max_images
    n_total = len(dataset) if max_images is None else min(max_images, len(dataset))
    mine = [i for i in range(n_total) if i % n_shards == shard]

    tree = restorer.tree = OutputTree(args.save_dir, method.name, task.name)
    # Every image this run will read is decoded once first, so all bad files are reported together.
    bad = dataset.unreadable([i for i in mine if args.overwrite or not tree.is_done(i)])
    if bad:
        raise ConfigError(f"{len(bad)} image file(s) in {dataset.root} cannot be read: {'; '.join(bad[:10])}"
                          f"{' ...' if len(bad) > 10 else ''}. Fix or remove them; image numbers follow the sorted "
                          f"file list, so remove them before outputs are written")
    whole = n_shards == 1 and n_total == len(dataset)
    tree.prepare(restorer.settings(), overwrite=args.overwrite, only=None if whole else mine, shared=n_shards > 1)
    tree.check_files([f.name for f in dataset.files])
    todo = [i for i in mine if not tree.is_done(i)]
    where = f" (shard {shard}/{n_shards}: {len(mine)} of them)" if n_shards > 1 else ""
    shown = ", ".join(f"{k} {v}" for k, v in method.settings().items()
                      if k in ("preset", "num_particles", "num_steps"))
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    log.info(f"task {task.name}: {n_total} images{where}, {len(mine) - len(todo)} already done; model "
             f"{restorer.ldm_config}; device {device}{threads}; method {method.name} ({shown}); "
             f"protocol {task.protocol}, resize {task.data.resize}; outputs in {tree.root}")
    batch_size = args.batch_size or task.data.batch_size
    with tqdm(total=len(todo), desc="images", unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            restorer.restore(batch, make_figures=not args.no_figures)
            restorer.summarise(range(n_total))  # the tables cover every image finished so far
            bar.update(len(batch))
    summary = restorer.summarise(range(n_total))
    for line in comparison_lines(summary["comparison"]):
        print(line)
    print(f"outputs: {tree.root}")
    return summary


def user_errors() -> tuple:
    """The project's error classes whose message tells the user what to fix (printed without a traceback)."""
    from util.config import ConfigError

    errors = [ConfigError, FileNotFoundError, NotADirectoryError, SamplingError]
    for module, name in (("ldm", "CheckpointNotFoundError"), ("ldm", "CheckpointMismatchError"),
                         ("ldm", "ConfigError"), ("ldm.safe_pickle", "UnsafeCheckpointError"),
                         ("util.metrics", "MissingWeightsError"), ("guided_diffusion.methods", "MethodError")):
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
