"""Cannistraci-Hebb predictors written straight from their definitions: plain loops over nodes
and L3 paths of the bipartite graph, no matrices. Rows are output neurons u, v; columns are
input neurons b, j."""
import math


def neighbours(mask):
    rows, cols = len(mask), len(mask[0])
    of_out = [{j for j in range(cols) if mask[u][j]} for u in range(rows)]  # N(u): input neurons
    of_in = [{u for u in range(rows) if mask[u][j]} for j in range(cols)]  # N(j): output neurons
    return of_out, of_in


def l3_paths(mask, u, j):
    """Every path u–b–v–j: b ∈ N(u), v ∈ N(j), b–v a link."""
    of_out, of_in = neighbours(mask)
    return [(b, v) for b in sorted(of_out[u]) for v in sorted(of_in[j]) if mask[v][b]]


def _community_degrees(mask, u, j, b, v):
    of_out, of_in = neighbours(mask)
    di_b = len(of_in[b] & of_in[j])
    de_b = len(of_in[b]) - di_b - 1
    di_v = len(of_out[v] & of_out[u])
    de_v = len(of_out[v]) - di_v - 1
    return di_b, de_b, di_v, de_v


def _score_missing(mask, score):
    """A rows x cols table: ``score(u, j)`` for every missing link, 0 for the present ones."""
    return [[0.0 if mask[u][j] else score(u, j) for j in range(len(mask[0]))] for u in range(len(mask))]


def ch3_l3p(mask):
    def score(u, j):
        total = 0.0
        for b, v in l3_paths(mask, u, j):
            _, de_b, _, de_v = _community_degrees(mask, u, j, b, v)
            total += 1.0 / math.sqrt((1 + de_b) * (1 + de_v))
        return total
    return _score_missing(mask, score)


def node_based(mask, numerator_di):
    def score(u, j):
        community = {}  # node -> (di, de), each node once
        for b, v in l3_paths(mask, u, j):
            di_b, de_b, di_v, de_v = _community_degrees(mask, u, j, b, v)
            community[("in", b)] = (di_b, de_b)
            community[("out", v)] = (di_v, de_v)
        return sum(((1 + di) if numerator_di else 1) / (1 + de) for di, de in community.values())
    return _score_missing(mask, score)


def ch2_l3n(mask):
    return node_based(mask, True)


def ch3_l3n(mask):
    return node_based(mask, False)
