"""Task configuration: safe YAML loading, typed dataclasses and dotted `key=value` overrides.

A task YAML has the DPS / LD-SMC layout::

    conditioning: {main_sampler: LD-SMC}
    data: {name: ffhq, root: data/samples/ffhq}
    measurement:
      operator: {name: inpainting}
      mask_opt: {mask_type: box, mask_len_range: !!python/tuple [128, 129], image_size: 256}
      noise: {name: gaussian, sigma: 0.01}

and may add keys of ours: `name` (the output folder; default: the operator name, plus
`_<mask_type>` for inpainting, as the authors name it), `model` (`config` and `ckpt`: which
model the task is meant for; the CLI flags `--ldm_config` / `--diffusion_config` win over
them), `sampler` (defaults for the method's settings, which the CLI flags override),
`protocol` (how images draw their randomness, PROTOCOLS below) and `data.resize` (how
images are brought to the model's size, RESIZE_METHODS). DPS writes tuples as `!!python/tuple [a, b]`; `load_yaml` reads that
tag as a tuple with a safe loader, never executing Python.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


# The evaluation protocol: which random draws image i gets.
#   per_image: image i draws its mask, its measurement noise and its sampler randomness from
#              generators seeded by (seed, i) (ours; results do not depend on the batch).
#   release:   as the authors' release, which re-seeds with the same seed before every image:
#              every image gets the same mask, the same noise draw and the same starting
#              particles; here every image uses the generators of index 0.
PROTOCOLS = ("per_image", "release")
# data.resize: "bicubic" (ours: PIL bicubic + centre crop) or "release" (the authors' torchvision
# Resize(size) + CenterCrop(size)); see util.images.resize_center_crop.
RESIZE_METHODS = ("bicubic", "release")


class ConfigError(ValueError):
    """A config file or override is missing, malformed, or does not fit the model; the message says which key."""


class _TupleSafeLoader(yaml.SafeLoader):
    """SafeLoader that also reads DPS's `!!python/tuple [a, b]` as a tuple (and nothing else of python/*)."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple:
    return tuple(loader.construct_sequence(node, deep=True))


_TupleSafeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely; `!!python/tuple` becomes a tuple. Raises ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (check the path; relative paths are read "
                          f"from the current folder, then from the project root)")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_TupleSafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a YAML mapping at the top level, got "
                          f"{type(data).__name__}")
    return data


@dataclass
class DataConfig:
    """Where the images are and how to read them.

    `root`: a folder of images (read in sorted filename order). `image_size`: resize and
    centre-crop to this size (None: the model's image size); `resize`: how ("bicubic", ours,
    or "release", the authors' torchvision Resize + CenterCrop). `class_label`: one class label
    for every image (class-conditional models); `labels_file`: per-image labels instead, a
    text file of `filename label` lines (or `filename,label`). `max_images`: use only the
    first this many images (None: all). `batch_size`: images sampled together (the CLI's
    --batch_size wins; 1 as the authors, whose sampler takes one image at a time).
    """

    name: str = "folder"
    root: str = "data/samples/ffhq"
    image_size: int | None = None
    class_label: int | None = None
    labels_file: str | None = None
    max_images: int | None = None
    batch_size: int = 1
    resize: str = "bicubic"


@dataclass
class MeasurementConfig:
    """The forward model: `operator` (DPS name plus its arguments), `noise`, and `mask_opt` for inpainting."""

    operator: dict
    noise: dict
    mask_opt: dict | None = None


@dataclass
class ModelRef:
    """Which model a task is meant for (our extension); CLI flags win over it."""

    config: str | None = None
    ckpt: str | None = None


@dataclass
class TaskConfig:
    """A whole task: what to measure, on which data, with which model and sampler defaults."""

    name: str
    conditioning: dict
    data: DataConfig
    measurement: MeasurementConfig
    model: ModelRef = field(default_factory=ModelRef)
    sampler: dict = field(default_factory=dict)
    protocol: str = "per_image"

    def to_dict(self) -> dict:
        """The resolved config as plain data (tuples become lists), for summary.json."""
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def default_task_name(measurement: Mapping) -> str:
    """The authors' output folder name: operator name, plus `_<mask_type>` for inpainting."""
    op = measurement["operator"]["name"]
    if op == "inpainting" and measurement.get("mask_opt"):
        op += f"_{measurement['mask_opt'].get('mask_type', 'box')}"
    return op


_TOP_KEYS = {"name", "conditioning", "data", "measurement", "model", "sampler", "protocol"}


# What each required section looks like, for the error that says it is missing.
_EXAMPLES = {
    "measurement": "measurement: {operator: {name: gaussian_blur, kernel_size: 61, intensity: 3.0}, "
                   "noise: {name: gaussian, sigma: 0.01}}",
    "operator": "operator: {name: gaussian_blur, kernel_size: 61, intensity: 3.0}",
    "noise": "noise: {name: gaussian, sigma: 0.01}",
}


def _require_mapping(raw: Mapping, key: str, where: str, prefix: str = "") -> dict:
    value = raw.get(key)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: key '{prefix}{key}' is missing or not a mapping (expected e.g. "
                          f"'{_EXAMPLES.get(key, key + ': {...}')}')")
    return dict(value)


def _check_ranges(values: Mapping, rules: Mapping[str, tuple], where: str, prefix: str) -> None:
    """rules: key -> (lowest allowed value, what to say); None values pass (they mean 'default')."""
    for key, (low, hint) in rules.items():
        v = values.get(key)
        if v is not None and not v >= low:
            raise ConfigError(f"{where}: {prefix}{key} must be {hint}, got {v!r}")


def _check_noise(noise: Mapping, where: str) -> None:
    """Noise parameters are finite numbers > 0 (gaussian sigma, poisson rate); 'clean' is the noiseless model."""
    for key in ("sigma", "rate"):
        if key not in noise:
            continue
        v = noise[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
            raise ConfigError(f"{where}: measurement.noise.{key} must be a number > 0, got {v!r} (for "
                              f"noiseless measurements use measurement.noise.name=clean)")


def task_from_dict(raw: Mapping, where: str = "task config", sampler_fields: Iterable[str] | None = None
                   ) -> TaskConfig:
    """Validate a raw task mapping and build the typed TaskConfig (defaults filled in).

    `sampler_fields`: the names the `sampler` section may use (the sampler config's fields);
    None skips that check.
    """
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    meas = _require_mapping(raw, "measurement", where)
    operator = _require_mapping(meas, "operator", where, "measurement.")
    noise = _require_mapping(meas, "noise", where, "measurement.")
    for sect, d in (("operator", operator), ("noise", noise)):
        if not isinstance(d.get("name"), str):
            raise ConfigError(f"{where}: key 'measurement.{sect}.name' is missing (e.g. '{_EXAMPLES[sect]}')")
    _check_noise(noise, where)
    mask_opt = meas.get("mask_opt")
    if operator["name"] == "inpainting" and not isinstance(mask_opt, Mapping):
        raise ConfigError(f"{where}: inpainting needs 'measurement.mask_opt' (e.g. mask_type: box)")
    extra = set(meas) - {"operator", "noise", "mask_opt"}
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {sorted('measurement.' + k for k in extra)}")
    measurement = MeasurementConfig(operator=operator, noise=noise,
                                    mask_opt=dict(mask_opt) if isinstance(mask_opt, Mapping) else None)

    data_raw = raw.get("data") or {}
    if not isinstance(data_raw, Mapping):
        raise ConfigError(f"{where}: key 'data' must be a mapping (e.g. 'data: {{root: path/to/images}}')")
    data = _dataclass_from(DataConfig, data_raw, where, "data")
    _check_ranges(dataclasses.asdict(data), {"image_size": (1, "an integer >= 1 (pixels)"),
                                             "batch_size": (1, "an integer >= 1"),
                                             "max_images": (1, "an integer >= 1, or null for all"),
                                             "class_label": (0, "a class index >= 0")}, where, "data.")
    if data.resize not in RESIZE_METHODS:
        raise ConfigError(f"{where}: data.resize must be one of {', '.join(RESIZE_METHODS)} (bicubic: ours; "
                          f"release: the authors' torchvision Resize + CenterCrop), got {data.resize!r}")
    protocol = raw.get("protocol") or "per_image"
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{where}: protocol must be one of {', '.join(PROTOCOLS)} (per_image: image i draws "
                          f"from generators seeded by (seed, i); release: every image the same draws, as the "
                          f"authors' release), got {protocol!r}")
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, Mapping):
        raise ConfigError(f"{where}: key 'model' must be a mapping (e.g. 'model: {{config: configs/models/demo.yaml}}')")
    model = _dataclass_from(ModelRef, model_raw, where, "model")
    sampler = raw.get("sampler") or {}
    if not isinstance(sampler, Mapping):
        raise ConfigError(f"{where}: key 'sampler' must be a mapping (e.g. 'sampler: {{num_particles: 5}}')")
    sampler = dict(sampler)
    if sampler_fields is not None:
        bad = set(sampler) - set(sampler_fields)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {sorted('sampler.' + k for k in bad)}; "
                              f"allowed: {sorted(sampler_fields)}")
    conditioning = raw.get("conditioning") or {"main_sampler": "LD-SMC"}
    if not isinstance(conditioning, Mapping):
        raise ConfigError(f"{where}: key 'conditioning' must be a mapping (e.g. 'conditioning: {{method: ld_smc}}')")
    conditioning = dict(conditioning)
    if conditioning.get("method") is not None and not isinstance(conditioning["method"], str):
        raise ConfigError(f"{where}: conditioning.method must be a method name such as ld_smc, "
                          f"got {conditioning['method']!r}")
    name = raw.get("name") or default_task_name(raw["measurement"])
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"{where}: key 'name' must be a plain folder name, got {name!r}")
    return TaskConfig(name=name, conditioning=conditioning, data=data, measurement=measurement,
                      model=model, sampler=sampler, protocol=protocol)


def _dataclass_from(cls, raw: Mapping, where: str, section: str):
    """`cls(**raw)` after checking the keys and the value types, naming `section.key` on error."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = set(raw) - names
    if bad:
        raise ConfigError(f"{where}: {section}: unknown key(s) {sorted(bad)}; allowed: {sorted(names)}")
    check_types(cls, raw, {k: f"{where}: {section}.{k}" for k in raw})
    return cls(**raw)


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` (read from YAML or a flag) fits the type hint `hint` (int is a float; bool is no int)."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, Mapping)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, hint) if isinstance(hint, type) else True


def _hint_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
             dict: "a mapping"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_hint_name(h) for h in typing.get_args(hint)))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(cls, values: Mapping[str, Any], where: Mapping[str, str], who: str = "") -> None:
    """Check `values` against the field types of dataclass `cls`; numbers must be finite.

    `where[key]` names where a value came from (a flag, `sampler.KEY`), so the error says
    what to fix, e.g. "sampler.kappa1 must be a number, got 'abc'".
    """
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a hint this Python cannot evaluate: leave it to the class
        hints = {}
    for key, value in values.items():
        hint = hints.get(key)
        name = where.get(key, key)
        whose = f" ({who} setting {key})" if who else ""
        if hint is not None and not _matches(value, hint):
            raise ConfigError(f"{name} must be {_hint_name(hint)}{whose}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number{whose}, got {value}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a', 'b', 'c'], value); the value is read as YAML (3 -> int, [1, 2] -> list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value (e.g. data.root=path/to/images)")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: the key {key!r} is not a dotted name")
    try:
        parsed = yaml.load(value, Loader=_TupleSafeLoader) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: Mapping, overrides: Iterable[str], allowed_new: Mapping[str, Iterable[str]] | None = None
                    ) -> dict:
    """Return a copy of `raw` with dotted `key=value` overrides applied.

    A key must already exist in `raw` (after defaults are filled in), or be listed in
    `allowed_new` under its parent's dotted path (e.g. {'sampler': fields, 'data': fields}).
    Anything else is an unknown key and raises ConfigError naming it and the keys there are.
    """
    out = copy.deepcopy(dict(raw))
    allowed_new = {k: set(v) for k, v in (allowed_new or {}).items()}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts):
            parent = ".".join(parts[:depth])
            last = depth == len(parts) - 1
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{parent}' is not a section, it has no key '{part}'")
            if part not in node and part not in allowed_new.get(parent, ()):
                known = sorted(set(node) | allowed_new.get(parent, set()))
                raise ConfigError(f"override {text!r}: unknown config key '{'.'.join(parts[:depth + 1])}'; "
                                  f"{parent or 'the top level'} has keys {known}")
            if last:
                node[part] = value
            else:
                if node.get(part) is None and part in allowed_new.get(parent, ()):
                    node[part] = {}
                node = node[part]
    return out


def load_task(path: str | Path, overrides: Iterable[str] = (), sampler_fields: Iterable[str] | None = None
              ) -> TaskConfig:
    """Load a task YAML, apply dotted overrides (validated), and return the typed TaskConfig."""
    raw = load_yaml(path)
    base = task_from_dict(raw, where=str(path), sampler_fields=sampler_fields).to_dict()
    # Overrides act on the resolved config, so every data/model field is addressable.
    if base["measurement"].get("mask_opt") is None:
        base["measurement"].pop("mask_opt")
    allowed_new = {"sampler": sampler_fields or (), "measurement": ("mask_opt",), "conditioning": ("method",)}
    if sampler_fields is None:
        allowed_new.pop("sampler")
    merged = apply_overrides(base, overrides, allowed_new=allowed_new)
    return task_from_dict(merged, where=f"{path} (with overrides)", sampler_fields=sampler_fields)
