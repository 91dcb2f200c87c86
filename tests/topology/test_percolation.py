import torch
from hypothesis import given, settings, strategies as st
from model_zoo import load_example

from sparsify import sparsify
from sparsify.topology.percolation import Chain, Contraction, NeuronGraph, Product, percolate


def mlp_graph(widths):
    """fc1 .. fcN with fc_i -> fc_{i+1} chains; fc1 reads the model input, the last one is the output."""
    names = [f"fc{i + 1}" for i in range(len(widths) - 1)]
    shapes = {n: (widths[i + 1], widths[i]) for i, n in enumerate(names)}
    chains = [Chain(a, b, torch.arange(widths[i + 1]), torch.arange(widths[i + 1]))
              for i, (a, b) in enumerate(zip(names, names[1:]))]
    return NeuronGraph(shapes, chains=chains, open_inputs={names[0]}, open_outputs={names[-1]})


def check_fixed_point(masks, graph):
    for c in graph.chains:
        src_rows_live = masks[c.src].any(1)[c.rows]
        dst_cols_used = masks[c.dst].any(0)[c.columns]
        # a column with links is fed by a row with input; a row with links feeds a used column
        assert not bool((dst_cols_used & ~src_rows_live).any())


def test_mlp_two_sweeps():
    g = mlp_graph([4, 3, 3, 2])
    fc1 = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # row 2: no input
    fc2 = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)  # row 2: no input, row 1 unused
    fc3 = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    p = percolate({"fc1": fc1, "fc2": fc2, "fc3": fc3}, g)
    # fc2 column 2 is fed by the dead fc1 row 2 -> cut; fc3 column 2 by the dead fc2 row 2 -> cut;
    # fc2 row 1 feeds fc3 column 1, which has no link -> its input link goes; then fc1 row 1 feeds
    # nothing -> its input link goes.
    assert p.masks["fc1"].int().tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert p.masks["fc2"].int().tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert p.masks["fc3"].int().tolist() == [[1, 0, 0], [0, 0, 0]]
    assert p.removed_links == {"fc1": 1, "fc2": 2, "fc3": 2}
    assert p.silent_columns["fc2"].tolist() == [False, False, True]
    assert torch.equal(p.removed["fc2"], fc2 & ~p.masks["fc2"])
    assert fc2.sum() == 3  # inputs untouched


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), density=st.floats(0.02, 0.6))
def test_idempotent_and_a_fixed_point_on_random_mlps(seed, density):
    g = mlp_graph([12, 10, 9, 5])
    gen = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(s, generator=gen) < density for n, s in g.shapes.items()}
    once = percolate(masks, g)
    twice = percolate(once.masks, g)
    assert twice.total_removed == 0 and twice.iterations == 1
    assert all(torch.equal(once.masks[n], twice.masks[n]) for n in masks)
    assert all(not bool((once.masks[n] & ~masks[n]).any()) for n in masks)  # only removes
    check_fixed_point(once.masks, g)


def attention_graph(rope=True):
    """q: 4 heads x 4 dims, k: 2 kv heads x 4 dims (GQA: q heads 0,1 -> kv 0; 2,3 -> kv 1)."""
    hd = 4
    pairs = [(qh * hd + d, (qh // 2) * hd + d) for qh in range(4) for d in range(hd)]
    paired = {}
    if rope:
        paired = {"q": torch.tensor([(h * hd + d, h * hd + d + 2) for h in range(4) for d in range(2)]),
                  "k": torch.tensor([(h * hd + d, h * hd + d + 2) for h in range(2) for d in range(2)])}
    return NeuronGraph({"q": (16, 6), "k": (8, 6)}, contractions=[Contraction("q", "k", torch.tensor(pairs))],
                       paired=paired, open_inputs={"q", "k"})


def test_qk_rows_die_together_and_gqa_keeps_shared_k_rows():
    g = attention_graph(rope=False)
    q = torch.ones(16, 6, dtype=torch.bool)
    k = torch.ones(8, 6, dtype=torch.bool)
    k[1] = False  # kv head 0, dim 1 has no input: q rows 1 (head 0) and 5 (head 1) carry nothing
    q[2] = False
    q[10] = False  # q dim 2 of heads 0 and 2; head 1 still uses kv 0 dim 2 -> k row 2 stays
    q[14] = False  # and heads 2, 3 both lose dim 2 -> k row 6 (kv head 1, dim 2) is unused
    p = percolate({"q": q, "k": k}, g)
    assert not p.masks["q"][1].any() and not p.masks["q"][5].any()
    assert p.masks["k"][2].all()
    assert not p.masks["k"][6].any()
    assert p.removed_links == {"q": 12, "k": 6}


def test_a_rope_pair_is_one_unit():
    g = attention_graph(rope=True)
    q = torch.ones(16, 6, dtype=torch.bool)
    k = torch.ones(8, 6, dtype=torch.bool)
    k[0] = False  # kv 0 dim 0 has no input, but its RoPE partner dim 2 does: the pair lives
    p = percolate({"q": q, "k": k}, g)
    assert p.total_removed == 0
    k[2] = False  # now the whole pair (0, 2) of kv head 0 is silent: q rows 0,2 of heads 0,1 go
    p = percolate({"q": q, "k": k}, g)
    assert [r for r in range(16) if not p.masks["q"][r].any()] == [0, 2, 4, 6]
    assert p.removed_links == {"q": 24, "k": 0}


def test_gate_and_up_rows_go_together_and_feed_down():
    shapes = {"gate": (5, 4), "up": (5, 4), "down": (4, 5)}
    rows = torch.arange(5)
    g = NeuronGraph(shapes, chains=[Chain("gate", "down", rows, rows), Chain("up", "down", rows, rows)],
                    products=[Product("gate", "up", torch.stack([rows, rows], 1))],
                    open_inputs={"gate", "up"}, open_outputs={"down"})
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    masks["up"][3] = False  # act(gate_3) * up_3 = 0
    masks["down"][:, 1] = False  # column 1 of down reads nothing: gate_1 and up_1 are unused
    p = percolate(masks, g)
    assert not p.masks["gate"][3].any() and not p.masks["down"][:, 3].any()
    assert not p.masks["gate"][1].any() and not p.masks["up"][1].any()
    assert p.removed_links == {"gate": 8, "up": 4, "down": 4}


def test_rows_of_one_fused_gate_up_layer_go_in_pairs():
    """gate, up = gate_up(x).chunk(2): the chain into down follows up's rows (4-7); gate's rows (0-3)
    are used through the product alone."""
    shapes = {"gate_up": (8, 4), "down": (4, 4)}
    up, gate = torch.arange(4, 8), torch.arange(4)
    g = NeuronGraph(shapes, chains=[Chain("gate_up", "down", up, torch.arange(4))],
                    products=[Product("gate_up", "gate_up", torch.stack([up, gate], 1))],
                    open_inputs={"gate_up"}, open_outputs={"down"})
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    assert percolate(masks, g).total_removed == 0  # every gate row is used
    masks["gate_up"][1] = False  # gate 1 has no input: act(gate_1) * up_5 = 0
    masks["down"][:, 2] = False  # nothing reads unit 2: gate 2 and up 6 are unused
    p = percolate(masks, g)
    assert [r for r in range(8) if not p.masks["gate_up"][r].any()] == [1, 2, 5, 6]
    assert not p.masks["down"][:, 1].any() and p.masks["down"][:, [0, 3]].all()


def test_on_the_llama_example_boundaries_stay_untouched():
    m = load_example("llama")
    policy = {"version": 1, "defaults": {"density": 0.03}, "unmatched": "sparsify",
              "rules": [{"match": {"name": "lm_head"}, "skip": True}]}
    model, handle = sparsify(m.build_model(), policy, m.example_inputs())
    graph = handle.neuron_graph()
    assert len(graph.chains) == 6 and len(graph.products) == 2 and len(graph.contractions) == 2
    assert set(graph.paired) == {f"layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qk"}
    masks = handle.masks()
    p = percolate(masks, graph)
    assert p.total_removed > 0
    for name in graph.open_inputs:  # columns reading the residual stream are never cut
        assert not bool(p.silent_columns[name].any())
    for name in graph.open_outputs:  # rows writing to it lose links only through cut columns
        assert not bool((p.removed[name] & ~p.silent_columns[name][None, :]).any())
    assert graph.open_outputs >= {f"layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")}
    assert percolate(p.masks, graph).total_removed == 0


def test_dense_neighbours_are_boundaries():
    m = load_example("mlp")
    policy = {"version": 1, "rules": [{"match": {"regex": "fc[23]"}, "density": 0.002}]}
    model, handle = sparsify(m.build_model(), policy, m.example_inputs())
    graph = NeuronGraph.from_coupling(handle.coupling, handle.sites)
    assert graph.open_inputs == {"fc2"} and graph.open_outputs == {"fc3"}
    assert [(c.src, c.dst) for c in graph.chains] == [("fc2", "fc3")]


def _llama_graph():
    m = load_example("llama")
    policy = {"version": 1, "defaults": {"density": 0.5}, "unmatched": "sparsify",
              "rules": [{"match": {"name": "lm_head"}, "skip": True}]}
    _model, handle = sparsify(m.build_model(), policy, m.example_inputs())
    return NeuronGraph.from_coupling(handle.coupling, handle.sites)


LLAMA_GRAPH = []


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), density=st.floats(0.01, 0.3))
def test_idempotent_on_random_masks_of_the_llama_graph(seed, density):
    if not LLAMA_GRAPH:
        LLAMA_GRAPH.append(_llama_graph())
    g = LLAMA_GRAPH[0]
    gen = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(s, generator=gen) < density for n, s in g.shapes.items()}
    once = percolate(masks, g)
    assert percolate(once.masks, g).total_removed == 0
    check_fixed_point(once.masks, g)
    for d in g.contractions:  # a q row keeping links has a k partner with input, and back
        for site, other, col in ((d.q, d.k, 0), (d.k, d.q, 1)):
            unit = _units(g, site, once.masks[site].shape[0])
            other_unit = _units(g, other, once.masks[other].shape[0])
            other_live = once.masks[other].any(1).tolist()
            partners = {}
            for a, b in d.pairs.tolist():
                mine, theirs = (a, b) if col == 0 else (b, a)
                partners.setdefault(unit[mine], set()).add(other_unit[theirs])
            live_units = {other_unit[r] for r in range(len(other_live)) if other_live[r]}
            for row in range(once.masks[site].shape[0]):
                if bool(once.masks[site][row].any()):
                    assert partners.get(unit[row], set()) & live_units


def _units(graph, site, rows):
    """Row -> its unit id (RoPE pairs share one)."""
    unit = list(range(rows))
    pairs = graph.paired.get(site)
    for a, b in ([] if pairs is None else pairs.tolist()):
        unit[b] = unit[a] = min(unit[a], unit[b])
    return unit
