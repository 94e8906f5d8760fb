"""Adapters registered on the host, `max_loras` of them resident in device bank slots, evicted least-recently-used.

An adapter registered from a directory is validated once and then kept only as its path: it is read again
from disk whenever it is loaded into a slot, so thousands of registered adapters cost no host memory. That
read validates it again on the host: files changed or broken since registration raise an AdapterError before
the device is touched. Slot arrays are padded and cast to the bank's shape and dtype on the host, so writing a
slot never compiles a new program.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..adapters.adapter import LoraAdapter
from ..adapters.bank import BankLayout, slot_arrays, write_slot, zeros_bank
from ..adapters.peft_io import read_adapter
from ..errors import AdapterConflictError, AdapterError, AdapterNotFoundError, PoolFullError
from ..sharding import ShardingPlan

log = logging.getLogger(__name__)


class AdapterPool:
    """Host registry of adapters plus the device bank; slot 0 is reserved for "no adapter"."""

    def __init__(self, layout: BankLayout, plan: ShardingPlan):
        self.layout = layout
        self.plan = plan
        self.bank = zeros_bank(layout, plan)
        self.adapters: dict[str, LoraAdapter | Path] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()
        self.loads = 0
        self.evictions = 0
        self.registration: dict[str, int] = {}  # name -> which registration it is (a name may come back re-registered)
        self._registrations = itertools.count(1)

    @property
    def capacity(self) -> int:
        return self.layout.num_slots - 1

    def register(self, name: str, adapter: LoraAdapter, source: Path | None = None) -> None:
        """Add an adapter after checking that it fits the bank; raises without changing anything if not.

        With a source directory, only the path is kept and the adapter is read again when it is loaded.
        """
        if name in self.adapters:
            raise AdapterConflictError(name, f"adapter {name!r} is already registered; remove it first")
        self.host_slot(adapter)
        self.adapters[name] = Path(source) if source is not None else adapter
        self.registration[name] = next(self._registrations)

    def unregister(self, name: str) -> None:
        """Forget an adapter; its slot (if any) becomes free."""
        if name not in self.adapters:
            raise AdapterNotFoundError(name)
        del self.adapters[name]
        del self.registration[name]
        self.resident.pop(name, None)

    @property
    def host_dtype(self) -> np.dtype:
        """The bank's dtype as a numpy dtype (bfloat16 through ml_dtypes)."""
        return np.dtype(jnp.dtype(self.layout.dtype))

    def host_slot(self, adapter: LoraAdapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The adapter's slot on the host in exactly the bank's shapes and dtype; AdapterError if it does not fit
        or its scaled factors are not finite in that dtype."""
        dtype = self.host_dtype
        try:
            arrays = slot_arrays(adapter, self.layout)
        except OverflowError:
            raise AdapterError(f"adapter {adapter.name!r}: lora_alpha={adapter.alpha!r} gives a scale beyond "
                               f"{self.layout.dtype}") from None
        out = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for key, pair in arrays.items():
                cast = tuple(np.asarray(x, dtype) for x in pair)
                for x, full in zip(cast, self.bank[key]):
                    if x.shape != full.shape[1:]:
                        raise AdapterError(f"adapter {adapter.name!r}: {key} slot factor of shape {x.shape}; "
                                           f"the bank holds {full.shape[1:]}")
                if not all(np.isfinite(x).all() for x in cast):
                    raise AdapterError(f"adapter {adapter.name!r}: lora_alpha={adapter.alpha:g} (scale "
                                       f"{adapter.scale:g}) makes the factors of {key} overflow the serving dtype "
                                       f"{self.layout.dtype}")
                out[key] = cast
        return out

    def warm_up(self) -> None:
        """Compile the slot write once (writing zeros into a free slot) so later loads compile nothing."""
        if not self.resident:
            dtype = self.host_dtype
            zeros = {key: tuple(np.zeros(x.shape[1:], dtype) for x in pair) for key, pair in self.bank.items()}
            self.bank = write_slot(self.bank, 1, zeros)

    def slots_for(self, names: Iterable[str | None]) -> list[int]:
        """Device slot of each name (None -> 0), loading missing adapters and evicting unneeded ones."""
        names = list(names)
        needed = {n for n in names if n is not None}
        for name in needed:
            if name not in self.adapters:
                raise AdapterNotFoundError(name)
        if len(needed) > self.capacity:
            raise PoolFullError(self.capacity,
                                f"{len(needed)} distinct adapters in one batch but max_loras={self.capacity}")
        for name in names:
            if name is not None:
                self._ensure_resident(name, needed)
        return [0 if n is None else self.resident[n] for n in names]

    def _ensure_resident(self, name: str, pinned: set[str]) -> None:
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        used = set(self.resident.values())
        free = [s for s in range(1, self.layout.num_slots) if s not in used]
        victim = None if free else next((n for n in self.resident if n not in pinned), None)
        if not free and victim is None:
            raise PoolFullError(self.capacity, f"every slot holds an adapter in use; cannot load {name!r}")
        arrays = self.host_slot(self._host_adapter(name))  # a read or fit error here leaves every slot as it was
        if free:
            slot = free[0]
        else:
            slot = self.resident.pop(victim)
            self.evictions += 1
        self.bank = write_slot(self.bank, slot, arrays)
        self.resident[name] = slot
        self.loads += 1

    def _host_adapter(self, name: str) -> LoraAdapter:
        """The registered adapter, read again and validated when it was registered from a directory.

        Whatever goes wrong in that read raises AdapterError naming the adapter, so only its requests fail.
        """
        entry = self.adapters[name]
        if isinstance(entry, LoraAdapter):
            return entry
        try:
            return read_adapter(entry, self.layout.config, name)
        except AdapterError as e:
            log.warning("adapter %r cannot be loaded into a slot: %s", name, e.message)
            raise
        except Exception as e:  # any failure of one adapter's files is that adapter's error
            log.warning("adapter %r cannot be loaded into a slot: %s", name, e)
            raise AdapterError(f"adapter {name!r}: cannot read {entry} ({type(e).__name__}: {e})", path=entry) from e
