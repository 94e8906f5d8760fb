"""Per-forward adapter routing: which token uses which adapter, grouped once and reused by every adapted module.

A forward's tokens (batch·seq of them on each data shard) are sorted once by adapter group: the groups are the
distinct bank slots the batch uses (`AdapterBatch.groups`, in ascending order, padded with slot 0), and tokens
without an adapter (slot 0) come last in a group of their own that no module computes. Every module then reads:
- for the XLA grouped GEMM: the tokens laid out in tiles of `tile` tokens, each tile holding tokens of one group
  only, so each tile multiplies one copy of its adapter's factors (never one copy per token); or, when tokens x
  groups is small (a decode step over a few adapters), each token's group as a mask, so every module multiplies all
  its tokens by every group's factors in two products and keeps each token's own (`dense_groups`);
- for the Pallas prefill kernels: the sorted order and the kernels' work items (slot, start, end per row tile);
- for a compressed bank: the tokens that use one, in cluster order with the size of each cluster.
A training batch, whose rows come in aligned blocks that share one adapter, needs none of that: its routing is
each block's slot (`route_blocks`), and every module multiplies each block's tokens, already contiguous, by one
copy of its adapter's factors.
Routing is computed per data shard inside a shard_map, so its arrays are laid out shard after shard along
their first axis and each device of an adapted module's shard_map receives its own shard's routing.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ..kernels import prefill_block_m, work_items


class Routing(NamedTuple):
    """One data shard's routing (see the module docstring); fields a forward doesn't need are None."""

    token_slots: jax.Array | None = None  # (T,) bank slot of every token, 0 for none
    tile_slots: jax.Array | None = None  # (tiles,) bank slot each tile multiplies, 0 for an unused tile
    tile_tokens: jax.Array | None = None  # (tiles·tile,) token at each tile position, T for an empty position
    token_places: jax.Array | None = None  # (T,) tile position of each token, tiles·tile for one without an adapter
    order: jax.Array | None = None  # (T,) tokens sorted by group (Pallas prefill)
    work: tuple[jax.Array, jax.Array, jax.Array] | None = None  # Pallas prefill (slot, start, end) per row tile
    cluster_order: jax.Array | None = None  # (T,) tokens sorted by cluster, tokens without one last
    cluster_sizes: jax.Array | None = None  # (clusters,) tokens per cluster
    token_sigma: jax.Array | None = None  # (T,) Σ id of every token, 0 for none
    block_slots: jax.Array | None = None  # (blocks,) bank slot of each block of rows (route_blocks), else None
    group_slots: jax.Array | None = None  # (groups,) bank slot of each group (dense groups), 0 for an unused one
    token_groups: jax.Array | None = None  # (T, groups) float32, 1 where the token uses the group (dense groups)

    @property
    def tile(self) -> int:
        """Tokens per tile of the grouped GEMM."""
        return self.tile_tokens.shape[0] // self.tile_slots.shape[0]


def tile_size(tokens: int, groups: int) -> int:
    """Tokens per tile for `tokens` tokens in at most `groups` groups: about one tile per group, at least 1."""
    return max(1, tokens // max(groups, 1))


DENSE_PRODUCTS = 256  # tokens x groups up to which a shard's tokens multiply every group's factors (dense groups)


def dense_groups(tokens: int, groups: int) -> bool:
    """Whether `tokens` tokens in at most `groups` groups multiply every group's factors rather than loop over tiles:
    the products waste groups-fold work, a tile loop pays a copy of each tile's factors and a few small dots per
    tile; on CPU (a decode step of 32 rows, 28 modules) the products measured faster up to 8 groups, slower from 16."""
    return tokens * groups <= DENSE_PRODUCTS


def tile_count(tokens: int, groups: int, tile: int) -> int:
    """Tiles that hold any split of `tokens` tokens into `groups` groups, each group padded to whole tiles."""
    return tokens if tile == 1 else -(-tokens // tile) + groups - 1


def _tiles(token_group: jax.Array, groups: jax.Array, order: jax.Array, sizes: jax.Array):
    """(tile_slots, tile_tokens, token_places) of the grouped GEMM's tile layout."""
    tokens, num_groups = token_group.shape[0], groups.shape[0]
    tile = tile_size(tokens, num_groups)
    tiles = tile_count(tokens, num_groups, tile)
    per_group = -(-sizes // tile)
    tile_end = jnp.cumsum(per_group)
    group_start = jnp.cumsum(sizes) - sizes
    sorted_group = token_group[order]
    valid = sorted_group < num_groups
    group = jnp.minimum(sorted_group, num_groups - 1)
    rank = jnp.arange(tokens, dtype=jnp.int32) - group_start[group]
    place = jnp.where(valid, (tile_end[group] - per_group[group]) * tile + rank, tiles * tile).astype(jnp.int32)
    token_places = jnp.zeros((tokens,), jnp.int32).at[order].set(place)
    tile_tokens = jnp.full((tiles * tile,), tokens, jnp.int32).at[place].set(order, mode="drop")
    tile_group = jnp.searchsorted(tile_end, jnp.arange(tiles, dtype=jnp.int32), side="right")
    tile_slots = jnp.where(tile_group < num_groups, groups[jnp.minimum(tile_group, num_groups - 1)], 0)
    return tile_slots.astype(jnp.int32), tile_tokens, token_places


def _cluster_order(token_clusters: jax.Array, num_clusters: int) -> tuple[jax.Array, jax.Array]:
    """(tokens stably sorted by cluster, tokens per cluster); a counting sort, as the clusters are few.

    token_clusters holds num_clusters for tokens without a compressed adapter: they sort last and are counted
    in no cluster.
    """
    onehot = (token_clusters[:, None] == jnp.arange(num_clusters + 1)).astype(jnp.int32)
    counts = onehot.sum(axis=0)
    position = jnp.sum(onehot * (jnp.cumsum(counts) - counts + jnp.cumsum(onehot, axis=0) - onehot), axis=1)
    order = jnp.zeros_like(position).at[position].set(jnp.arange(position.shape[0], dtype=position.dtype))
    return order, counts[:num_clusters]


def route_shard(slots: jax.Array, seq: int, groups: jax.Array, *, kernels: bool,
                clusters: jax.Array | None = None, sigma_ids: jax.Array | None = None,
                num_clusters: int = 0, dense: bool = False) -> Routing:
    """One data shard's Routing from its rows' slots (and compressed (cluster, Σ id) per row), rows of `seq` tokens.

    groups: the distinct bank slots in use, ascending, padded with 0 (its length bounds the groups); kernels:
    also build the Pallas prefill kernels' order and work items; dense: each token's group as a mask instead of
    the tiles (see `dense_groups`).
    """
    token_slots = jnp.repeat(slots, seq)
    tokens, num_groups = token_slots.shape[0], groups.shape[0]
    match = (token_slots[:, None] == groups[None, :]) & (token_slots[:, None] > 0)  # groups' slots are distinct
    if dense and not kernels:
        routing = Routing(token_slots, group_slots=groups.astype(jnp.int32), token_groups=match.astype(jnp.float32))
        return _with_clusters(routing, seq, clusters, sigma_ids, num_clusters)
    token_group = jnp.where(match.any(axis=1), jnp.argmax(match, axis=1), num_groups).astype(jnp.int32)
    order = jnp.argsort(token_group, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(token_group, length=num_groups + 1).astype(jnp.int32)[:num_groups]
    routing = Routing(token_slots, *_tiles(token_group, groups, order, sizes))
    if kernels:  # the tokens without an adapter are a last group on slot 0, whose shrink tiles store zeros
        with_none = jnp.bincount(token_group, length=num_groups + 1).astype(jnp.int32)
        group, start, end = work_items(with_none, tokens, prefill_block_m(tokens))
        slot = jnp.concatenate([groups, jnp.zeros((1,), groups.dtype)])[group]
        routing = routing._replace(order=order, work=(slot.astype(jnp.int32), start, end))
    return _with_clusters(routing, seq, clusters, sigma_ids, num_clusters)


def _with_clusters(routing: Routing, seq: int, clusters: jax.Array | None, sigma_ids: jax.Array | None,
                   num_clusters: int) -> Routing:
    """routing plus a compressed bank's cluster order, where the forward has one (clusters is not None)."""
    if clusters is not None:
        token_sigma = jnp.repeat(sigma_ids, seq)
        token_clusters = jnp.where(token_sigma > 0, jnp.repeat(clusters, seq), num_clusters)
        cluster_order, cluster_sizes = _cluster_order(token_clusters, num_clusters)
        routing = routing._replace(cluster_order=cluster_order, cluster_sizes=cluster_sizes, token_sigma=token_sigma)
    return routing


def route_blocks(slots: jax.Array, row_block: int) -> Routing:
    """One data shard's Routing for rows in aligned blocks of `row_block` rows that share a slot: each block's slot.

    The shard's rows start at a multiple of its row count, so blocks of gcd(rows, row_block) rows share a slot too.
    """
    block = math.gcd(slots.shape[0], row_block)
    return Routing(block_slots=slots[::block])


def routing_specs(routing: Routing, row_spec: PartitionSpec) -> Routing:
    """PartitionSpecs of a Routing laid out shard after shard: every array split along its first axis like rows."""
    return jax.tree.map(lambda _: row_spec, routing)
