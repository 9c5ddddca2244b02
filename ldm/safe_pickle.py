"""A restricted unpickler for PyTorch Lightning checkpoints: data in, no code run.

Lightning writes extra objects into a checkpoint (callback states keyed by their class,
e.g. ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``), which torch's
``weights_only`` loader refuses. This module is a drop-in ``pickle_module`` for
``torch.load`` whose ``find_class`` resolves only

- the torch functions and types that rebuild tensors (plus torch.Size, dtypes, OrderedDict),
- a few inert builtins (containers, numbers),
- any ``pytorch_lightning.*`` / ``lightning.*`` / ``lightning_fabric.*`` global, as an inert
  stub class that only records the data given to it,

and refuses every other global with :class:`UnsafeCheckpointError` naming it, before
anything from the file is called.
"""
import collections
import pickle

import torch
import torch._utils

LIGHTNING_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric")

_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "complex"): complex,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "object"): object,
}
for _name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
    _ALLOWED[("torch", _name)] = getattr(torch, _name)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint refers to a Python global that could run code when loaded."""


class LightningStub:
    """Inert stand-in for a Lightning class: records constructor args and state, does nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert stub of {self.qualified_name}>"


_STUBS: dict[str, type] = {}


def lightning_stub(module: str, name: str) -> type:
    """The (cached) inert stub class standing for the global ``module.name``."""
    qualified = f"{module}.{name}"
    if qualified not in _STUBS:
        _STUBS[qualified] = type(name, (LightningStub,), {"qualified_name": qualified, "__module__": module})
    return _STUBS[qualified]


def _reconstructor(cls, base, state):
    """copyreg._reconstructor restricted to stubs built on plain bases."""
    if not (isinstance(cls, type) and issubclass(cls, LightningStub)) or base not in (object, dict, list):
        raise UnsafeCheckpointError(f"refusing copyreg._reconstructor for {cls!r} on base {base!r}")
    obj = object.__new__(cls)
    if state is not None:
        obj.state = state
    return obj


class Unpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class only resolves the allowlist above and Lightning stubs."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstructor
        if module.split(".")[0] in LIGHTNING_MODULES:
            return lightning_stub(module, name)
        raise UnsafeCheckpointError(
            f"refusing to load the global '{module}.{name}' from a checkpoint: it is neither tensor data, a "
            "plain container nor a Lightning class, and loading it could run arbitrary code. If you trust "
            "the file, convert it to .safetensors in a trusted environment.")


def load(file, **kwargs):
    """pickle.load with the restricted Unpickler."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs):
    """pickle.loads with the restricted Unpickler."""
    import io
    return Unpickler(io.BytesIO(data), **kwargs).load()


