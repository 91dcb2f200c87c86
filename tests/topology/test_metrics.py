import pytest
import torch

from sparsify.topology.metrics import active_neuron_rate, degree_summary, explored, itop_rate, overlap_rate
from sparsify.topology.percolation import Chain, NeuronGraph


def test_anp_counts_a_hidden_neuron_once_with_a_graph(device):
    # masks on the device, the graph's indices on the CPU (as the evolution holds them)
    fc1 = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool, device=device)  # inputs 3, hidden 2
    fc2 = torch.tensor([[1, 0]], dtype=torch.bool, device=device)  # hidden 2 -> 1 output
    graph = NeuronGraph({"fc1": (2, 3), "fc2": (1, 2)}, chains=[Chain("fc1", "fc2", torch.arange(2), torch.arange(2))])
    # neurons: 3 inputs (1 active) + 2 hidden (1) + 1 output (1) = 3 of 6
    assert active_neuron_rate({"fc1": fc1, "fc2": fc2}, graph) == pytest.approx(3 / 6)
    # without the graph the hidden neurons are counted as fc1 rows and as fc2 columns
    assert active_neuron_rate({"fc1": fc1, "fc2": fc2}) == pytest.approx(4 / 8)


def test_itop_and_overlap():
    ever = None
    for mask in ([[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 1], [0, 0]]):
        ever = explored(ever, torch.tensor(mask, dtype=torch.bool))
    assert itop_rate(ever, 4) == 0.5
    removed = torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    assert overlap_rate(removed, torch.tensor([1, 1, 0, 1], dtype=torch.bool)) == pytest.approx(2 / 3)
    assert overlap_rate(removed, torch.zeros(4, dtype=torch.bool)) == 0.0


def test_degree_summary():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    s = degree_summary(mask)
    assert s["outputs"] == {"mean": 2.0, "max": 3, "isolated": 0.0, "histogram": [0, 1, 0, 1]}
    assert s["inputs"]["isolated"] == 0.25 and s["inputs"]["histogram"] == [1, 2, 1]

