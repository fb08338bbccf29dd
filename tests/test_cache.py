"""Expert caches and trace replay (sparseroute.cache): every policy against a pure-Python
reference of its documented rule, Belady against exhaustive search, byte capacities,
aliases, the trace file, the CLI, errors and threads."""

import functools
import itertools
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseroute
from sparseroute import cache
from sparseroute.cache import CacheStats, RoutingTrace

# ---- pure-Python references ----


def _visits(steps, num_experts, aliases=None):
    """Per visit (step-major, then layer), the sorted object ids it needs; an object's id is
    its target key's index ``layer * num_experts + expert``."""
    aliases = aliases or {}
    out = []
    for step in steps:
        for layer, ids in enumerate(step):
            keys = {aliases.get((layer, e), (layer, e)) for e in ids}
            out.append(sorted(key_layer * num_experts + e for key_layer, e in keys))
    return out


def reference_replay(
    steps,
    num_experts,
    capacity,
    policy,
    *,
    window=None,
    scores=None,
    decay=0.9,
    sizes=None,
    unit="experts",
    aliases=None,
):
    """The replay model written out plainly: pin the layer's objects, walk them in ascending
    id, hit or load, evicting by scanning all resident objects with the policy's rule."""
    layers = len(steps[0])
    visits = _visits(steps, num_experts, aliases)

    def size(o):
        return 1 if sizes is None else sizes[o // num_experts][o % num_experts]

    def cost(o):
        return size(o) if unit == "bytes" else 1

    def score(o):
        return 0.0 if scores is None else scores[o // num_experts][o % num_experts]

    def next_use(o, v):
        return next((u for u in range(v + 1, len(visits)) if o in visits[u]), None)

    resident, count, last, loaded, weight = set(), {}, {}, {}, {}
    hits = misses = moved = stalls = evictions = used = 0
    for v, need in enumerate(visits):
        step = v // layers
        missed = False
        for o in need:
            if o in resident:
                hits += 1
            else:
                misses += 1
                missed = True
                moved += size(o)
                while used + cost(o) > capacity:
                    candidates = [x for x in resident if x not in need]
                    if policy == "lru":
                        victim = min(candidates, key=lambda x: (last[x], x))
                    elif policy == "lfu":
                        victim = min(candidates, key=lambda x: (count[x], last[x], x))
                    elif policy == "lifo":
                        victim = max(candidates, key=lambda x: (loaded[x], x))
                    elif policy == "priority":
                        victim = min(candidates, key=lambda x: (score(x), weight[x], last[x], x))
                    else:

                        def within(x, v=v):
                            n = next_use(x, v)
                            return n is not None and (window is None or n <= v + window * layers)

                        beyond = [x for x in candidates if not within(x)]
                        if beyond:
                            victim = min(beyond, key=lambda x: (last[x], x))
                        else:
                            victim = max(candidates, key=lambda x, v=v: (next_use(x, v), -last[x], -x))
                    resident.remove(victim)
                    used -= cost(victim)
                    evictions += 1
                resident.add(o)
                used += cost(o)
                loaded[o] = v
            count[o] = count.get(o, 0) + 1
            last[o] = v
            weight[o] = weight.get(o, 0.0) + decay**-step
        stalls += missed
    ratio = hits / (hits + misses) if hits + misses else 0.0
    return CacheStats(hits, misses, ratio, moved, stalls, evictions)


def brute_force_misses(visits, capacity):
    """Fewest misses over every eviction choice (demand paging, the visit's objects pinned)."""

    @functools.cache
    def best(v, resident):
        if v == len(visits):
            return 0
        need = frozenset(visits[v])
        missing = need - resident
        over = len(resident) + len(missing) - capacity
        evictable = sorted(resident - need)
        choices = itertools.combinations(evictable, over) if over > 0 else [()]
        return len(missing) + min(best(v + 1, (resident - frozenset(c)) | need) for c in choices)

    return best(0, frozenset())


@st.composite
def traces(draw, max_layers=3, max_experts=6, max_steps=10):
    layers = draw(st.integers(1, max_layers))
    experts = draw(st.integers(1, max_experts))
    steps = draw(st.integers(1, max_steps))
    ids = st.sets(st.integers(0, experts - 1), max_size=experts)
    return [[sorted(draw(ids)) for _ in range(layers)] for _ in range(steps)], experts


def _need(steps, num_experts, aliases=None):
    return max(1, max(len(v) for v in _visits(steps, num_experts, aliases)))


def _trace(steps, num_experts):
    return RoutingTrace.from_lists(steps, num_experts=num_experts)


# ---- policies against their references ----


@given(
    case=traces(),
    extra=st.integers(0, 6),
    policy=st.sampled_from(cache.POLICIES),
    window=st.one_of(st.none(), st.integers(0, 3)),
    decay=st.sampled_from([0.5, 0.9, 1.0]),
    scored=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_policies_match_pure_python_references(case, extra, policy, window, decay, scored, seed):
    steps, num_experts = case
    layers = len(steps[0])
    capacity = _need(steps, num_experts) + extra
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (layers, num_experts), generator=g).double() if scored else None
    kwargs = {}
    if policy == "belady":
        kwargs["window"] = window
    if policy == "priority":
        kwargs.update(scores=scores, decay=decay)
    got = cache.simulate(_trace(steps, num_experts), capacity, policy, **kwargs)
    expected = reference_replay(steps, num_experts, capacity, policy, **kwargs)
    assert got == expected
    assert got.hits + got.misses == sum(len(v) for v in _visits(steps, num_experts))
    if policy == "priority" and not scored and decay == 1.0:
        # Plain counts and no scores: the priority order is the LFU order.
        assert got == cache.simulate(_trace(steps, num_experts), capacity, "lfu")


@given(case=traces(max_layers=2, max_experts=4, max_steps=7), extra=st.integers(0, 4))
def test_belady_with_full_knowledge_matches_brute_force(case, extra):
    steps, num_experts = case
    capacity = _need(steps, num_experts) + extra
    trace = _trace(steps, num_experts)
    belady = cache.simulate(trace, capacity, "belady")
    assert belady.misses == brute_force_misses(_visits(steps, num_experts), capacity)
    # A window spanning the whole trace is the same full-knowledge policy.
    assert cache.simulate(trace, capacity, "belady", window=len(steps)) == belady
    for policy in cache.POLICIES:
        assert belady.misses <= cache.simulate(trace, capacity, policy).misses


def test_belady_beats_lru_where_recency_misleads():
    # Capacity 2 over a cycle of 3 experts: LRU always evicts the expert needed next.
    steps = [[[e]] for e in [0, 1, 2] * 4]
    trace = _trace(steps, 3)
    assert cache.simulate(trace, 2, "lru").misses == 12
    belady = cache.simulate(trace, 2, "belady")
    assert belady.misses == brute_force_misses(_visits(steps, 3), 2) == 7
    # Looking only one step ahead is already enough for this cycle; zero steps is LRU.
    assert cache.simulate(trace, 2, "belady", window=1).misses == 7
    assert cache.simulate(trace, 2, "belady", window=0) == cache.simulate(trace, 2, "lru")


def test_worked_example_from_the_docstring():
    trace = RoutingTrace.from_lists([[[0, 1], [2]], [[1, 3], [2]]], num_experts=4)
    assert cache.simulate(trace, capacity=3, policy="lru") == CacheStats(2, 4, 2 / 6, 4, 3, 1)


def test_a_layer_needs_all_its_experts_at_once():
    # Capacity 2: visit 2 needs {1, 2}. 1 is the least recently used resident, but pinned.
    trace = _trace([[[0, 1]], [[0]], [[1, 2]]], 3)
    online = cache.ExpertCache(1, 3, 2, "lru")
    for step in trace.to_lists():
        last = online.access(0, step[0])
    assert last.evicted == [(0, 0)]
    assert online.resident() == [(0, 1), (0, 2)]
    assert cache.simulate(trace, 2, "lru") == online.stats()


def test_capacity_below_one_layer_is_an_error_naming_it():
    trace = _trace([[[0], [1]], [[0], [1, 2, 3]]], 4)
    with pytest.raises(
        sparseroute.InvalidInputError, match=r"capacity: expected at least 3 experts.*step 1 layer 1"
    ):
        cache.simulate(trace, 2, "lru")
    assert cache.simulate(trace, 3, "lru") == CacheStats(2, 4, 2 / 6, 4, 3, 1)


# ---- sizes, aliases ----


@given(
    case=traces(max_layers=2, max_experts=5, max_steps=8),
    policy=st.sampled_from(cache.POLICIES),
    extra=st.integers(0, 8),
    seed=st.integers(0, 2**16),
)
def test_bytes_capacity_matches_the_reference(case, policy, extra, seed):
    steps, num_experts = case
    layers = len(steps[0])
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5, (layers, num_experts), generator=g)
    table = sizes.tolist()
    need = max(sum(table[o // num_experts][o % num_experts] for o in v) for v in _visits(steps, num_experts))
    capacity = max(need, 1) + extra
    got = cache.simulate(
        _trace(steps, num_experts), capacity, policy, capacity_unit="bytes", expert_bytes=sizes
    )
    assert got == reference_replay(steps, num_experts, capacity, policy, sizes=table, unit="bytes")
    # Counted in experts, sizes only weigh the bytes moved.
    by_count = cache.simulate(
        _trace(steps, num_experts), _need(steps, num_experts), policy, expert_bytes=sizes
    )
    assert by_count == reference_replay(steps, num_experts, _need(steps, num_experts), policy, sizes=table)


def test_bytes_capacity_example():
    # Sizes 3, 1, 1, 2 bytes in 4 bytes, LRU: 0 evicts 1; 3 evicts 2 and then 0.
    trace = _trace([[[1, 2]], [[0]], [[3]], [[1]]], 4)
    stats = cache.simulate(trace, 4, "lru", capacity_unit="bytes", expert_bytes=[[3, 1, 1, 2]])
    assert stats == CacheStats(0, 5, 0.0, 8, 4, 3)


@given(
    case=traces(max_layers=3, max_experts=4, max_steps=8),
    policy=st.sampled_from(cache.POLICIES),
    extra=st.integers(0, 5),
    data=st.data(),
)
def test_aliases_match_the_reference(case, policy, extra, data):
    steps, num_experts = case
    layers = len(steps[0])
    keys = [(layer, e) for layer in range(layers) for e in range(num_experts)]
    # Half the keys may alias a key of the other half, so no target is an alias.
    targets, sources = keys[: len(keys) // 2], keys[len(keys) // 2 :]
    aliases = {}
    if targets:
        for key in sources:
            if data.draw(st.booleans()):
                aliases[key] = data.draw(st.sampled_from(targets))
    capacity = _need(steps, num_experts, aliases) + extra
    got = cache.simulate(_trace(steps, num_experts), capacity, policy, aliases=aliases)
    assert got == reference_replay(steps, num_experts, capacity, policy, aliases=aliases)


def test_an_expert_shared_by_layers_is_loaded_once():
    # Layer 1's expert 0 is layer 0's expert 0: one load, one unit of capacity.
    steps = [[[0], [0, 1]], [[0, 1], [1]]]
    shared = {(1, 0): (0, 0)}
    assert cache.simulate(_trace(steps, 2), 3, "lru", aliases=shared) == CacheStats(3, 3, 0.5, 3, 3, 0)
    assert cache.simulate(_trace(steps, 2), 3, "lru").misses == 4
    online = cache.ExpertCache(2, 2, 2, aliases=shared)
    assert online.access(1, [0]).loaded == [(0, 0)]
    assert online.lookup(0, 0) and online.lookup(1, 0)
    assert online.used == 1


# ---- traces and files ----


def test_trace_from_routing_outputs():
    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(3):
        layer_outputs = []
        for _ in range(2):
            _, experts = sparseroute.topk_gating(torch.randn(5, 8, generator=g), 2)
            layer_outputs.append(experts)
        steps.append(layer_outputs)
    trace = RoutingTrace.from_experts(steps, num_experts=8)
    expected = [[sorted(set(t.flatten().tolist())) for t in step] for step in steps]
    assert trace.to_lists() == expected
    assert trace == RoutingTrace.from_lists(expected, num_experts=8)
    dense = torch.stack([torch.stack([t.reshape(-1) for t in step]) for step in steps])
    assert RoutingTrace.from_dense(dense, num_experts=8) == trace
    # -1 (an empty dynamic-k slot) is ignored; duplicates count once.
    padded = torch.tensor([[[3, -1, 3]], [[-1, -1, -1]]])
    assert RoutingTrace.from_dense(padded).to_lists() == [[[3]], [[]]]
    assert RoutingTrace.from_experts([[padded[0]], [padded[1]]], num_experts=4).to_lists() == [[[3]], [[]]]


def test_trace_file_round_trip(tmp_path):
    trace = RoutingTrace.from_lists([[[2, 0], [1]], [[], [3, 1, 1]]], num_experts=6)
    path = tmp_path / "trace.jsonl"
    trace.save(path)
    lines = path.read_text().splitlines()
    assert lines[0] == (
        '{"format": "sparseroute-routing-trace", "version": 1, "num_layers": 2, "num_experts": 6}'
    )
    assert lines[1:] == ["[[0,2],[1]]", "[[],[1,3]]"]
    loaded = RoutingTrace.load(path)
    assert loaded == trace and loaded.num_experts == 6
    # Without a header the sizes are inferred.
    path.write_text("[[0, 2], [1]]\n\n[[], [3]]\n")
    headerless = RoutingTrace.load(path)
    assert (headerless.num_layers, headerless.num_experts, headerless.num_steps) == (2, 4, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "at least one step"),
        ("[[0], [1]]\n[[0]]\n", "line 2: expected 2 layers"),
        ("[[0], [1]]\nnot json\n", "line 2: expected JSON"),
        ('{"format": "other", "version": 1}\n[[0]]\n', "line 1: expected a header"),
        ('[[0, "a"]]\n', "line 1: expected a step"),
        (
            '{"format": "sparseroute-routing-trace", "version": 1, "num_layers": 1, "num_experts": 2}\n'
            "[[5]]\n",
            r"steps\[0\]\[0\]: expected expert ids \[0, 2\), got 5",
        ),
    ],
)
def test_bad_trace_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        RoutingTrace.load(path)


# ---- sweep, table, plot, CLI ----


def test_sweep_table_and_plot(tmp_path):
    steps = [[[e % 5, (e * 3) % 5]] for e in range(40)]
    trace = _trace(steps, 5)
    seen = []
    rows = cache.sweep(
        trace, [2, 3, 4], ["lru", "belady"], progress=lambda done, total: seen.append((done, total))
    )
    assert [(r.policy, r.capacity) for r in rows] == [(p, c) for p in ["lru", "belady"] for c in [2, 3, 4]]
    for row in rows:
        assert tuple(row[2:]) == tuple(cache.simulate(trace, row.capacity, row.policy))
    assert seen[-1] == (6 * 40, 6 * 40)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    table = cache.format_table(rows).splitlines()
    assert table[0].split() == ["policy", "capacity", "hit", "ratio", "misses", "bytes", "moved", "stalls"]
    assert table[2].split()[:3] == ["lru", "2", f"{rows[0].hit_ratio:.4f}"]
    png = tmp_path / "hits.png"
    cache.plot_hit_ratio(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_the_table_and_saves_the_plot(tmp_path):
    trace = RoutingTrace.from_lists([[[e % 4, (e + 1) % 4], [e % 3]] for e in range(30)], num_experts=4)
    trace.save(tmp_path / "t.jsonl")
    command = [sys.executable, "-m", "sparseroute", "cache-sim", "t.jsonl", "--capacity", "2", "4", "6"]
    command += ["--policy", "lru", "--policy", "belady", "--window", "2", "--plot", "out.png", "--progress"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("t.jsonl: 30 steps x 2 layers, 4 experts, 90 requests")
    assert lines[1].split()[:2] == ["policy", "capacity"]
    body = [line.split() for line in lines[3:9]]
    assert [(b[0], int(b[1])) for b in body] == [(p, c) for p in ["lru", "belady"] for c in [2, 4, 6]]
    for b in body:
        window = 2 if b[0] == "belady" else None
        stats = cache.simulate(trace, int(b[1]), b[0], window=window)
        assert b[2:] == [
            f"{stats.hit_ratio:.4f}",
            str(stats.misses),
            str(stats.bytes_moved),
            str(stats.stalls),
        ]
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert "100% 180/180 steps" in result.stderr


def test_cli_reports_bad_input(tmp_path, capsys, monkeypatch):
    # In-process (the subprocess test above covers the entry point itself).
    from sparseroute.__main__ import main

    monkeypatch.chdir(tmp_path)
    RoutingTrace.from_lists([[[0, 1]]]).save(tmp_path / "t.jsonl")
    for args, message in [
        (["t.jsonl", "--capacity", "2", "--policy", "fifo"], "policy: expected one of"),
        (["t.jsonl", "--capacity", "1"], "capacity: expected at least 2 experts"),
        (["t.jsonl", "--capacity", "0"], "capacities: expected 1 <= capacities"),
        (["t.jsonl", "--capacity", "4", "--capacity-unit", "bytes"], "expert_bytes: required"),
        (["none.jsonl", "--capacity", "2"], "none.jsonl"),
    ]:
        assert main(["cache-sim", *args]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("cache-sim: error: ") and message in captured.err, captured.err
        assert captured.out == ""
    assert main(["cache-sim", "t.jsonl", "--capacity", "2", "--policy", "lifo", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[3].split() == ["lifo", "2", "0.0000", "2", "2", "1"]
    assert captured.err == ""


# ---- online cache ----


@given(case=traces(), extra=st.integers(0, 5), policy=st.sampled_from(["lru", "lfu", "lifo", "priority"]))
def test_online_cache_reproduces_a_replay(case, extra, policy):
    steps, num_experts = case
    capacity = _need(steps, num_experts) + extra
    online = cache.ExpertCache(len(steps[0]), num_experts, capacity, policy)
    for step in steps:
        for layer, ids in enumerate(step):
            before = set(online.resident())
            access = online.access(layer, ids)
            after = set(online.resident())
            assert after == (before - set(access.evicted)) | set(access.loaded)
            assert {(layer, e) for e in ids} <= after
            assert online.used <= capacity
    assert online.stats() == cache.simulate(_trace(steps, num_experts), capacity, policy)


def test_online_cache_with_tensors_and_candidates():
    online = cache.ExpertCache(1, 8, 3, "lfu")
    online.access(0, torch.tensor([[1, 2], [2, -1]]))
    online.access(0, [1])
    assert online.evict_candidate() == (0, 2)
    # 1 used twice stays; 2 goes for 5, and 6 fits in the third slot.
    assert online.access(0, [5, 6]) == cache.CacheAccess(loaded=[(0, 5), (0, 6)], evicted=[(0, 2)])
    assert online.resident() == [(0, 1), (0, 5), (0, 6)]
    assert online.stats() == CacheStats(1, 4, 0.2, 4, 2, 1)


# ---- errors ----


def _simple():
    return RoutingTrace.from_lists([[[0, 1], [2]]], num_experts=4)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: RoutingTrace.from_lists([]), ValueError, "steps: expected a non-empty list"),
        (lambda: RoutingTrace.from_lists([[[0]], [[0], [1]]]), ValueError, r"steps\[1\]: expected 1 layers"),
        (lambda: RoutingTrace.from_lists([[[4]]], num_experts=4), ValueError, r"expert ids \[0, 4\), got 4"),
        (lambda: RoutingTrace.from_lists([[[-1]]]), ValueError, r"steps\[0\]\[0\]: expected expert ids >= 0"),
        (lambda: RoutingTrace.from_lists([[[0.5]]]), TypeError, "expected int expert ids"),
        (
            lambda: RoutingTrace.from_experts([[torch.zeros(2, 2, 2, dtype=torch.long)]]),
            ValueError,
            "3-D|2-D",
        ),
        (
            lambda: RoutingTrace.from_experts([[torch.tensor([[9]])]], num_experts=4),
            ValueError,
            "< num_experts",
        ),
        (lambda: RoutingTrace.from_dense(torch.tensor([[[-2]]])), ValueError, "expected expert ids >= -1"),
        (
            lambda: RoutingTrace(torch.tensor([1, 0]), torch.tensor([0, 2]), 1, 4),
            ValueError,
            "sorted and distinct",
        ),
        (lambda: RoutingTrace(torch.tensor([1]), torch.tensor([0, 1]), 2, 4), ValueError, "offsets"),
        (lambda: cache.simulate(_simple(), 0, "lru"), ValueError, "capacity: expected 1 <= capacity, got 0"),
        (lambda: cache.simulate(_simple(), -3, "lru"), ValueError, "capacity"),
        (lambda: cache.simulate(_simple(), 2, "mru"), ValueError, "policy: expected one of"),
        (lambda: cache.simulate([[[0]]], 2, "lru"), TypeError, "trace: expected a RoutingTrace"),
        (lambda: cache.simulate(_simple(), 2, "lru", window=3), ValueError, "window: only policy 'belady'"),
        (lambda: cache.simulate(_simple(), 2, "belady", window=-1), ValueError, "window"),
        (
            lambda: cache.simulate(_simple(), 2, "lru", decay=0.5),
            ValueError,
            "only used by policy 'priority'",
        ),
        (
            lambda: cache.simulate(_simple(), 2, "priority", decay=0.0),
            ValueError,
            "decay: expected 0 < decay",
        ),
        (
            lambda: cache.simulate(_simple(), 2, "priority", scores=torch.full((2, 4), float("nan"))),
            ValueError,
            "scores: expected finite",
        ),
        (lambda: cache.simulate(_simple(), 2, "lru", capacity_unit="pages"), ValueError, "capacity_unit"),
        (
            lambda: cache.simulate(_simple(), 2, "lru", capacity_unit="bytes"),
            ValueError,
            "expert_bytes: required",
        ),
        (
            lambda: cache.simulate(_simple(), 2, "lru", expert_bytes=[[1, 2]]),
            ValueError,
            r"expert_bytes: .*\[2, 4\]",
        ),
        (
            lambda: cache.simulate(_simple(), 2, "lru", expert_bytes=0),
            ValueError,
            "expert_bytes: expected sizes >= 1",
        ),
        (
            lambda: cache.simulate(_simple(), 2, "lru", aliases={(0, 9): (0, 0)}),
            ValueError,
            r"aliases: .*\(0, 9\)",
        ),
        (lambda: cache.simulate(_simple(), 2, "lru", aliases={(0, 1): 0}), TypeError, "aliases: expected"),
        (
            lambda: cache.simulate(_simple(), 2, "lru", aliases={(1, 0): (0, 0), (0, 0): (0, 1)}),
            sparseroute.InvalidInputError,
            "aliases: expected targets that are not aliases",
        ),
        (
            lambda: cache.simulate(_simple(), 2, "lru", aliases={(0, 1): (0, 1)}),
            sparseroute.InvalidInputError,
            "aliases: expected a key aliased to another key",
        ),
        (
            lambda: cache.simulate(
                _simple(), 2, "lru", expert_bytes=[[1] * 4, [2] * 4], aliases={(1, 0): (0, 0)}
            ),
            sparseroute.InvalidInputError,
            "same size",
        ),
        (lambda: cache.sweep(_simple(), [], ["lru"]), ValueError, "capacities"),
        (lambda: cache.sweep(_simple(), [2], "lru"), ValueError, "policies"),
        (lambda: cache.ExpertCache(1, 4, 2, "belady"), ValueError, "policy: expected one of"),
        (lambda: cache.ExpertCache(1, 4, 2).access(1, [0]), ValueError, "layer"),
        (lambda: cache.ExpertCache(1, 4, 2).access(0, [0, 1, 2]), sparseroute.InvalidInputError, "capacity"),
        (lambda: cache.ExpertCache(1, 4, 2).access(0, [7]), sparseroute.InvalidInputError, "experts"),
        (lambda: cache.plot_hit_ratio([], "x.png"), ValueError, "rows"),
    ],
)
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---- threads, progress ----


def test_threads_simulating_at_once_match_sequential_results():
    g = torch.Generator().manual_seed(1)
    weights = 1.0 / torch.arange(1, 33, dtype=torch.float64)
    experts = torch.multinomial(weights.repeat(600 * 4, 1), 4, generator=g).reshape(600, 4, 4)
    trace = RoutingTrace.from_dense(experts, num_experts=32)
    jobs = [(policy, capacity) for policy in cache.POLICIES for capacity in (8, 32)]
    expected = [cache.simulate(trace, c, p) for p, c in jobs]
    results = [[None] * len(jobs) for _ in range(2)]

    def work(slot):
        for i, (p, c) in enumerate(jobs):
            results[slot][i] = cache.simulate(trace, c, p)

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected, expected]


def test_one_online_cache_shared_by_threads_counts_every_access():
    online = cache.ExpertCache(2, 16, 6, "lru")

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(300):
            layer = int(torch.randint(0, 2, (1,), generator=g))
            online.access(layer, torch.randint(0, 16, (3,), generator=g).unique().tolist())

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = online.stats()
    assert stats.misses - stats.evictions == len(online.resident()) <= 6
    assert stats.stalls <= 600


def test_progress_reports_reach_the_end():
    trace = RoutingTrace.from_lists([[[s % 3]] for s in range(250)])
    seen = []
    cache.simulate(trace, 2, "lfu", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (250, 250)
    assert all(total == 250 for _, total in seen) and len(seen) >= 50
