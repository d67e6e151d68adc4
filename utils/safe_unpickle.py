"""Read a model checkpoint without letting the file construct or call anything.

`torch.load(weights_only=True)` refuses globals that are not on its allow-list, but it *calls*
the allowed ones with arguments taken from the file (pickle REDUCE / NEWOBJ). With model classes on
the list, a file can ask for `DetectionModel(cfg)` with its own cfg; upstream YOLOv9's parse_model
runs `eval()` on cfg strings, so that is code execution. Here every nn.Module class is replaced, for
the unpickler, by an inert placeholder of the same dotted name that refuses constructor arguments
and only records the pickled attribute dict. `materialize` then turns the placeholders into real
modules with `cls.__new__(cls)` plus that attribute dict (what pickle itself does for a module,
NEWOBJ + BUILD), after checking that every value is data: tensors, numbers, strings, containers,
other modules. No `__init__`, no parse of the model yaml, no callable from the file runs.

One callable reference is understood: upstream's `fuse()` sets `m.forward = m.forward_fuse` on
each instance, which pickles as `getattr(<that module>, 'forward_fuse')`. The unpickler maps
`builtins.getattr` to a recorder (the real getattr is never called), and `materialize` restores
exactly that binding (attribute `forward` -> the module's own class method `forward_fuse`); any
other getattr in a file is refused.

Only torch, numpy and the standard library are used, so this module also works inside an upstream
YOLOv9 clone (patches/install.py copies it there as a helper of qat/compat.py).
"""
import argparse
import collections
import pathlib
import pickle

import numpy as np
import torch
import torch.nn as nn

FUSED_FORWARD = ("forward", "forward_fuse")  # the only per-instance method binding a file may carry
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


class RefusedCheckpoint(pickle.UnpicklingError):
    """The file asked for something the safe loader does not do; nothing of it was run."""


def dotted_name(cls):
    """The name pickle writes for a class (and torch's allow-list uses)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def module_classes(*modules):
    """{dotted name: class} of the nn.Module subclasses defined in (or imported into) `modules`,
    plus every layer class of torch.nn."""
    out = {}
    for mod in (*modules, nn):
        for v in vars(mod).values():
            if isinstance(v, type) and issubclass(v, nn.Module):
                out[dotted_name(v)] = v
    return out


def numpy_globals():
    """numpy objects found in upstream checkpoints (best_fitness arrays, numpy scalars in `opt`),
    under both numpy 1 (`numpy.core`) and numpy 2 (`numpy._core`) import paths."""
    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(mod, name)
        out += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    out += [v for v in vars(np.dtypes).values() if isinstance(v, type) and issubclass(v, np.dtype)]
    return out


PLAIN_GLOBALS = (collections.OrderedDict, set, argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath)


def allowed_names(classes):
    """Dotted names the loader accepts: the placeholders' classes, data types, the getattr recorder."""
    names = set(classes) | {"builtins.getattr"}
    names |= {g[1] if isinstance(g, tuple) else dotted_name(g) for g in numpy_globals() + list(PLAIN_GLOBALS)}
    return names


class _MethodRef:
    """What the file's `getattr(obj, name)` became: a record, nothing looked up."""
    __slots__ = ("obj", "name")

    def __init__(self, obj, name):
        self.obj, self.name = obj, name


def _record_getattr(obj, name, *default):
    if default or not isinstance(name, str):
        raise RefusedCheckpoint("the file calls getattr with a default or a non-string name")
    return _MethodRef(obj, name)


class _Placeholder:
    """Stands in for one nn.Module class while unpickling: takes no arguments, keeps the state."""
    __slots__ = ("state", "__weakref__")
    target = "?"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise RefusedCheckpoint(f"the file constructs {cls.target}(...) with arguments of its own")
        obj = object.__new__(cls)
        obj.state = None
        return obj

    def __setstate__(self, state):
        if self.state is not None:
            raise RefusedCheckpoint(f"the file sets the state of a {self.target} twice")
        self.state = state


def load(path, classes, map_location="cpu"):
    """torch.load(weights_only=True) with `classes` ({dotted name: nn.Module class}) unpickled as
    inert placeholders, then materialized. Raises RefusedCheckpoint (nothing was run) or torch's own
    errors for unreadable files."""
    placeholders = {name: type(f"Inert[{name}]", (_Placeholder,), {"__slots__": (), "target": name})
                    for name in classes}
    allowed = [(ph, name) for name, ph in placeholders.items()] + [(_record_getattr, "builtins.getattr")]
    allowed += numpy_globals() + list(PLAIN_GLOBALS)
    try:
        with torch.serialization.safe_globals(allowed):
            raw = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch.load rewords the unpickler's errors: report ours as they are
        cause = e
        while cause is not None and not isinstance(cause, RefusedCheckpoint):
            cause = cause.__context__
        if cause is not None:
            raise RefusedCheckpoint(str(cause)) from None
        raise
    return materialize(raw, {ph: classes[name] for name, ph in placeholders.items()})


def materialize(obj, classes, _memo=None):
    """Replace placeholders by real modules (see the module docstring); refuse anything callable."""
    memo = {} if _memo is None else _memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _Placeholder):
        return _module_from(obj, classes, memo)
    if isinstance(obj, _MethodRef):
        raise RefusedCheckpoint(f"the file binds a method ({obj.name!r}) outside the one upstream's fuse() sets")
    if isinstance(obj, type) or callable(obj):
        raise RefusedCheckpoint(f"the file stores a callable ({type(obj).__name__}) as data")
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
        memo[id(obj)] = out
        for k, v in obj.items():
            out[materialize(k, classes, memo)] = materialize(v, classes, memo)
        return out
    if isinstance(obj, list):
        out = []
        memo[id(obj)] = out
        out.extend(materialize(v, classes, memo) for v in obj)
        return out
    if isinstance(obj, (tuple, set, frozenset)):
        items = [materialize(v, classes, memo) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj  # nothing replaced (torch.Size, plain tuples of numbers)
        return type(obj)(items) if type(obj) in (tuple, set, frozenset) else tuple(items)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**materialize(vars(obj), classes, memo))
    return obj  # tensors, numpy values, numbers, strings, paths, dtypes, devices


def _module_from(ph, classes, memo):
    cls = classes[type(ph)]
    module = cls.__new__(cls)  # no __init__: nothing is built from the file's arguments
    memo[id(ph)] = module
    state = {} if ph.state is None else ph.state
    if isinstance(state, tuple) and len(state) == 2 and not state[1]:
        state = state[0] or {}  # (dict, no slot state)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise RefusedCheckpoint(f"the file gives a {ph.target} a state that is not an attribute dict")
    fused = False
    attrs = {}
    for k, v in state.items():
        if isinstance(v, _MethodRef):
            if (k, v.name) == FUSED_FORWARD and v.obj is ph and callable(getattr(cls, FUSED_FORWARD[1], None)):
                fused = True
                continue
            raise RefusedCheckpoint(f"the file sets {ph.target}.{k} to a method ({v.name!r})")
        attrs[k] = materialize(v, classes, memo)
    for k in _HOOK_DICTS:  # hooks are code; a saved model carries none that we keep
        if k in attrs:
            attrs[k] = collections.OrderedDict()
    nn.Module.__setstate__(module, attrs)
    if fused:
        module.forward = getattr(module, FUSED_FORWARD[1])  # a method of the class, bound to this module
    return module


FUSED_LIST = "fused_forward_modules"  # model attribute: the names strip_fused_forward removed


def fused_forward_modules(model):
    """Names of the submodules whose instance `forward` is their class's `forward_fuse` (upstream's
    fuse() sets that)."""
    names = []
    for name, m in model.named_modules():
        f = m.__dict__.get(FUSED_FORWARD[0])
        if f is not None and getattr(f, "__self__", None) is m and getattr(f, "__name__", "") == FUSED_FORWARD[1]:
            names.append(name)
    return names


def strip_fused_forward(model):
    """Before saving: remove the per-instance `forward` bindings (they pickle as getattr) and list them
    in the model's FUSED_LIST attribute (plain data), for restore_fused_forward after loading."""
    names = fused_forward_modules(model)
    modules = dict(model.named_modules())
    for n in names:
        del modules[n].__dict__[FUSED_FORWARD[0]]
    if names:
        setattr(model, FUSED_LIST, names)
    return names


def restore_fused_forward(model):
    """After loading: bind `forward = forward_fuse` again on the modules listed by strip_fused_forward.
    The list comes from a file, so only existing submodules whose class has forward_fuse are touched,
    and only that method is bound."""
    names = getattr(model, FUSED_LIST, None) if isinstance(model, nn.Module) else None
    if not names:
        return model
    if not isinstance(names, (list, tuple)):
        raise RefusedCheckpoint(f"the model's {FUSED_LIST} is not a list of module names")
    modules = dict(model.named_modules())
    for n in names:
        m = modules.get(n) if isinstance(n, str) else None
        if m is None or not callable(getattr(type(m), FUSED_FORWARD[1], None)):
            raise RefusedCheckpoint(f"the checkpoint lists {n!r} as fused, but the model has no such fusable module")
        m.forward = getattr(m, FUSED_FORWARD[1])
    return model
