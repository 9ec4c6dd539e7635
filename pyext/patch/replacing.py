"""How patch puts pyext's modules in a model and unpatch takes them out
again, keeping what was done to the model in between.

- A torch module keeps its object and gets pyext's class; unpatch gives it
  back the original class, or, where something derived a class of its own
  from pyext's meanwhile (torch's parametrize), that class rebuilt on the
  original (_rebased); a module parametrized before the patch gets its
  class rebuilt on pyext's.
- A transformers module is replaced by a new pyext module, in every place
  of the model that holds it (_replace). The two share the old module's
  hooks (the same dicts: a hook registered on either before or during the
  patch runs on the one in the model) and its Parameters; unpatch puts the
  old module back wherever the pyext one is then, wrappers added since
  included, with what was set on the pyext one meanwhile (_put_back): its
  Parameters and buffers by name (load_state_dict(assign=True), to_empty,
  FSDP's sharding and .to() of buffers put new objects there), its
  train/eval mode, a parametrization.
"""
import weakref

import torch

# the dicts of a torch.nn.Module's hooks, shared by a replaced module and its replacement
_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
          "_load_state_dict_post_hooks")


def _replace(model: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module):
    """`new` in each place of `model` that holds `old`, with old's hooks and
    mode; returns what _put_back takes."""
    for name in _HOOKS + ("training",):
        if name in old.__dict__:  # (a torch that lacks one of these dicts)
            setattr(new, name, old.__dict__[name])
    _swap_children(model, old, new)
    return old, new, type(new)


def _put_back(model: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module, new_class: type):
    """`old` in each place of `model` that holds `new` (of `new_class` when
    _replace put it there), holding what was set on `new` since."""
    for name in _HOOKS + ("training",):
        if name in new.__dict__:
            setattr(old, name, new.__dict__[name])
    if type(new) is not new_class:  # parametrized since: old's class gets the property of each
        old.__class__ = _rebased(type(new), new_class, type(old))
    moved = set(getattr(new, "parametrizations", {}))  # names of Parameters a parametrization holds now
    for store in ("_parameters", "_buffers", "_modules"):
        mine, theirs = getattr(old, store), getattr(new, store)
        kept = {k: theirs.get(k, v) for k, v in mine.items() if k not in moved}
        setattr(old, store, {**kept, **{k: v for k, v in theirs.items() if k not in mine and v is not None}})
    old._non_persistent_buffers_set = old._non_persistent_buffers_set | new._non_persistent_buffers_set
    _swap_children(model, new, old)


def _swap_children(model, child, by):
    for parent in list(model.modules()):
        for name, module in parent._modules.items():
            if module is child:
                parent._modules[name] = by


def _rebased(cls, old, new):
    """cls with `new` in place of `old`: `new` itself, or, where something
    derived a class of its own from `old` (torch's parametrize makes
    Parametrized<name> on the spot, before the patch or after it), that
    class rebuilt on `new` (and named after it), so that what it added is
    kept: a module's class as patch swaps it, and as unpatch puts it back.
    A class rebuilt so and rebased back, nothing added to or taken from
    either since (a parametrization of another tensor adds a property), is
    the class it was rebuilt from, the same object: patch and unpatch over
    and over build one class a cycle, which dies with the cycle, rather
    than two kept for good."""
    if cls is old:
        return new
    source = _rebuilt_from.get(cls)
    if source is not None and source[1:] == (new, old) and _namespace(source[0]) == _namespace(cls):
        return source[0]
    bases = tuple(_rebased(b, old, new) if issubclass(b, old) else b for b in cls.__bases__)
    rebuilt = type(cls)(cls.__name__.replace(old.__name__, new.__name__), bases, _namespace(cls))
    _rebuilt_from[rebuilt] = (cls, old, new)
    return rebuilt


def _namespace(cls) -> dict:
    """What a class defines itself, as a class rebuilt from it takes it
    (not __slotnames__, copyreg's cache, which copying a module writes)."""
    return {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__", "__slotnames__")}


# the classes _rebased has built -> (the class each was rebuilt from, old, new), while they live
_rebuilt_from = weakref.WeakKeyDictionary()
