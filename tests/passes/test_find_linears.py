import torch
from torch import nn

from sparsify.passes.capture import capture
from sparsify.passes.find_linears import find_linears

from model_zoo import load_example


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.fc(torch.relu(self.fc(x))))


def test_module_called_twice_is_one_site_with_two_calls():
    model = Shared()
    sites = find_linears(model, capture(model, torch.randn(2, 8)))
    assert list(sites.sites) == ["fc", "head"]
    assert sites.sites["fc"].calls == 2 and sites.sites["head"].calls == 1
    assert sites.excluded == {"unused": "never called in the captured forward"}
    assert sites.sites["fc"].parameters == 8 * 8 + 8


def test_tied_head_is_excluded_in_both_captures():
    m = load_example("nanogpt")
    model = m.build_model()
    sites = find_linears(model, capture(model, m.example_inputs()))
    assert sites.excluded == {"lm_head": "weight tied to wte.weight"}
    assert len(sites.sites) == 8 and "lm_head" not in sites.sites
    assert list(sites.node_to_excluded.values()) == ["lm_head"]


def test_hf_llama_sites_through_export():
    m = load_example("hf_llama")
    model = m.build_model()
    sites = find_linears(model, capture(model, m.example_inputs()))
    assert len(sites.sites) == 15
    assert sites.sites["model.layers.1.mlp.down_proj"].in_features == 128
    assert all(s.calls == 1 for s in sites.sites.values())
