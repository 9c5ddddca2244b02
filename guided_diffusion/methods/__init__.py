"""Posterior samplers on one interface: LD-SMC, latent TDS and the paper's baselines.

Methods (one module each; docs/methods.md): ld_smc, ltds (smc_methods.py), ldps, gml_dps, psld,
resample, latent_daps. The baselines share their chain, DDIM step and guidance pieces
(common.py) and return a `common.MethodResult`; ld_smc and ltds return `smc.LDSMCResult`.

    from guided_diffusion.methods import get_method
    sampler = get_method("ldps", dataset="ffhq", num_steps=1000)   # defaults: configs/methods/ldps.yaml
    res = sampler(model, operator, y, generator=gens, cond=None, callback=None)
    res.x0, res.x0_refined                                         # [B, C, H, W]; None where not refined

Every method is called as `smc.ld_smc_sample` is, without the config (the `Method` holds it):
`model` follows the protocol of `ldm/interface.py`, `operator` is A (flat image batches),
`y` the measurements [B, ...], `generator` one torch.Generator or one per image (so an
image's result does not depend on its batch), `cond` per-image conditioning [B] or None,
`callback(state)` is called once per transition (`Method.num_callbacks` of them).

A method's defaults live in `configs/methods/<name>.yaml`: a `defaults:` mapping (each
value with a comment saying where it comes from) and optional `datasets: {<data.name>:
{...}}` values for one dataset (e.g. the demo model's step sizes). `get_method(name,
dataset, **overrides)` applies them in that order; its config dataclass checks the
result. Methods register themselves with `register_method` in their own modules below.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "methods"


class MethodError(ValueError):
    """An unknown method, a setting it does not have, or a bad value; the message says which."""


class MethodNotApplicableError(MethodError):
    """A method cannot run with this operator (e.g. PSLD needs a linear operator with an adjoint)."""


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows of a method.

    sample(model, operator, y, cfg, generator=None, cond=None, callback=None) -> result with `x0`
    (and `x0_refined`, None where the method does not refine); config_cls: its settings
    dataclass (a `resolve()` method, if present, validates and returns the config that runs);
    needs: the model members it uses (ldm/interface.py); linear_only: needs A^T (a linear
    operator); paper / code: what it follows; callbacks(cfg, num_train_steps): how many
    times it calls `callback`.
    """
    name: str
    sample: Callable
    config_cls: type
    needs: tuple
    linear_only: bool
    paper: str
    code: str
    callbacks: Callable


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise NameError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def method_defaults(name: str, dataset: Optional[str] = None) -> dict:
    """The settings of configs/methods/<name>.yaml: `defaults`, then `datasets[dataset]` if present."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"defaults", "datasets"}
    if unknown:
        raise MethodError(f"{path}: unknown top-level key(s) {sorted(unknown)}; allowed: defaults, datasets")
    values = dict(raw.get("defaults") or {})
    if dataset is not None:
        values.update((raw.get("datasets") or {}).get(dataset) or {})
    return values


class Method:
    """A configured sampler: `method(model, operator, y, generator, cond, callback)` -> result."""

    def __init__(self, spec: MethodSpec, config):
        self.spec, self.config = spec, config

    @property
    def name(self) -> str:
        return self.spec.name

    def settings(self) -> dict:
        """The resolved settings, as plain data (for summary.json)."""
        return dataclasses.asdict(self.config)

    def num_callbacks(self, num_train_steps: int) -> int:
        return self.spec.callbacks(self.config, num_train_steps)

    def check_applicable(self, operator, operator_name: Optional[str] = None) -> None:
        """Raise MethodNotApplicableError when the method cannot use this operator."""
        name = operator_name or getattr(operator, "name", type(operator).__name__)
        if self.spec.linear_only and not getattr(operator, "is_linear", False):
            raise MethodNotApplicableError(
                f"method {self.name!r} needs a linear operator with a true adjoint A^T, but operator "
                f"{name!r} is not linear: choose another method (e.g. ldps, ltds or ld_smc) for this task")

    def __call__(self, model, operator, y, generator=None, cond=None, callback=None):
        from ldm.interface import check_model

        self.check_applicable(operator)
        check_model(model, self.spec.needs, who=f"method {self.name!r}")
        return self.spec.sample(model, operator, y, self.config, generator=generator, cond=cond,
                                callback=callback)


def method_fields(names: Iterable[str] | None = None) -> set[str]:
    """The setting names of the given methods (all registered ones by default)."""
    _load_all()
    names = METHODS if names is None else names
    return {f.name for n in names for f in dataclasses.fields(METHODS[n].config_cls)}


def get_method(name: str, dataset: Optional[str] = None, **overrides) -> Method:
    """The method `name` with the defaults of configs/methods/<name>.yaml (and of `dataset`), then `overrides`."""
    _load_all()
    if name not in METHODS:
        raise MethodError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    spec = METHODS[name]
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    values = method_defaults(name, dataset)
    for source, mapping in (("configs/methods/%s.yaml" % name, values), ("the overrides", overrides)):
        bad = sorted(set(mapping) - fields)
        if bad:
            raise MethodError(f"method {name!r} has no setting(s) {bad} (from {source}); "
                              f"its settings: {sorted(fields)}")
    values.update(overrides)
    try:
        cfg = spec.config_cls(**values)
        if hasattr(cfg, "resolve"):
            cfg = cfg.resolve()
    except (TypeError, ValueError) as e:
        raise MethodError(f"method {name!r}: {e}") from None
    return Method(spec, cfg)


def available_methods() -> list[str]:
    _load_all()
    return sorted(METHODS)


_LOADED = False


def _load_all() -> None:
    """Import the method modules (each registers itself) on first use."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    for module in METHOD_MODULES:
        importlib.import_module(f"{__name__}.{module}")


# One module per method family; each calls register_method at import.
METHOD_MODULES = ("smc_methods", "ldps", "gml_dps", "psld", "resample", "latent_daps")

__all__ = ["get_method", "available_methods", "method_fields", "method_defaults", "Method", "MethodSpec",
           "MethodError", "MethodNotApplicableError", "register_method", "METHODS"]
