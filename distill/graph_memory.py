"""Measure autograd graph memory: the bytes of tensors saved for backward, live at once.

Trajectory matching's memory is dominated by what autograd keeps for the backward pass
(activations of every unrolled inner step). Process RSS mixes that with allocator caching and
everything else in the process, and on CPU torch has no allocation counter, so this meter
counts the storages autograd saves while it is active (each storage once, however many graph
nodes share it) and tracks the peak of those alive at the same time. It measures exactly the
memory the memory modes trade against time, on any device, independent of machine load.

    with GraphMemoryMeter() as meter:
        loss = f(x); loss.backward()
    meter.peak_mb
"""

from __future__ import annotations

import torch


class _Packed:
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: GraphMemoryMeter, key: int | None, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        if self.key is not None:
            self.meter._release(self.key)


class GraphMemoryMeter:
    """Context manager: peak_bytes / peak_mb of the storages saved for backward and alive together.

    Only graphs recorded while the meter is active are counted (saved-tensor hooks); the hooks
    cost one Python call per saved tensor, so time runs without it.
    """

    def __init__(self) -> None:
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, list[int]] = {}  # storage data_ptr -> [saved references, nbytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    def __enter__(self) -> GraphMemoryMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> _Packed:
        try:
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage count nothing
            return _Packed(self, None, tensor)
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [1, nbytes]
            self.current_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        else:
            entry[0] += 1
        return _Packed(self, key, tensor)

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._live[key]
            self.current_bytes -= entry[1]
