"""The multi-adapter LoRA delta on the Pallas kernels, added into the float32 base output in place.

Rows of one token (decode) use the BGMV kernels with each token's slot; longer rows use the SGMV kernels with the
routing's sorted order and work items (computed once per forward). A dense factor is the one-block case of the
kernels' block-diagonal layout.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from ..kernels import bgmv_expand, bgmv_shrink, sgmv_expand_items, sgmv_shrink_items
from ..mesh import MODEL
from .routing import Routing


def pallas_lora_add(x: jax.Array, y: jax.Array, a: jax.Array, b: jax.Array, routing: Routing, a_block: bool,
                    b_block: bool, join: Callable[[jax.Array], jax.Array], into_slice: bool,
                    interpret: bool) -> jax.Array:
    """y (batch, seq, out) float32 plus every token's x·A[slot]·B[slot]; into_slice: y is a full partial sum and
    this device's output slice goes to its offset."""
    batch, seq = x.shape[:2]
    tokens = batch * seq
    a4 = a if a_block else a[:, None]
    b4 = b if b_block else b[:, None]
    xt = x.reshape(tokens, a4.shape[1], a4.shape[2])
    if seq == 1:
        h = bgmv_shrink(xt, a4, routing.token_slots, interpret=interpret)
    else:
        h = sgmv_shrink_items(xt, a4, routing.order, routing.work, interpret=interpret)
    h = join(h.reshape(tokens, -1)).astype(b.dtype).reshape(tokens, b4.shape[1], b4.shape[2])

    def expand(target: jax.Array) -> jax.Array:
        blocks = target.reshape(tokens, b4.shape[1], b4.shape[3])
        if seq == 1:
            return bgmv_expand(h, b4, routing.token_slots, blocks, interpret=interpret).reshape(target.shape)
        return sgmv_expand_items(h, b4, routing.order, routing.work, blocks, interpret=interpret).reshape(target.shape)

    yt = y.reshape(tokens, -1)
    if not into_slice:
        return expand(yt).reshape(y.shape)
    width = b4.shape[1] * b4.shape[3]
    offset = jax.lax.axis_index(MODEL) * width
    own = expand(jax.lax.dynamic_slice_in_dim(yt, offset, width, axis=1))
    return jax.lax.dynamic_update_slice_in_dim(yt, own, offset, axis=1).reshape(y.shape)
