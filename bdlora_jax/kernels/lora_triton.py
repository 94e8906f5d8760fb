"""Pallas Triton GPU kernels for the multi-adapter LoRA shrink (x·A[slot]) and expand (y += h·B[slot]).

Layouts are those of `reference.py` (T tokens, S slots, nb blocks per device, 1 for a dense factor):
shrink x (T, nb, d_in), A (S, nb, d_in, r) -> h (T, nb, r) float32; expand h (T, nb, r), B (S, nb, r, d_out)
into y (T, nb, d_out) float32, updated in place (y is aliased to the output).

Two kernel pairs, one per serving shape:
- decode (BGMV): one program per (token, block, column tile) reads that token's slot and computes a
  vector-matrix product as an elementwise product and a column sum, since one row has no 16-row tile for
  Triton's dot;
- prefill (SGMV): tokens are grouped by slot (`group_by_slot`: a stable sort `order` and `group_sizes`); a
  program owns one tile of up to block_m tokens of one group, so all its rows share an adapter and run
  Triton's dot. Rows are read and written through `order`, so no input is ever permuted.
Slot 0 (no adapter) is skipped: a shrink program on slot 0 stores zeros without loading anything, an
expand program returns at once. Ranks and widths need not be multiples of the tiles: every load and store
is masked, and zero-padded rank columns contribute nothing. `pallas_call` gets Triton's CompilerParams, so
on GPU it lowers through Triton (not Mosaic GPU); interpret=True runs the same kernels on any backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_BLOCK = 16  # Triton's dot needs every tile dim >= 16, and its tensors need power-of-two sizes
DECODE_TILE = 4096  # elements of a decode program's (block_k, block_n) product tile: 32 float32 per thread
MAX_BLOCK_M = 64  # tokens of one group per prefill program
MAX_RANK_BLOCK = 64  # ranks per program (shrink columns, expand contraction step)
PREFILL_BLOCK = 64  # d_in step (shrink) or d_out columns (expand) of a prefill program


@dataclass(frozen=True)
class TileConfig:
    """Tiles of one kernel call: tokens per program (prefill only; a decode program owns one token), output
    columns per program, contraction step; and Triton's warps and software-pipelining stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for field in ("block_m", "block_n", "block_k"):
            value = getattr(self, field)
            if value < MIN_BLOCK or value & (value - 1):
                raise ValueError(f"{field}={value}: expected a power of two >= {MIN_BLOCK} (a Triton tile dimension)")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps={self.num_warps}, num_stages={self.num_stages}: expected positive integers")

    def compiler_params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _pow2(n: int, low: int, high: int) -> int:
    """The next power of two >= n, clamped to [low, max(low, high)] (low and high powers of two)."""
    return min(max(pl.next_power_of_2(max(n, 1)), low), max(low, high))


def heuristic_config(op: str, mode: str, tokens: int, d_in: int, r: int, d_out: int) -> TileConfig:
    """Tiles from the problem shape (T tokens; shrink d_in -> r, expand r -> d_out); see docs/results/kernels.md.

    The rank side (shrink output, expand contraction) is one tile of up to 64 columns, so a program reads
    each token's x once per 64 ranks. Decode programs keep their (block_k, block_n) product at 4096 elements.
    Prefill tiles hold up to 64 tokens of one group (fewer when T is small: a tile is wasted past a group's end)
    and step 64 along d_in or cover 64 output columns, a dot shape that fits four warps.
    """
    if op not in ("shrink", "expand") or mode not in ("decode", "prefill"):
        raise ValueError(f"op={op!r}, mode={mode!r}: expected op 'shrink'|'expand' and mode 'decode'|'prefill'")
    rank_block = _pow2(r, MIN_BLOCK, MAX_RANK_BLOCK)
    block_m = prefill_block_m(tokens)
    if op == "shrink":
        if mode == "decode":
            block_k = _pow2(DECODE_TILE // rank_block, MIN_BLOCK, pl.next_power_of_2(d_in))
            return TileConfig(MIN_BLOCK, rank_block, block_k)
        return TileConfig(block_m, rank_block, _pow2(d_in, MIN_BLOCK, PREFILL_BLOCK))
    if mode == "decode":
        return TileConfig(MIN_BLOCK, _pow2(DECODE_TILE // rank_block, MIN_BLOCK, pl.next_power_of_2(d_out)), rank_block)
    return TileConfig(block_m, _pow2(d_out, MIN_BLOCK, PREFILL_BLOCK), rank_block)


def _check(name: str, array: jax.Array, shape: tuple) -> None:
    """Raise naming the array when its shape differs from the expected one (None = any size)."""
    if len(array.shape) != len(shape) or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} has shape {array.shape}; expected {expected}")


def _check_shrink(x, a, index, index_name):
    _check("x", x, (None, None, None))
    t, nb, d_in = x.shape
    if t < 1:
        raise ValueError(f"x has shape {x.shape}; expected at least one token")
    _check("a", a, (None, nb, d_in, None))
    _check(index_name, index, (t,))
    return t, nb, d_in, a.shape[3]


def _check_expand(h, b, index, index_name, y):
    _check("h", h, (None, None, None))
    t, nb, r = h.shape
    if t < 1:
        raise ValueError(f"h has shape {h.shape}; expected at least one token")
    _check("b", b, (None, nb, r, None))
    _check(index_name, index, (t,))
    _check("y", y, (t, nb, b.shape[3]))
    if y.dtype != jnp.float32:
        raise ValueError(f"y has dtype {y.dtype}; expected float32 (the accumulator the LoRA delta is added into)")
    return t, nb, r, b.shape[3]


def _mask2(rows: jax.Array, cols: jax.Array) -> jax.Array:
    return rows[:, None] & cols[None, :]


def _factor_tile(ref, slot, blk, i, j, cfg: TileConfig, rows_ok: jax.Array, cols_ok: jax.Array) -> jax.Array:
    """Tile (i, j) of shape (block_k, block_n) of the factor ref[slot, blk], zero outside the factor."""
    tile = ref.at[slot, blk, pl.ds(i * cfg.block_k, cfg.block_k), pl.ds(j * cfg.block_n, cfg.block_n)]
    return plgpu.load(tile, mask=_mask2(rows_ok, cols_ok), other=0)


# ----------------------------------------------------------------------------------------------- decode (BGMV)


def _vector_matrix(vec_ref, factor_ref, t, blk, slot, j, length: int, cfg: TileConfig, col_ok) -> jax.Array:
    """One row times one column tile of a slot's factor: sum over `length` in block_k steps, in float32."""

    def step(i, acc):
        ks = i * cfg.block_k + jnp.arange(cfg.block_k)
        k_ok = ks < length
        vec = plgpu.load(vec_ref.at[t, blk, pl.ds(i * cfg.block_k, cfg.block_k)], mask=k_ok, other=0)
        tile = _factor_tile(factor_ref, slot, blk, i, j, cfg, k_ok, col_ok)
        return acc + jnp.sum(vec.astype(jnp.float32)[:, None] * tile.astype(jnp.float32), axis=0)

    return jax.lax.fori_loop(0, pl.cdiv(length, cfg.block_k), step, jnp.zeros((cfg.block_n,), jnp.float32))


def _bgmv_shrink_kernel(slots_ref, x_ref, a_ref, h_ref, *, cfg: TileConfig, d_in: int, r: int):
    t, blk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot = slots_ref[t]
    cols = j * cfg.block_n + jnp.arange(cfg.block_n)
    col_ok = cols < r
    out = h_ref.at[t, blk, pl.ds(j * cfg.block_n, cfg.block_n)]

    @pl.when(slot == 0)
    def _():
        plgpu.store(out, jnp.zeros((cfg.block_n,), jnp.float32), mask=col_ok)

    @pl.when(slot != 0)
    def _():
        plgpu.store(out, _vector_matrix(x_ref, a_ref, t, blk, slot, j, d_in, cfg, col_ok), mask=col_ok)


def bgmv_shrink(x: jax.Array, a: jax.Array, slots: jax.Array, *, config: TileConfig | None = None,
                interpret: bool = False) -> jax.Array:
    """Decode shrink: h[t] = x[t]·A[slots[t]] (float32), one token per row, zeros for slot 0."""
    t, nb, d_in, r = _check_shrink(x, a, slots, "slots")
    cfg = config or heuristic_config("shrink", "decode", t, d_in, r, 0)
    return pl.pallas_call(
        partial(_bgmv_shrink_kernel, cfg=cfg, d_in=d_in, r=r),
        out_shape=jax.ShapeDtypeStruct((t, nb, r), jnp.float32),
        grid=(t, nb, pl.cdiv(r, cfg.block_n)),
        compiler_params=cfg.compiler_params(),
        interpret=interpret,
        name="lora_bgmv_shrink",
    )(slots.astype(jnp.int32), x, a)


def _bgmv_expand_kernel(slots_ref, h_ref, b_ref, y_in_ref, y_ref, *, cfg: TileConfig, r: int, d_out: int):
    del y_in_ref  # the same buffer as y_ref
    t, blk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot = slots_ref[t]
    cols = j * cfg.block_n + jnp.arange(cfg.block_n)
    col_ok = cols < d_out

    @pl.when(slot != 0)
    def _():
        acc = _vector_matrix(h_ref, b_ref, t, blk, slot, j, r, cfg, col_ok)
        out = y_ref.at[t, blk, pl.ds(j * cfg.block_n, cfg.block_n)]
        plgpu.store(out, plgpu.load(out, mask=col_ok, other=0) + acc, mask=col_ok)


def bgmv_expand(h: jax.Array, b: jax.Array, slots: jax.Array, y: jax.Array, *, config: TileConfig | None = None,
                interpret: bool = False) -> jax.Array:
    """Decode expand: y[t] += h[t]·B[slots[t]] in place (y float32), slot-0 rows untouched."""
    t, nb, r, d_out = _check_expand(h, b, slots, "slots", y)
    cfg = config or heuristic_config("expand", "decode", t, 0, r, d_out)
    return pl.pallas_call(
        partial(_bgmv_expand_kernel, cfg=cfg, r=r, d_out=d_out),
        out_shape=jax.ShapeDtypeStruct(y.shape, jnp.float32),
        grid=(t, nb, pl.cdiv(d_out, cfg.block_n)),
        input_output_aliases={3: 0},
        compiler_params=cfg.compiler_params(),
        interpret=interpret,
        name="lora_bgmv_expand",
    )(slots.astype(jnp.int32), h, b, y)


# ---------------------------------------------------------------------------------------------- prefill (SGMV)


def group_by_slot(slots: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array]:
    """(order, group_sizes): tokens stably sorted by slot, and how many tokens each of the num_slots slots has."""
    order = jnp.argsort(slots, stable=True).astype(jnp.int32)
    return order, jnp.bincount(slots, length=num_slots).astype(jnp.int32)


def prefill_block_m(tokens: int) -> int:
    """Tokens per prefill program (the heuristic configs' block_m) for a call of `tokens` tokens."""
    return _pow2(tokens, MIN_BLOCK, MAX_BLOCK_M)


def work_items(group_sizes: jax.Array, tokens: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(group, start, end) of every row tile: each group is cut into tiles of block_m sorted positions.

    A group of n tokens takes cdiv(n, block_m) tiles, so all groups together take at most
    cdiv(T, block_m) + min(G, T) - 1 (T when block_m is 1: no tile is partial); the grid has that many programs
    and the unused ones get an empty range on group 0 (they store nothing and return). With one group per slot,
    the group is the slot.
    """
    num_slots = group_sizes.shape[0]
    items = tokens if block_m == 1 else pl.cdiv(tokens, block_m) + min(num_slots, tokens) - 1
    tiles = (group_sizes + block_m - 1) // block_m
    tile_end = jnp.cumsum(tiles)
    group_end = jnp.cumsum(group_sizes)
    w = jnp.arange(items, dtype=jnp.int32)
    group = jnp.searchsorted(tile_end, w, side="right").astype(jnp.int32)
    valid = group < num_slots
    g = jnp.minimum(group, num_slots - 1)
    start = group_end[g] - group_sizes[g] + (w - tile_end[g] + tiles[g]) * block_m
    return (jnp.where(valid, g, 0).astype(jnp.int32), jnp.where(valid, start, tokens).astype(jnp.int32),
            jnp.where(valid, group_end[g], tokens).astype(jnp.int32))


def _tile_rows(slot_ref, start_ref, end_ref, order_ref, block_m: int, tokens: int):
    """This program's slot, the token index of each of its rows (T past the tile's end) and the row mask."""
    w = pl.program_id(0)
    slot, start, end = slot_ref[w], start_ref[w], end_ref[w]
    row_ok = start + jnp.arange(block_m) < end
    rows = plgpu.load(order_ref.at[pl.ds(start, block_m)], mask=row_ok, other=tokens)
    return slot, jnp.where(row_ok, rows, tokens), row_ok


def _sgmv_shrink_kernel(slot_ref, start_ref, end_ref, order_ref, x_ref, a_ref, h_ref, *, cfg: TileConfig, tokens: int,
                        d_in: int, r: int, dtype):
    blk, j = pl.program_id(1), pl.program_id(2)
    slot, rows, row_ok = _tile_rows(slot_ref, start_ref, end_ref, order_ref, cfg.block_m, tokens)
    cols = j * cfg.block_n + jnp.arange(cfg.block_n)
    out = h_ref.at[rows[:, None], blk, cols[None, :]]
    out_ok = _mask2(row_ok, cols < r)

    @pl.when(slot == 0)
    def _():
        plgpu.store(out, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32), mask=out_ok)

    @pl.when(slot != 0)
    def _():
        def step(i, acc):
            ks = i * cfg.block_k + jnp.arange(cfg.block_k)
            k_ok = ks < d_in
            x = plgpu.load(x_ref.at[rows[:, None], blk, ks[None, :]], mask=_mask2(row_ok, k_ok), other=0)
            a = _factor_tile(a_ref, slot, blk, i, j, cfg, k_ok, cols < r)
            return acc + jnp.dot(x.astype(dtype), a.astype(dtype), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, pl.cdiv(d_in, cfg.block_k), step, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
        plgpu.store(out, acc, mask=out_ok)


def sgmv_shrink(x: jax.Array, a: jax.Array, order: jax.Array, group_sizes: jax.Array, *,
                config: TileConfig | None = None, interpret: bool = False) -> jax.Array:
    """Prefill shrink: h[t] = x[t]·A[slot of t] (float32), zeros for slot 0.

    order and group_sizes are `group_by_slot`'s: token order[p] has the p-th smallest slot, and group_sizes
    (summing to T) says how many tokens each slot has.
    """
    _check("group_sizes", group_sizes, (a.shape[0],))
    cfg = config or heuristic_config("shrink", "prefill", x.shape[0], a.shape[2], a.shape[3], 0)
    return sgmv_shrink_items(x, a, order, work_items(group_sizes, x.shape[0], cfg.block_m), config=cfg,
                             interpret=interpret)


def sgmv_shrink_items(x: jax.Array, a: jax.Array, order: jax.Array, items: tuple[jax.Array, jax.Array, jax.Array], *,
                      config: TileConfig | None = None, interpret: bool = False) -> jax.Array:
    """`sgmv_shrink` from precomputed work items (slot, start, end), cut with the config's block_m (built once
    per forward by the model's routing and shared by every module)."""
    t, nb, d_in, r = _check_shrink(x, a, order, "order")
    cfg = config or heuristic_config("shrink", "prefill", t, d_in, r, 0)
    kernel = partial(_sgmv_shrink_kernel, cfg=cfg, tokens=t, d_in=d_in, r=r,
                     dtype=jnp.promote_types(x.dtype, a.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((t, nb, r), jnp.float32),
        grid=(items[0].shape[0], nb, pl.cdiv(r, cfg.block_n)),
        compiler_params=cfg.compiler_params(),
        interpret=interpret,
        name="lora_sgmv_shrink",
    )(*(i.astype(jnp.int32) for i in items), order.astype(jnp.int32), x, a)


def _sgmv_expand_kernel(slot_ref, start_ref, end_ref, order_ref, h_ref, b_ref, y_in_ref, y_ref, *, cfg: TileConfig,
                        tokens: int, r: int, d_out: int, dtype):
    del y_in_ref  # the same buffer as y_ref
    blk, j = pl.program_id(1), pl.program_id(2)
    slot, rows, row_ok = _tile_rows(slot_ref, start_ref, end_ref, order_ref, cfg.block_m, tokens)
    cols = j * cfg.block_n + jnp.arange(cfg.block_n)
    col_ok = cols < d_out

    @pl.when(slot != 0)
    def _():
        def step(i, acc):
            ks = i * cfg.block_k + jnp.arange(cfg.block_k)
            k_ok = ks < r
            h = plgpu.load(h_ref.at[rows[:, None], blk, ks[None, :]], mask=_mask2(row_ok, k_ok), other=0)
            b = _factor_tile(b_ref, slot, blk, i, j, cfg, k_ok, col_ok)
            return acc + jnp.dot(h.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, pl.cdiv(r, cfg.block_k), step, jnp.zeros((cfg.block_m, cfg.block_n), jnp.float32))
        out = y_ref.at[rows[:, None], blk, cols[None, :]]
        out_ok = _mask2(row_ok, col_ok)
        plgpu.store(out, plgpu.load(out, mask=out_ok, other=0) + acc, mask=out_ok)


def sgmv_expand(h: jax.Array, b: jax.Array, order: jax.Array, group_sizes: jax.Array, y: jax.Array, *,
                config: TileConfig | None = None, interpret: bool = False) -> jax.Array:
    """Prefill expand: y[t] += h[t]·B[slot of t] in place (y float32), slot-0 rows untouched; order and
    group_sizes as for `sgmv_shrink`."""
    _check("group_sizes", group_sizes, (b.shape[0],))
    cfg = config or heuristic_config("expand", "prefill", h.shape[0], 0, b.shape[2], b.shape[3])
    return sgmv_expand_items(h, b, order, work_items(group_sizes, h.shape[0], cfg.block_m), y, config=cfg,
                             interpret=interpret)


def sgmv_expand_items(h: jax.Array, b: jax.Array, order: jax.Array, items: tuple[jax.Array, jax.Array, jax.Array],
                      y: jax.Array, *, config: TileConfig | None = None, interpret: bool = False) -> jax.Array:
    """`sgmv_expand` from precomputed work items, as `sgmv_shrink_items`."""
    t, nb, r, d_out = _check_expand(h, b, order, "order", y)
    cfg = config or heuristic_config("expand", "prefill", t, 0, r, d_out)
    kernel = partial(_sgmv_expand_kernel, cfg=cfg, tokens=t, r=r, d_out=d_out,
                     dtype=jnp.promote_types(h.dtype, b.dtype))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y.shape, jnp.float32),
        grid=(items[0].shape[0], nb, pl.cdiv(d_out, cfg.block_n)),
        input_output_aliases={6: 0},
        compiler_params=cfg.compiler_params(),
        interpret=interpret,
        name="lora_sgmv_expand",
    )(*(i.astype(jnp.int32) for i in items), order.astype(jnp.int32), h, b, y)
