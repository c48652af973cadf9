"""Reorder schedules shared by the golden model, the compiler and the testbenches.

Two orders are defined here, once, because they change bits (online-softmax update order,
saturating accumulation order) and cycle counts:

1. Attention (QK^T) constant-bandwidth reorder, after Edge-MoE.
2. Patch reordering for the mixture of experts: per-expert token queues, the metaqueue of active
   experts, and the scatter-accumulate order of the expert outputs.

Attention schedule (per head; n tokens = n query rows = n keys, P resident query rows, "lanes")
-------------------------------------------------------------------------------------------------
Lane o (0 <= o < P) owns the query rows r with r mod P == o, i.e. rows o, o+P, o+2P, ...
(group g = r // P is the g-th row a lane holds). One K block (the head's K row of one token) is
read per cycle from a stream that cycles through the keys, key(t) = t mod n, and is broadcast
to every busy lane. A lane takes its next row when the K stream reaches the lane's start key
o (and its previous row is done, which is exactly then: a row takes n consecutive cycles, so it
ends the cycle before the stream comes back to o); that cycle it reads the row's Q block.
Closed form, with t the cycle inside the head:

    start(r) = (r // P) * n + (r mod P)         cycle at which row r reads its Q block
    row r at step s (0 <= s < n) is at cycle start(r) + s and consumes key (r mod P + s) mod n

so row r consumes its n keys in the order r mod P, r mod P + 1, ..., n-1, 0, ..., r mod P - 1
(row_key_order; this is the order in which the online softmax sees the scores of row r).
Properties (tested): at each cycle at most one K block read (the stream) and at most one Q block
read (two rows start at the same cycle only if they share r mod P and r // P, i.e. never),
whatever P is; every (row, key) pair exactly once; the pipeline never idles between groups
(lane o's next row starts the cycle after its previous row ends); a partial last group
(n mod P != 0) just leaves the lanes without rows idle. P > n behaves as P = n.

Cycles per head = start(n-1) + n = ((n-1) // P) * n + (n-1) mod P + n  (attention_cycles).
P = 1 gives n^2, P >= n gives 2n - 1; in general n^2/P <= cycles <= n^2/P + n + P.

Heads iterate outside: head h runs entirely after head h-1 (the pipeline drains between heads,
at most P-1 cycles each), so the K stream never mixes two heads and stays at one K block read
per cycle. A cycle's pairs therefore all belong to one head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np


class ScheduleError(ValueError):
    """Bad arguments or bad routing tensors handed to a schedule function."""


# --------------------------------------------------------------------------------------------
# Attention reorder
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cycle:
    """What happens in one cycle: the key whose K block is read (None: no K read), the query row
    whose Q block is read (None: no Q read), and the (head, row, key) score pairs produced."""
    k_read: int | None
    q_read: int | None
    pairs: tuple[tuple[int, int, int], ...]

    @property
    def head(self) -> int | None:
        return self.pairs[0][0] if self.pairs else None


def _check_attn_args(n, P, heads=1):
    for name, v in (("n", n), ("P", P), ("heads", heads)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ScheduleError(f"attention schedule: {name} = {v!r} must be a positive integer")


def attention_cycles(n: int, P: int, heads: int = 1) -> int:
    """Cycles of the QK^T reorder schedule: heads * (((n-1)//P)*n + (n-1)%P + n)."""
    _check_attn_args(n, P, heads)
    return heads * (((n - 1) // P) * n + (n - 1) % P + n)


def row_key_order(n: int, P: int) -> np.ndarray:
    """[n, n] int64: entry [r, s] is the key that query row r consumes at its step s."""
    _check_attn_args(n, P)
    r = np.arange(n)[:, None]
    s = np.arange(n)[None, :]
    return ((r % P + s) % n).astype(np.int64)


def attention_schedule(n: int, P: int, heads: int = 1) -> Iterator[Cycle]:
    """Yields one Cycle per clock of the QK^T reorder (see the module docstring).

    Written as the lane-level machine the hardware implements (a key counter, a Q loader, P
    lanes with a step counter each), not from the closed form, so that the tests check the
    closed forms (attention_cycles, row_key_order) against it."""
    _check_attn_args(n, P, heads)
    lanes = min(P, n)
    for h in range(heads):
        next_row = list(range(lanes))          # lane o's next row: o, o+P, o+2P, ...
        row = [None] * lanes                   # row held by each lane (None: idle)
        left = [0] * lanes                     # keys the held row still needs
        t = 0
        while any(r is not None for r in row) or any(r < n for r in next_row):
            key = t % n
            q = None
            if key < lanes and row[key] is None and next_row[key] < n:
                o = key                        # the stream is at lane o's start key: load a row
                row[o], left[o] = next_row[o], n
                next_row[o] += P
                q = row[o]
            pairs = []
            for o in range(lanes):
                if row[o] is not None:
                    pairs.append((h, row[o], key))
                    left[o] -= 1
                    if left[o] == 0:
                        row[o] = None
            yield Cycle(k_read=key if pairs else None, q_read=q, pairs=tuple(pairs))
            t += 1


@dataclass(frozen=True)
class ScheduleStats:
    cycles: int
    max_k_reads_per_cycle: int
    max_q_reads_per_cycle: int
    k_reads: int
    q_reads: int
    total_reads: int
    utilisation: float          # busy lane-cycles / (P * cycles)
    pairs: int


def schedule_stats(n: int, P: int, heads: int = 1) -> ScheduleStats:
    """Measured (by running attention_schedule) cycles, reads and lane utilisation."""
    cycles = k = q = maxk = maxq = pairs = 0
    for c in attention_schedule(n, P, heads):
        kr = 0 if c.k_read is None else 1
        qr = 0 if c.q_read is None else 1
        cycles += 1
        k += kr
        q += qr
        maxk, maxq = max(maxk, kr), max(maxq, qr)
        pairs += len(c.pairs)
    return ScheduleStats(cycles=cycles, max_k_reads_per_cycle=maxk, max_q_reads_per_cycle=maxq,
                         k_reads=k, q_reads=q, total_reads=k + q,
                         utilisation=pairs / (P * cycles), pairs=pairs)


# --------------------------------------------------------------------------------------------
# Patch reordering (expert queues)
# --------------------------------------------------------------------------------------------
#
# Order, defined here once:
#   queue of expert e  = the tokens routed to e, in increasing token index (the order the gate
#                        unit writes them while it walks the tokens);
#   metaqueue          = experts with a non-empty queue, in increasing expert id;
#   execution order    = expert by expert over the metaqueue, tokens in queue order; each
#                        (expert, token) result is scaled by its gate weight and accumulated into
#                        the token's output row in exactly this order. So a token's k
#                        contributions are added in increasing EXPERT id, not in slot order.

class ExpertQueue(NamedTuple):
    tokens: np.ndarray   # int64 [n_e], increasing
    weights: np.ndarray  # [n_e], gate weight of each token for this expert (dtype of topk_w)


def _check_routing(topk_idx, topk_w, num_experts):
    if not isinstance(num_experts, (int, np.integer)) or isinstance(num_experts, bool) or num_experts < 1:
        raise ScheduleError(f"num_experts = {num_experts!r} must be a positive integer")
    idx = np.asarray(topk_idx)
    w = np.asarray(topk_w)
    if idx.ndim != 2:
        raise ScheduleError(f"topk_idx must be [N, k], got shape {list(idx.shape)}")
    if w.shape != idx.shape:
        raise ScheduleError(f"topk_w shape {list(w.shape)} does not match topk_idx shape {list(idx.shape)}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ScheduleError(f"topk_idx must hold integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    N, k = idx.shape
    if k > num_experts:
        raise ScheduleError(f"topk_idx has k = {k} slots per token but only {num_experts} experts")
    bad = (idx < 0) | (idx >= num_experts)
    if bad.any():
        t, s = map(int, np.argwhere(bad)[0])
        raise ScheduleError(f"topk_idx[{t}, {s}] = {idx[t, s]} out of range 0..{num_experts - 1} (num_experts)")
    if k > 1:
        srt = np.sort(idx, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(axis=1)
        if dup.any():
            t = int(np.flatnonzero(dup)[0])
            e = int(srt[t, 1:][srt[t, 1:] == srt[t, :-1]][0])
            raise ScheduleError(f"topk_idx[{t}] = {idx[t].tolist()}: expert {e} appears twice in "
                                f"token {t}'s top-k (top-k experts must be distinct)")
    return idx, w


def scatter_order(topk_idx, topk_w, num_experts):
    """The execution / scatter-accumulate order as flat arrays (expert, token, slot, weight),
    each of length N*k: the golden model accumulates out[token] += weight * expert(x[token])
    walking these arrays in order."""
    idx, w = _check_routing(topk_idx, topk_w, num_experts)
    N, k = idx.shape
    tok = np.repeat(np.arange(N, dtype=np.int64), k)
    slot = np.tile(np.arange(k, dtype=np.int64), N)
    exp = idx.reshape(-1)
    # Sort by expert, then token (lexsort: last key is primary). Slot ties cannot occur because
    # a token's experts are distinct.
    order = np.lexsort((tok, exp))
    return exp[order], tok[order], slot[order], w.reshape(-1)[order]


def build_expert_queues(topk_idx, topk_w, num_experts) -> list[ExpertQueue]:
    """Per expert e: ExpertQueue(tokens routed to e in increasing order, their gate weights)."""
    exp, tok, _, wts = scatter_order(topk_idx, topk_w, num_experts)
    bounds = np.searchsorted(exp, np.arange(num_experts + 1))
    return [ExpertQueue(tok[bounds[e]:bounds[e + 1]], wts[bounds[e]:bounds[e + 1]])
            for e in range(num_experts)]


def active_experts(queues) -> list[int]:
    """The metaqueue: ids of experts with a non-empty queue, increasing."""
    return [e for e, q in enumerate(queues) if len(q[0])]


def expert_execution_order(topk_idx, topk_w, num_experts) -> Iterator[tuple[int, int, int, object]]:
    """Yields (expert, token, slot, weight) in the order the hardware executes and accumulates."""
    exp, tok, slot, wts = scatter_order(topk_idx, topk_w, num_experts)
    for i in range(len(exp)):
        yield int(exp[i]), int(tok[i]), int(slot[i]), wts[i].item()
