"""Name -> class registries with argument checking, shared by operators and noise models."""
import inspect
from typing import Callable, Dict


def register(registry: Dict[str, type], name: str) -> Callable[[type], type]:
    """Class decorator: ``registry[name] = cls`` (a name may be registered once)."""
    def wrap(cls: type) -> type:
        if name in registry:
            raise NameError(f"'{name}' is already registered to {registry[name].__name__}")
        cls.name = name
        registry[name] = cls
        return cls
    return wrap


def build(registry: Dict[str, type], kind: str, name: str, kwargs: dict):
    """Instantiate ``registry[name](**kwargs)``, with errors that list what is valid."""
    if name not in registry:
        raise NameError(f"unknown {kind} '{name}'; valid names: {', '.join(sorted(registry))}")
    cls = registry[name]
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"{kind} '{name}' got unknown argument(s) {unknown}; valid arguments: {valid}")
    missing = [p for p in valid if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise TypeError(f"{kind} '{name}' is missing required argument(s) {missing}; valid arguments: {valid}")
    return cls(**kwargs)
