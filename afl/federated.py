"""Federated arrays: uneven clients in fixed-size blocks, one compiled shape.

Every client's samples are cut into blocks of `block_size` rows; a client's
last block is padded and the padding masked out. Each block belongs to exactly
one client (`client[b]`), so per-client statistics are segment sums over
blocks. The number of blocks is the split-independent bound
ceil(N / block_size) + C (sum_i ceil(n_i / B) < N / B + C), rounded up to a
multiple of 16 times the device count, so every partition of the same N
samples over the same C clients compiles to the same shapes. Blocks past a
split's own need are all-padding and the walk over a device's blocks jumps
over them, so the bound costs memory, not compute.

Real blocks are dealt over the devices in contiguous runs, so each device
gets the same number of real blocks (plus or minus one) whatever the split,
and a client's blocks stay next to each other: `segment_sum` merges
neighbouring blocks of the same client (or group) into one large product.
`order` lays the clients out in a chosen order (pFedACnnL puts the clients
of a group together) without changing their ids.
"""

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CLIENTS = "clients"  # the device-mesh axis that the block axis is sharded over
# Blocks per device are rounded up to a multiple of this, so that nearby
# (N, C) share compiled shapes.
BLOCK_ALIGNMENT = 16


@flax.struct.dataclass
class FederatedData:
  """Samples of all clients in blocks.

  Attributes:
    x: [num_blocks, block_size, *feature_shape] float32, zeros where masked.
    y: [num_blocks, block_size] int32 labels, 0 where masked.
    mask: [num_blocks, block_size] bool, True for real samples.
    client: [num_blocks] int32, the client that owns each block (0 for
      all-padding blocks, which contribute nothing).
    num_clients: C.
  """

  x: jax.Array
  y: jax.Array
  mask: jax.Array
  client: jax.Array
  num_clients: int = flax.struct.field(pytree_node=False)

  @property
  def num_blocks(self) -> int:
    return self.x.shape[0]

  @property
  def block_size(self) -> int:
    return self.x.shape[1]

  def client_sizes(self) -> np.ndarray:
    """[C] number of samples of each client (on every process)."""
    if isinstance(self.mask, jax.Array) and not self.mask.is_fully_addressable:
      # Blocks spread over processes (`distribute`): count where they are,
      # then every process gets the [C] counts.
      everywhere = NamedSharding(self.mask.sharding.mesh, PartitionSpec())
      sizes = jax.jit(
          lambda mask, client: jax.ops.segment_sum(
              mask.sum(1), client, self.num_clients
          ),
          out_shardings=everywhere,
      )(self.mask, self.client)
      return np.asarray(sizes).astype(np.int64)
    return np.bincount(
        np.asarray(self.client),
        weights=np.asarray(self.mask).sum(1),
        minlength=self.num_clients,
    ).astype(np.int64)


def default_block_size(num_samples: int, num_clients: int) -> int:
  """A power of two near an eighth of the mean client size, in [8, 512].

  Depends on N and C only (not on the split), so the compiled shape does not
  either. Smaller blocks waste less padding on small clients; larger blocks
  make better use of the matrix unit, though `segment_sum` merges a
  segment's neighbouring blocks into steps of up to 1,024 rows anyway. An
  eighth of the mean size bounds the expected padding by about 1/16 of the
  data. Measured on MNIST, 100 clients (mean 525; machine E, 2026-12-08,
  `experiments.benchmark_fedacnnl --block_size`): FedACnnL 1.36 / 1.26 /
  1.22x a bare X^T X with blocks of 128 / 64 / 32 rows (12% / 6% / 3% of
  the rows multiplied are padding), pFedACnnL 4.09 / 4.16 / 4.41x (its
  personalization takes the dual form for clients of up to
  `fedacnnl.MAX_DUAL_BLOCKS` blocks, fewer samples with smaller blocks).
  """
  target = max(1.0, num_samples / num_clients / 8)
  return int(min(512, max(8, 2 ** math.floor(math.log2(target)))))


class _Layout(NamedTuple):
  """Where every sample goes (host-side, from the client sizes alone)."""

  capacity: int  # blocks in all, a multiple of BLOCK_ALIGNMENT * num_shards
  block_size: int
  rows: np.ndarray  # [N'] destination row of each laid-out sample
  sources: np.ndarray  # [N'] its index in x
  client: np.ndarray  # [capacity] int32 owner of each block


def _layout(
    client_indices: Sequence[np.ndarray],
    block_size: int | None,
    num_shards: int,
    order: Sequence[int] | None,
) -> _Layout:
  """The block layout of `federate` (see there); needs no features."""
  num_clients = len(client_indices)
  if num_clients < 1:
    raise ValueError("need at least one client")
  order = np.arange(num_clients) if order is None else np.asarray(order)
  if sorted(order.tolist()) != list(range(num_clients)):
    raise ValueError(f"order must be a permutation of range({num_clients})")
  sizes = np.array([len(idx) for idx in client_indices], np.int64)
  total = int(sizes.sum())
  if block_size is None:
    block_size = default_block_size(total, num_clients)
  if block_size < 1 or num_shards < 1:
    raise ValueError(
        f"block_size ({block_size}) and num_shards "
        f"({num_shards}) must be positive"
    )
  capacity = math.ceil(total / block_size) + num_clients
  align = num_shards * BLOCK_ALIGNMENT
  capacity = math.ceil(capacity / align) * align

  blocks_per_client = -(-sizes[order] // block_size)  # in layout order
  num_real = int(blocks_per_client.sum())
  owner = np.repeat(order, blocks_per_client)
  # Sample j of the k-th client laid out goes to real block
  # first_block[k] + j // B, row j % B.
  first_block = np.concatenate([[0], np.cumsum(blocks_per_client)[:-1]])
  within = np.arange(total) - np.repeat(
      np.cumsum(sizes[order]) - sizes[order], sizes[order]
  )
  positions = np.repeat(first_block, sizes[order]) * block_size + within
  sources = np.concatenate(
      [np.asarray(client_indices[client], np.int64) for client in order]
  )

  # Deal the real blocks to the devices in contiguous runs whose lengths
  # differ by at most one; each device's padding blocks follow its run.
  per_shard = capacity // num_shards
  run_starts = np.linspace(0, num_real, num_shards + 1).round().astype(int)
  shard_of = np.searchsorted(run_starts, np.arange(num_real), side="right") - 1
  slot = shard_of * per_shard + np.arange(num_real) - run_starts[shard_of]
  rows = slot[positions // block_size] * block_size + positions % block_size
  client = np.zeros(capacity, np.int32)
  client[slot] = owner
  return _Layout(capacity, block_size, rows, sources, client)


def _fill(
    layout: _Layout, x: np.ndarray, y: np.ndarray, first: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """x, y, mask of blocks [first, first + count); reads only their samples."""
  size = layout.block_size
  keep = (layout.rows >= first * size) & (layout.rows < (first + count) * size)
  rows, sources = layout.rows[keep] - first * size, layout.sources[keep]
  feature_shape = x.shape[1:]
  out_x = np.zeros((count * size,) + feature_shape, np.float32)
  out_y = np.zeros(count * size, np.int32)
  out_mask = np.zeros(count * size, bool)
  out_x[rows] = x[sources]
  out_y[rows] = y[sources]
  out_mask[rows] = True
  return (
      out_x.reshape((count, size) + feature_shape),
      out_y.reshape(count, size),
      out_mask.reshape(count, size),
  )


def federate(
    x: np.ndarray,
    y: np.ndarray,
    client_indices: Sequence[np.ndarray],
    block_size: int | None = None,
    num_shards: int = 1,
    order: Sequence[int] | None = None,
) -> FederatedData:
  """Lays out the clients' samples in blocks (host-side, numpy).

  Args:
    x: [N, *feature_shape] all samples.
    y: [N] integer labels.
    client_indices: for each client, the indices of its samples in x.
    block_size: rows per block; None for `default_block_size`.
    num_shards: number of devices the block axis will be sharded over.
    order: the clients in layout order (a permutation of range(C)); None for
      0..C-1. Client ids (`client`) are unchanged; only placement moves.

  Returns:
    FederatedData with numpy arrays (use `shard` to place them on devices).
  """
  layout = _layout(client_indices, block_size, num_shards, order)
  x, y, mask = _fill(layout, x, y, 0, layout.capacity)
  return FederatedData(x, y, mask, layout.client, len(client_indices))


def distribute(
    x: np.ndarray,
    y: np.ndarray,
    client_indices: Sequence[np.ndarray],
    mesh: Mesh,
    block_size: int | None = None,
    order: Sequence[int] | None = None,
) -> FederatedData:
  """`shard(federate(...), mesh)` for a mesh that may span processes.

  Every process computes the same layout from the client sizes (known to
  all), then gathers only the samples of the blocks on its own devices: a
  process owns the clients (or the part of a client) dealt to its devices,
  and `x` is read only at their indices (x may be a memory map). The block
  axis is sharded over the mesh (`jax.make_array_from_process_local_data`);
  the block -> client map, which every process needs to index its clients'
  models, is replicated. Shapes are those of `federate`, so they depend on
  N, C and the device count only, not on the split or the process count.

  Args:
    x, y, client_indices, block_size, order: as for `federate`.
    mesh: 1-D mesh with axis 'clients' over any devices (e.g. jax.devices()
      across processes); each process's devices must be contiguous in it.

  Returns:
    FederatedData of global jax Arrays.
  """
  layout = _layout(client_indices, block_size, mesh.size, order)
  mine = [
      i
      for i, device in enumerate(mesh.devices.flat)
      if device.process_index == jax.process_index()
  ]
  if not mine or mine != list(range(mine[0], mine[-1] + 1)):
    raise ValueError(
        f"process {jax.process_index()} must hold a contiguous, non-empty "
        f"run of the mesh's devices, holds positions {mine}"
    )
  per_shard = layout.capacity // mesh.size
  local = _fill(layout, x, y, mine[0] * per_shard, len(mine) * per_shard)
  sharded = block_sharding(mesh)
  x, y, mask = (
      jax.make_array_from_process_local_data(
          sharded, part, (layout.capacity,) + part.shape[1:]
      )
      for part in local
  )
  client = jax.make_array_from_callback(
      layout.client.shape,
      NamedSharding(mesh, PartitionSpec()),
      lambda index: layout.client[index],
  )
  return FederatedData(x, y, mask, client, len(client_indices))


def client_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) with the axis 'clients'."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.array(devices), (CLIENTS,))


def block_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of any array whose leading axis is the block axis."""
  return NamedSharding(mesh, PartitionSpec(CLIENTS))


def shard(data: FederatedData, mesh: Mesh) -> FederatedData:
  """Places the block axis of `data` over the mesh's devices."""
  if data.num_blocks % mesh.size:
    raise ValueError(
        f"{data.num_blocks} blocks do not split over "
        f"{mesh.size} devices; federate with num_shards="
        f"{mesh.size}"
    )
  return jax.device_put(data, block_sharding(mesh))


def _take(tree, index):
  return jax.tree.map(lambda a: a[index], tree)


def _edge_segments(counts: jax.Array, segment_index: jax.Array):
  """The segments of a device's first and last counting blocks (-1 if none
  counts): the ones that may go on on a neighbouring device."""
  num = counts.shape[0]
  position = jnp.arange(num, dtype=jnp.int32)
  segment_at = jnp.append(segment_index, -1)  # -1 past the end
  first_block = jnp.min(jnp.where(counts, position, num))
  last_block = jnp.max(jnp.where(counts, position, -1))
  return (
      segment_at[first_block],
      segment_at[jnp.where(last_block >= 0, last_block, num)],
  )


def _varying_zeros(shapes, lead=()):
  """Zeros shaped like the pytree `shapes` (with leading axes `lead`),
  varying over the devices like the per-device results they accumulate."""
  return jax.tree.map(
      lambda s: jax.lax.pcast(
          jnp.zeros(lead + s.shape, s.dtype), CLIENTS, to="varying"
      ),
      shapes,
  )


def _set_row(acc, value, index):
  """acc[index] = value for every leaf of the pytrees (a dynamic-slice
  update: XLA's CPU scatter goes element by element)."""
  return jax.tree.map(
      lambda total, v: jax.lax.dynamic_update_index_in_dim(
          total, v.astype(total.dtype), index, 0
      ),
      acc,
      value,
  )


def _add_row(acc, value, index):
  """acc[index] += value for every leaf of the pytrees (a dynamic-slice
  update: XLA's CPU scatter, `.at[].add`, goes element by element and would
  cost more than the products)."""

  def add_leaf(total, v):
    row = jax.lax.dynamic_index_in_dim(total, index, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(
        total, row + v.astype(total.dtype), index, 0
    )

  return jax.tree.map(add_leaf, acc, value)


def _map_blocks(
    local,
    mesh: Mesh,
    params,
    data: FederatedData,
    param_index: jax.Array,
    segment_index: jax.Array,
    args,
    out_specs=PartitionSpec(),
):
  """shard_map of local(params, x, y, mask, param_index, segment_index, args)
  over the block axis; params and args are replicated."""
  blocks = PartitionSpec(CLIENTS)
  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(PartitionSpec(),) + (blocks,) * 5 + (PartitionSpec(),),
      out_specs=out_specs,
  )(params, data.x, data.y, data.mask, param_index, segment_index, args)


def finalize_each(finalize, sums, present, finalize_args, mesh: Mesh):
  """finalize(sums[s], s, finalize_args) for every segment s, segment s on
  device s mod D; zeros for a segment that is not `present`. (`segment_sum`
  with few segments ends so; FedACnnL's first layer solves the server's
  kept sums so, `fedacnnl.FedACnnL.solve_sums`.)

  Args:
    finalize, finalize_args: as for `segment_sum`.
    sums: pytree of [S, ...] sums, replicated.
    present: [S] bool.
    mesh: mesh with axis 'clients'.

  Returns:
    finalize's pytree stacked [S, ...], replicated.
  """
  num_segments = len(present)
  kept_shapes = jax.eval_shape(finalize, _take(sums, 0), 0, finalize_args)

  def local(sums, present, finalize_args):
    device = jax.lax.axis_index(CLIENTS)

    def one(j, acc):
      segment = device + j * mesh.size

      def write(acc):
        kept = finalize(_take(sums, segment), segment, finalize_args)
        return _set_row(acc, kept, segment)

      inside = segment < num_segments
      return jax.lax.cond(
          inside & present[jnp.minimum(segment, num_segments - 1)],
          write,
          lambda acc: acc,
          acc,
      )

    acc = _varying_zeros(kept_shapes, (num_segments,))
    acc = jax.lax.fori_loop(0, -(-num_segments // mesh.size), one, acc)
    return jax.lax.psum(acc, CLIENTS)

  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(PartitionSpec(),) * 3,
      out_specs=PartitionSpec(),
  )(sums, present, finalize_args)


# A device's walk over its blocks (`_walk`), shared by segment_sum's ways.

# The most full steps whose sum in block_fn's dtype is added to the segment's
# float64 sum at once (see `segment_sum`).
_FLUSH_STEPS = 8


class _Steps(NamedTuple):
  """How blocks are mapped: the same on every device."""

  block_fn: Callable  # as for `segment_sum`
  sizes: tuple[int, ...]  # blocks per merged step, largest first, down to 1
  # [len(sizes)] int32 `sizes`, for the choice at run time; one constant for
  # all of the walk's chunks.
  step_blocks: jax.Array
  shapes: Any  # block_fn's pytree of jax.ShapeDtypeStruct, for one block

  @property
  def sum_shapes(self):
    """`shapes` in float64, the dtype of the segments' sums."""
    return jax.tree.map(lambda s: s.update(dtype=jnp.float64), self.shapes)


def _steps(
    block_fn, params, data: FederatedData, mesh: Mesh, samples_per_step: int
) -> _Steps:
  """Steps of `largest` blocks (up to samples_per_step samples, at most a
  device's blocks), largest / 4, .. 1: a run of n blocks of one segment and
  model takes about log4(n) + 3 n / largest steps."""
  per_device = data.num_blocks // mesh.size
  largest = max(1, min(per_device, samples_per_step // data.block_size))
  sizes = tuple(
      sorted({largest // 4**i for i in range(8)} - {0} | {1}, reverse=True)
  )
  shapes = jax.eval_shape(
      block_fn, _take(params, 0), data.x[0], data.y[0], data.mask[0]
  )
  return _Steps(block_fn, sizes, jnp.array(sizes, jnp.int32), shapes)


class _Blocks(NamedTuple):
  """One device's n blocks (inside shard_map): their runs and edges."""

  params: Any  # the stacked models, replicated
  x: jax.Array  # [n, B, ...]
  y: jax.Array  # [n, B]
  mask: jax.Array  # [n, B]
  param_index: jax.Array  # [n] int32
  segment_at: jax.Array  # [n + 1] int32: each block's segment, -1 past the end
  # [n] int32: how many blocks from b on count and share b's segment and model
  # (the next break in such a chain), for b that counts.
  run: jax.Array
  # [n + 1] int32: the first block from b on that counts (n if none).
  next_: jax.Array
  # The segments that may go on on a neighbouring device, -1 for none:
  # the device's first segment (it may have begun on the device before) and
  # its last (it may go on after), if that is another one.
  first_id: jax.Array  # int32
  last_id: jax.Array  # int32
  # The first counting block of the last edge's run, where the interior
  # segments end (next_[0] if there is no last edge).
  tail: jax.Array  # int32


def _blocks(params, x, y, mask, param_index, segment_index) -> _Blocks:
  """`_Blocks` of a device's part of segment_sum's arguments."""
  num = x.shape[0]
  counts = mask.any(axis=1) & (segment_index >= 0)  # [n]
  position = jnp.arange(num, dtype=jnp.int32)
  joined = (  # [n - 1] blocks b and b + 1 are in one run
      counts[:-1]
      & counts[1:]
      & (segment_index[:-1] == segment_index[1:])
      & (param_index[:-1] == param_index[1:])
  )
  breaks = jnp.append(jnp.where(joined, num, position[:-1]), num - 1)
  run = jax.lax.cummin(breaks, reverse=True) - position + 1
  next_ = jnp.append(
      jax.lax.cummin(jnp.where(counts, position, num), reverse=True), num
  )
  segment_at = jnp.append(segment_index, -1)
  first_id, last_id = _edge_segments(counts, segment_index)
  # The last run (of last_id) begins after the last block of another
  # segment; if that is the first run, there is no separate last edge.
  other = jnp.max(jnp.where(counts & (segment_index != last_id), position, -1))
  tail = next_[other + 1]
  last_id = jnp.where(tail > next_[0], last_id, -1)
  return _Blocks(
      params,
      x,
      y,
      mask,
      param_index,
      segment_at,
      run,
      next_,
      first_id,
      last_id,
      tail,
  )


def _products(steps: _Steps, blocks: _Blocks, size: int, index: jax.Array):
  """block_fn on the rows of `size` blocks from `index` on, with the model of
  block `index`."""
  x, y, mask = (  # [size, B, ...], [size, B], [size, B]
      jax.lax.dynamic_slice_in_dim(a, index, size)
      for a in (blocks.x, blocks.y, blocks.mask)
  )
  return steps.block_fn(
      _take(blocks.params, blocks.param_index[index]),
      x.reshape((-1,) + x.shape[2:]),
      y.reshape(-1),
      mask.reshape(-1),
  )


def _chunk(steps: _Steps, blocks: _Blocks, index: jax.Array):
  """Sums the blocks from `index` (which counts) on, at most _FLUSH_STEPS full
  steps of its run, in block_fn's dtype.

  Returns:
    (the block after them, their sum in float64).
  """
  stop = index + jnp.minimum(blocks.run[index], _FLUSH_STEPS * steps.sizes[0])
  step_blocks = steps.step_blocks
  branches = [
      functools.partial(_products, steps, blocks, size) for size in steps.sizes
  ]

  def step(carry):
    index, running = carry
    # The largest step that stays inside the chunk.
    choice = jnp.sum(stop - index < step_blocks)
    out = jax.lax.switch(choice, branches, index)
    return index + step_blocks[choice], jax.tree.map(jnp.add, running, out)

  _, running = jax.lax.while_loop(
      lambda carry: carry[0] < stop,
      step,
      (index, _varying_zeros(steps.shapes)),
  )
  return stop, jax.tree.map(lambda a: a.astype(jnp.float64), running)


def _segment_total(
    steps: _Steps, blocks: _Blocks, index: jax.Array, segment: jax.Array
):
  """Sums the segment's blocks from `index` on: the run of them that the
  first counting block from there begins (none if it is another segment's;
  segment -2 takes none).

  Returns:
    (the block after them, their float64 sum).
  """

  def more(carry):
    index, total = carry
    index, running = _chunk(steps, blocks, blocks.next_[index])
    return index, jax.tree.map(jnp.add, total, running)

  return jax.lax.while_loop(
      lambda carry: blocks.segment_at[blocks.next_[carry[0]]] == segment,
      more,
      (index, _varying_zeros(steps.sum_shapes)),
  )


def _walk(
    steps: _Steps,
    blocks: _Blocks,
    num_segments: int,
    kept_shapes,
    finalize=None,
    finalize_args=(),
):
  """Sums a device's segments one after the other, in block order.

  The edges (`_Blocks`) are summed but not kept here; every segment in
  between is complete here: it is summed, kept (finalized) and written once,
  with no conditional over large arrays.

  Args:
    steps: how blocks are mapped.
    blocks: the device's blocks.
    num_segments: S.
    kept_shapes: pytree of jax.ShapeDtypeStruct: what is kept of a segment
      (finalize's result, or the sum's shapes without finalize).
    finalize, finalize_args: as for `segment_sum`; None keeps the sums.

  Returns:
    (((first_id, first), (last_id, last)), acc): the device's edge segments
    (-1 for none) with their float64 sums (zeros for none), and [S, ...]
    what is kept of each interior segment (zeros for the others).
  """
  segment_at, next_ = blocks.segment_at, blocks.next_
  first_id, last_id = blocks.first_id, blocks.last_id
  zero = jax.lax.pcast(jnp.int32(0), CLIENTS, to="varying")
  index, first = _segment_total(
      steps, blocks, zero, jnp.where(first_id >= 0, first_id, -2)
  )

  def middle_segment(carry):
    index, acc = carry
    segment = segment_at[next_[index]]
    index, total = _segment_total(steps, blocks, index, segment)
    if finalize is not None:
      total = finalize(total, segment, finalize_args)
    return index, _add_row(acc, total, segment)

  index, acc = jax.lax.while_loop(
      lambda carry: next_[carry[0]] < blocks.tail,
      middle_segment,
      (index, _varying_zeros(kept_shapes, (num_segments,))),
  )
  _, last = _segment_total(
      steps, blocks, index, jnp.where(last_id >= 0, last_id, -2)
  )
  return ((first_id, first), (last_id, last)), acc


def _finalize_edges(finalize, finalize_args, edges, acc):
  """Adds finalize(total) of the edge segments to a device's results.

  The edges of all devices (2 per device) are gathered, added up per
  segment, and each segment is finalized once, by the device of its first
  edge.

  Args:
    finalize, finalize_args: as for `segment_sum`.
    edges: the device's ((first_id, first), (last_id, last)), as `_walk`
      gives them.
    acc: [S, ...] the device's finalized interior segments.

  Returns:
    acc plus finalize(total) of each edge segment the device finalizes.
  """
  (first_id, first), (last_id, last) = edges
  # [2 D]: device d's edges at 2 d and 2 d + 1.
  ids = jax.lax.all_gather(jnp.stack([first_id, last_id]), CLIENTS)
  ids = ids.reshape(-1)
  sums = jax.tree.map(  # [2 D, ...]
      lambda a, b: jax.lax.all_gather(jnp.stack([a, b]), CLIENTS).reshape(
          (-1,) + a.shape
      ),
      first,
      last,
  )
  same = (ids[:, None] == ids[None, :]) & (ids[None, :] >= 0)  # [2 D, 2 D]
  combined = jax.tree.map(  # [2 D, ...]: the total of each edge's segment
      lambda a: jnp.tensordot(same.astype(a.dtype), a, 1), sums
  )
  owner = jnp.argmax(same, axis=1)  # [2 D] the first edge of its segment

  def edge(j, acc):
    e = 2 * jax.lax.axis_index(CLIENTS) + j
    return jax.lax.cond(
        (ids[e] >= 0) & (owner[e] == e),
        lambda acc: _add_row(
            acc, finalize(_take(combined, e), ids[e], finalize_args), ids[e]
        ),
        lambda acc: acc,
        acc,
    )

  return jax.lax.fori_loop(0, 2, edge, acc)


def _plain_sums(
    block_fn,
    params,
    data: FederatedData,
    param_index: jax.Array,
    segment_index: jax.Array,
    num_segments: int,
    mesh: Mesh,
    samples_per_step: int,
):
  """`segment_sum` without finalize: each device writes the sums of all its
  segments, edges included, into [S, ...], and psum adds the devices' up.

  Arguments as for `segment_sum` (param_index, segment_index int32).
  """
  steps = _steps(block_fn, params, data, mesh, samples_per_step)

  def local(params, x, y, mask, param_index, segment_index, args):
    del args  # no finalize_args
    blocks = _blocks(params, x, y, mask, param_index, segment_index)
    edges, acc = _walk(steps, blocks, num_segments, steps.sum_shapes)
    for edge_id, edge in edges:
      acc = _add_row(
          acc,
          jax.tree.map(lambda t: jnp.where(edge_id >= 0, t, 0), edge),
          jnp.maximum(edge_id, 0),
      )
    return jax.lax.psum(acc, CLIENTS)

  return _map_blocks(local, mesh, params, data, param_index, segment_index, ())


def _few_segments(
    block_fn,
    params,
    data: FederatedData,
    param_index: jax.Array,
    segment_index: jax.Array,
    num_segments: int,
    mesh: Mesh,
    samples_per_step: int,
    finalize,
    finalize_args,
):
  """`segment_sum` with finalize for S <= 2 D: `_plain_sums`, then each
  segment that has blocks is finalized by one device (`finalize_each`).

  Arguments as for `segment_sum` (param_index, segment_index int32).
  """
  sums = _plain_sums(
      block_fn,
      params,
      data,
      param_index,
      segment_index,
      num_segments,
      mesh,
      samples_per_step,
  )
  counted = data.mask.any(1) & (segment_index >= 0)
  present = (  # (a negative index would wrap around, not drop)
      jnp.zeros(num_segments, bool)
      .at[jnp.where(counted, segment_index, num_segments)]
      .set(True, mode="drop")
  )
  return finalize_each(finalize, sums, present, finalize_args, mesh)


def _edge_gather(
    block_fn,
    params,
    data: FederatedData,
    param_index: jax.Array,
    segment_index: jax.Array,
    num_segments: int,
    mesh: Mesh,
    samples_per_step: int,
    finalize,
    finalize_args,
):
  """`segment_sum` with finalize for S > 2 D: each device finalizes its
  interior segments as it goes (`_walk`) and the edges after the walk
  (`_finalize_edges`); psum adds the devices' results up.

  Arguments as for `segment_sum` (param_index, segment_index int32).
  """
  steps = _steps(block_fn, params, data, mesh, samples_per_step)
  kept_shapes = jax.eval_shape(finalize, steps.sum_shapes, 0, finalize_args)

  def local(params, x, y, mask, param_index, segment_index, finalize_args):
    blocks = _blocks(params, x, y, mask, param_index, segment_index)
    edges, acc = _walk(
        steps, blocks, num_segments, kept_shapes, finalize, finalize_args
    )
    acc = _finalize_edges(finalize, finalize_args, edges, acc)
    return jax.lax.psum(acc, CLIENTS)

  return _map_blocks(
      local, mesh, params, data, param_index, segment_index, finalize_args
  )


def segment_sum(
    block_fn,
    params,
    data: FederatedData,
    param_index: jax.Array,
    segment_index: jax.Array,
    num_segments: int,
    mesh: Mesh,
    samples_per_step: int = 1024,
    finalize=None,
    finalize_args=(),
):
  """Maps `block_fn` over all blocks and sums its results per segment.

  This is how clients are mapped: the block axis is sharded over the mesh
  (`shard_map`); each device walks over its blocks and folds each result
  into the float64 sum of the block's segment; the devices' partial sums are
  then added (`psum`), so every device holds the result. Blocks without real
  samples or with a negative segment are skipped.

  A step takes as many neighbouring blocks of one segment and one model as
  it can, up to `samples_per_step` samples, in one `block_fn` call (step
  sizes largest, largest / 4, .., 1 blocks, chosen at run time from the
  length of the run of such blocks): the sum is the same, and one large
  product costs far less than many small ones. `federate` lays a client's
  (or a group's) blocks out next to each other, so FedACnnL's single
  segment takes full steps and a client of n blocks about log4(n) + 3 n /
  largest of them. The steps of a chunk (up to 8 full steps of one run) add
  into a running sum in block_fn's dtype (float32 products: half the memory
  traffic of a float64 sum), which is then added to the segment's float64
  sum; this bounds the float32 rounding by that of 8 full steps (measured
  1.3e-7 relative on MNIST's grams). A step touches nothing but its product
  and the running sum; the segment's sum changes once per chunk, and the
  [S, ...] results once per segment (a loop over a device's segments, each
  summed by a loop over its chunks), with no conditional over large arrays,
  which XLA would copy every time (`_walk`). (A vmap over the blocks of a
  step was measured 2-4x slower than this loop on CPU: XLA's batched small
  dots are slow there.)

  With `finalize`, what is kept of a segment is finalize(its sum), computed
  as soon as the segment is complete: per-client statistics become a
  per-client solve (pFedACnnL's personalization) without ever holding
  [S, d, d] sums. The segments a device saw first and last may go on on a
  neighbouring device: those (two per device) are kept as sums, gathered
  from all devices, added up per segment and finalized after the loop. Each
  segment's blocks must then lie next to each other (one run per segment,
  as `federate` lays out clients); a segment without blocks gives zeros.
  With no more segments than edges (S <= 2 devices: the server's global or
  group sums) the [S, ...] sums are added up instead and each segment is
  finalized by one device, segment s by device s mod D.

  Args:
    block_fn: (params, x [n, ...], y [n], mask [n]) -> pytree of arrays;
      what one client computes on a batch of its data. It must be additive
      over samples and give zero for masked ones (merged steps include the
      padding of partly filled blocks).
    params: pytree stacked on a leading model axis.
    data: blocks sharded over `mesh`.
    param_index: [num_blocks] int32: which stacked params each block uses.
    segment_index: [num_blocks] int32 in [0, num_segments), or negative to
      leave the block out.
    num_segments: S.
    mesh: mesh with axis 'clients'.
    samples_per_step: the most samples per merged step.
    finalize: None, or (sums, segment, finalize_args) -> pytree: applied to
      each segment's complete float64 sum (block_fn's pytree without the
      segment axis) and its index.
    finalize_args: a pytree that finalize reads (e.g. per-segment priors),
      replicated.

  Returns:
    block_fn's pytree with every leaf [S, ...] float64, or finalize's
    pytree stacked [S, ...].
  """
  args = (
      block_fn,
      params,
      data,
      jnp.asarray(param_index, jnp.int32),
      jnp.asarray(segment_index, jnp.int32),
      num_segments,
      mesh,
      samples_per_step,
  )
  if finalize is None:
    return _plain_sums(*args)
  if num_segments <= 2 * mesh.size:
    # As many segments as edges (two per device) or fewer: their [S, ...]
    # sums are no larger than the gathered edges, so add them up (psum)
    # and deal the finalizes out over the devices. (Gathering 2 x 8 edge
    # grams of 785 x 785 made FedACnnL's rounds on 8 devices 3x slower.)
    return _few_segments(*args, finalize, finalize_args)
  return _edge_gather(*args, finalize, finalize_args)


def segment_apply(
    fn,
    params,
    data: FederatedData,
    param_index: jax.Array,
    segment_index: jax.Array,
    num_segments: int,
    mesh: Mesh,
    max_blocks: int,
    fn_args=(),
):
  """Applies `fn` to all of a segment's data at once, for small segments.

  The companion of `segment_sum` for what is not a sum over blocks (the dual
  form of a client's ridge solve needs its rows together). Each device
  takes the segments that lie wholly inside its part of the block axis (all
  but its first and last, which may go on on a neighbour) and span at most
  `max_blocks` blocks; one at a time (a while loop over just those), it
  slices the segment's blocks into one batch of a static size (1 ..
  max_blocks blocks, chosen at run time, the extra blocks masked out) and
  calls `fn` on it. Each segment's blocks must lie next to each other and
  use one model (as `federate` lays out clients).

  Args:
    fn: (params, x [m * B, ...], y [m * B], mask [m * B], segment,
      fn_args) -> pytree; masked rows are zero in x and must not count.
    params, data, param_index, segment_index, num_segments, mesh: as for
      `segment_sum`.
    max_blocks: the largest segment taken, in blocks.
    fn_args: a pytree that fn reads, replicated.

  Returns:
    (fn's pytree stacked [S, ...], zeros for the segments not taken,
    replicated; [num_blocks] bool, True on the blocks of the segments
    taken, sharded like the blocks).
  """
  param_index = jnp.asarray(param_index, jnp.int32)
  segment_index = jnp.asarray(segment_index, jnp.int32)
  sizes = tuple(range(1, max_blocks + 1))
  out_shapes = jax.eval_shape(
      lambda p, x, y, m: fn(
          p,
          x.reshape((-1,) + x.shape[2:]),
          y.reshape(-1),
          m.reshape(-1),
          0,
          fn_args,
      ),
      _take(params, 0),
      data.x[:1],
      data.y[:1],
      data.mask[:1],
  )

  def local(params, x, y, mask, param_index, segment_index, fn_args):
    num = x.shape[0]
    position = jnp.arange(num, dtype=jnp.int32)
    counts = mask.any(axis=1) & (segment_index >= 0)
    segment = jnp.where(counts, segment_index, -1)
    previous = jnp.concatenate([jnp.array([-1], jnp.int32), segment[:-1]])
    following = jnp.append(segment[1:], -1)
    starts = counts & (segment != previous)
    ends = counts & (segment != following)
    # Blocks of the run that begins at each start: the next end from there.
    end_at = jax.lax.cummin(jnp.where(ends, position, num), reverse=True)
    length = end_at - position + 1
    first, last = _edge_segments(counts, segment_index)
    take = (
        starts & (length <= max_blocks) & (segment != first) & (segment != last)
    )
    chosen = jnp.nonzero(take, size=num, fill_value=num)[0]
    acc = _varying_zeros(out_shapes, (num_segments,))

    def branch(blocks):
      def apply(start):
        n = length[start]
        begin = jnp.minimum(start, num - blocks)  # dynamic_slice would clamp
        inside = (begin + jnp.arange(blocks) >= start) & (
            begin + jnp.arange(blocks) < start + n
        )
        x_, y_, mask_ = (
            jax.lax.dynamic_slice_in_dim(a, begin, blocks) for a in (x, y, mask)
        )
        mask_ = mask_ & inside[:, None]
        x_ = x_ * mask_.reshape(mask_.shape + (1,) * (x_.ndim - 2))
        return fn(
            _take(params, param_index[start]),
            x_.reshape((-1,) + x_.shape[2:]),
            (y_ * mask_).reshape(-1),
            mask_.reshape(-1),
            segment[start],
            fn_args,
        )

      return apply

    def body(j, acc):
      start = chosen[j]
      out = jax.lax.switch(length[start] - 1, [branch(b) for b in sizes], start)
      return _set_row(acc, out, segment[start])

    acc = jax.lax.fori_loop(0, take.sum(), body, acc)
    # A block is taken with its run: mark the runs that begin at a take.
    taken_start = jax.lax.cummax(jnp.where(take, position, -1))
    taken = (
        counts
        & (taken_start >= 0)
        & (position <= end_at[jnp.maximum(taken_start, 0)])
    )
    return jax.lax.psum(acc, CLIENTS), taken

  return _map_blocks(
      local,
      mesh,
      params,
      data,
      param_index,
      segment_index,
      fn_args,
      (PartitionSpec(), PartitionSpec(CLIENTS)),
  )
