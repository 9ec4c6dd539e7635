"""A cache keyed by tensors that neither keeps them alive nor compares them."""
import weakref


class WeakTensorCache:
    """Values by tensor identity, dropped when the tensor is freed.
    weakref.WeakKeyDictionary will not do: on a lookup it compares keys with
    ==, which a tensor answers element by element."""

    def __init__(self):
        self._entries = {}  # id(tensor) -> (weak reference to it, value)

    def get(self, tensor):
        entry = self._entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def __setitem__(self, tensor, value):
        key = id(tensor)
        self._entries[key] = (weakref.ref(tensor, lambda _: self._entries.pop(key, None)), value)
