"""The adapter pool (bdlora_jax.engine.adapter_pool) through the Engine: registry errors leave it unchanged, and
max_loras device slots are filled and evicted least-recently-used, exactly served after every load.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ATOL, GOOD, assert_serves, make_engine, prompts

from bdlora_jax.errors import PoolFullError

# ---------------------------------------------------------------------------------- registry errors


def test_registry_errors(eng, hf_dir, reference):
    with pytest.raises(KeyError, match="nobody"):
        eng.remove_adapter("nobody")
    with pytest.raises(KeyError, match="nobody"):
        eng.logits(prompts(reference)[0], adapter="nobody")

    loads = eng.pool.loads
    with pytest.raises(ValueError, match=GOOD) as info:
        eng.add_adapter(GOOD, hf_dir / "adapters" / "lora_r8")
    assert "already registered" in str(info.value)
    assert eng.pool.loads == loads
    assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")  # still the first adapter, not the second

    eng.add_adapter("temp", hf_dir / "adapters" / "lora_r8")
    assert_serves(eng, "temp", reference, "lora_r8")
    assert "temp" in eng.pool.resident
    eng.remove_adapter("temp")
    assert "temp" not in eng.adapters and "temp" not in eng.pool.resident
    with pytest.raises(KeyError, match="temp"):
        eng.logits(prompts(reference)[0], adapter="temp")
    with pytest.raises(KeyError):
        eng.remove_adapter("temp")
    # the name is reusable, and its (stale) old slot contents must not be served for the new adapter
    eng.add_adapter("temp", hf_dir / "adapters" / "bdlora_nb2_r8")
    assert_serves(eng, "temp", reference, "bdlora_nb2_r8")
    eng.remove_adapter("temp")
    assert eng.adapters == [GOOD]
    assert_serves(eng, GOOD, reference, "lora_rs_r4_qv")


# ------------------------------------------------------------------------------------------ LRU pool


def test_lru_pool_eviction(hf_dir, reference):
    lru = make_engine(hf_dir, max_loras=2)
    names = {"a": "lora_rs_r4_qv", "b": "lora_r8", "c": "bdlora_nb2_r8"}
    for name, fixture in names.items():
        lru.add_adapter(name, hf_dir / "adapters" / fixture)
    pool = lru.pool
    assert (pool.loads, pool.evictions, len(pool.resident)) == (0, 0, 0)  # registering loads nothing

    def use(name, loads, evictions, resident):
        assert_serves(lru, name, reference, names[name])
        assert (pool.loads, pool.evictions) == (loads, evictions), (name, pool.loads, pool.evictions)
        assert list(pool.resident) == resident  # least recently used first
        assert sorted(pool.resident.values()) == sorted(set(pool.resident.values()))
        assert all(1 <= s <= 2 for s in pool.resident.values())

    # round robin over three adapters with two slots: every use is a miss and evicts
    use("a", 1, 0, ["a"])
    use("b", 2, 0, ["a", "b"])
    use("c", 3, 1, ["b", "c"])
    use("a", 4, 2, ["c", "a"])
    use("b", 5, 3, ["a", "b"])
    use("c", 6, 4, ["b", "c"])
    # hits do not load; a hit refreshes recency, so the other one is evicted next (LRU, not FIFO)
    use("c", 6, 4, ["b", "c"])
    use("b", 6, 4, ["c", "b"])
    use("a", 7, 5, ["b", "a"])
    use("b", 7, 5, ["a", "b"])
    # base model needs no slot
    assert_serves(lru, None, reference, None)
    assert (pool.loads, pool.evictions) == (7, 5)

    # one batch with two adapters and the base: a (resident) + c (evicts b, the LRU not in this batch)
    out = lru.batch_logits(prompts(reference), ["c", None, "a"])
    for row, ref in enumerate(("bdlora_nb2_r8", "base", "lora_rs_r4_qv")):
        np.testing.assert_allclose(out[row], reference[f"logits_{ref}"][row], atol=ATOL, rtol=0)
    assert (pool.loads, pool.evictions) == (8, 6)
    assert set(pool.resident) == {"a", "c"}

    # three distinct adapters in one batch do not fit two slots; nothing is changed by the refusal
    resident = dict(pool.resident)
    with pytest.raises(PoolFullError):
        lru.batch_logits(prompts(reference), ["a", "b", "c"])
    assert dict(pool.resident) == resident
    assert_serves(lru, "a", reference, names["a"])
    assert_serves(lru, "c", reference, names["c"])

    # removing a resident adapter frees its slot: the next load takes it without evicting
    lru.remove_adapter("c")
    loads, evictions = pool.loads, pool.evictions
    assert_serves(lru, "b", reference, names["b"])
    assert (pool.loads, pool.evictions) == (loads + 1, evictions)
    assert set(pool.resident) == {"a", "b"}
    assert_serves(lru, "a", reference, names["a"])
