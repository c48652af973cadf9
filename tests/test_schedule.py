"""Reorder schedules: attention constant-bandwidth order and MoE patch reordering."""
from collections import Counter

import numpy as np
import pytest

from edgemoe.quant.schedule import (Cycle, ScheduleError, active_experts, attention_cycles,
                            attention_schedule, build_expert_queues, expert_execution_order,
                            row_key_order, schedule_stats, scatter_order)

NS = (1, 9, 10, 129)
PS = range(1, 9)


def _run(n, P, heads=1):
    return list(attention_schedule(n, P, heads))


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("P", PS)
def test_attention_schedule_properties(n, P):
    heads = 2 if n < 100 else 1           # heads > 1 on the small sizes keeps the run fast
    cycles = _run(n, P, heads)
    # one K and at most one Q block per cycle, whatever P is
    assert all(isinstance(c, Cycle) for c in cycles)
    assert all(c.k_read is not None for c in cycles)     # the K stream never idles
    # every (head, row, key) exactly once
    pairs = Counter(p for c in cycles for p in c.pairs)
    assert len(pairs) == heads * n * n and set(pairs.values()) == {1}
    assert set(pairs) == {(h, r, k) for h in range(heads) for r in range(n) for k in range(n)}
    # every pair of a cycle uses the K block read that cycle, and one head per cycle
    for c in cycles:
        assert {k for _, _, k in c.pairs} == {c.k_read}
        assert len({h for h, _, _ in c.pairs}) == 1
        assert len(c.pairs) <= min(P, n)
    # Q: each row read exactly once per head, before (in the same cycle as) its first pair
    qs = [(c.pairs[0][0], c.q_read) for c in cycles if c.q_read is not None]
    assert sorted(qs) == [(h, r) for h in range(heads) for r in range(n)]
    # heads iterate outside: head sequence is non-decreasing
    hs = [c.head for c in cycles]
    assert hs == sorted(hs)
    # closed-form cycle count
    assert len(cycles) == attention_cycles(n, P, heads)
    assert attention_cycles(n, P, heads) == heads * (((n - 1) // P) * n + (n - 1) % P + n)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("P", PS)
def test_row_key_order_matches_schedule(n, P):
    order = row_key_order(n, P)
    assert order.shape == (n, n)
    seen = {r: [] for r in range(n)}
    first = {}
    for t, c in enumerate(attention_schedule(n, P)):
        if c.q_read is not None:
            first[c.q_read] = t
        for _, r, k in c.pairs:
            seen[r].append(k)
    for r in range(n):
        np.testing.assert_array_equal(order[r], seen[r])
        # stated order: start at key r mod P, wrap around
        assert order[r, 0] == r % P % n
        np.testing.assert_array_equal(order[r], (r % P + np.arange(n)) % n)
        # stated start cycle: (r // P) * n + r mod P
        assert first[r] == (r // P) * n + r % P


def test_row_key_order_is_a_permutation_per_row():
    for n in (5, 17):
        for P in (1, 3, 4, 20):
            o = row_key_order(n, P)
            np.testing.assert_array_equal(np.sort(o, axis=1), np.tile(np.arange(n), (n, 1)))


def test_bandwidth_constant_in_P_cycles_shrink():
    n = 129
    prev = None
    for P in PS:
        s = schedule_stats(n, P)
        assert s.max_k_reads_per_cycle == 1 and s.max_q_reads_per_cycle == 1
        assert s.k_reads == s.cycles and s.q_reads == n
        assert s.total_reads == s.cycles + n
        assert s.pairs == n * n
        assert s.cycles == attention_cycles(n, P)
        # ~ n^2 / P: within one row of fill / partial group
        assert n * n / P <= s.cycles <= n * n / P + n + P
        assert s.utilisation == pytest.approx(n * n / (P * s.cycles))
        assert s.utilisation > 0.9
        if prev is not None:
            assert s.cycles < prev.cycles
            # reads per cycle do not grow with P (about 1 K + n/cycles Q)
            assert s.total_reads / s.cycles <= 1 + n / s.cycles + 1e-12
        prev = s
    assert schedule_stats(n, 1).cycles / schedule_stats(n, 8).cycles > 7.5


def test_small_cases_by_hand():
    # n = 3, P = 2: lane 0 holds rows 0 and 2, lane 1 holds row 1.
    cyc = _run(3, 2)
    assert [(c.k_read, c.q_read, c.pairs) for c in cyc] == [
        (0, 0, ((0, 0, 0),)),
        (1, 1, ((0, 0, 1), (0, 1, 1))),
        (2, None, ((0, 0, 2), (0, 1, 2))),
        (0, 2, ((0, 2, 0), (0, 1, 0))),
        (1, None, ((0, 2, 1),)),
        (2, None, ((0, 2, 2),)),
    ]
    assert attention_cycles(3, 2) == 6
    assert attention_cycles(5, 1) == 25          # P = 1: n^2
    assert attention_cycles(5, 8) == 9           # P >= n: 2n - 1
    assert attention_cycles(129, 4, heads=3) == 3 * (32 * 129 + 0 + 129)


@pytest.mark.parametrize("bad", [(0, 4, 1), (9, 0, 1), (9, 4, 0), (9.0, 4, 1), (-3, 1, 1)])
def test_attention_bad_args(bad):
    with pytest.raises(ScheduleError, match="positive integer"):
        attention_cycles(*bad)
    with pytest.raises(ScheduleError, match="positive integer"):
        list(attention_schedule(*bad))


# ---------------------------------------------------------------- patch reordering


def _random_routing(N, k, E, seed):
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(E, size=k, replace=False) for _ in range(N)])
    w = rng.random((N, k)).astype(np.float32)
    return idx, w


@pytest.mark.parametrize("N,k,E,seed", [(129, 2, 16, 0), (10, 1, 4, 1), (33, 4, 5, 2), (7, 3, 3, 3)])
def test_expert_queues(N, k, E, seed):
    idx, w = _random_routing(N, k, E, seed)
    queues = build_expert_queues(idx, w, E)
    assert len(queues) == E
    seen = Counter()
    for e, (tok, wt) in enumerate(queues):
        assert tok.dtype == np.int64
        assert np.all(np.diff(tok) > 0)                       # increasing token index
        for t, g in zip(tok, wt):
            s = int(np.flatnonzero(idx[t] == e)[0])
            assert g == w[t, s]
            seen[(int(t), s)] += 1
    assert seen == Counter({(t, s): 1 for t in range(N) for s in range(k)})


def test_metaqueue_skips_inactive_experts():
    idx = np.array([[5, 2], [2, 0], [5, 0]])
    w = np.array([[0.6, 0.3], [0.5, 0.4], [0.7, 0.2]])
    queues = build_expert_queues(idx, w, 8)
    assert active_experts(queues) == [0, 2, 5]
    np.testing.assert_array_equal(queues[0].tokens, [1, 2])
    np.testing.assert_array_equal(queues[0].weights, [0.4, 0.2])
    np.testing.assert_array_equal(queues[2].tokens, [0, 1])
    np.testing.assert_array_equal(queues[5].tokens, [0, 2])
    for e in (1, 3, 4, 6, 7):
        assert len(queues[e].tokens) == 0
    order = list(expert_execution_order(idx, w, 8))
    assert order == [(0, 1, 1, 0.4), (0, 2, 1, 0.2), (2, 0, 1, 0.3), (2, 1, 0, 0.5),
                     (5, 0, 0, 0.6), (5, 2, 0, 0.7)]


def test_execution_order_matches_queues_and_scatter_order():
    idx, w = _random_routing(50, 2, 6, 7)
    queues = build_expert_queues(idx, w, 6)
    expected = [(e, int(t)) for e in active_experts(queues) for t in queues[e].tokens]
    got = list(expert_execution_order(idx, w, 6))
    assert [(e, t) for e, t, _, _ in got] == expected
    for e, t, s, g in got:
        assert idx[t, s] == e and g == w[t, s]
    ex, tk, sl, wt = scatter_order(idx, w, 6)
    assert list(zip(ex.tolist(), tk.tolist(), sl.tolist())) == [(e, t, s) for e, t, s, _ in got]
    # the order defines a saturating accumulation: per token, contributions in increasing expert id
    for t in range(50):
        es = ex[tk == t]
        assert np.all(np.diff(es) > 0)


def test_integer_weights_and_torch_input():
    torch = pytest.importorskip("torch")
    idx = torch.tensor([[1, 0], [0, 1]])
    w = torch.tensor([[300, 200], [100, 50]], dtype=torch.int32)
    q = build_expert_queues(idx, w, 2)
    np.testing.assert_array_equal(q[0].weights, [200, 100])
    assert q[0].weights.dtype == np.int32


@pytest.mark.parametrize("idx,w,E,msg", [
    ([[1, 1], [0, 2]], [[.5, .4], [.5, .4]], 4, r"topk_idx\[0\] = \[1, 1\]: expert 1 appears twice"),
    ([[1, 0], [3, 2], [2, 2]], [[.5, .4]] * 3, 4, r"topk_idx\[2\] = \[2, 2\]: expert 2 appears twice"),
    ([[1, 0], [0, 4]], [[.5, .4], [.5, .4]], 4, r"topk_idx\[1, 1\] = 4 out of range 0..3"),
    ([[1, 0], [-1, 2]], [[.5, .4], [.5, .4]], 4, r"topk_idx\[1, 0\] = -1 out of range"),
    ([[1, 0], [0, 2]], [[.5, .4]], 4, r"topk_w shape \[1, 2\] does not match topk_idx shape \[2, 2\]"),
    ([1, 0, 2], [.5, .4, .3], 4, r"topk_idx must be \[N, k\], got shape \[3\]"),
    ([[1.0, 0.0]], [[.5, .4]], 4, r"topk_idx must hold integers"),
    ([[1, 0, 2]], [[.5, .4, .1]], 2, r"k = 3 slots per token but only 2 experts"),
    ([[1, 0]], [[.5, .4]], 0, r"num_experts = 0"),
])
def test_bad_routing_input(idx, w, E, msg):
    with pytest.raises(ScheduleError, match=msg):
        build_expert_queues(np.array(idx), np.array(w), E)
    with pytest.raises(ScheduleError, match=msg):
        list(expert_execution_order(np.array(idx), np.array(w), E))
