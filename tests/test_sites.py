"""Site discovery: any model that runs forward, no per-architecture tables."""

import pytest
import torch
from torch import nn

from prune_repair import find_sites, make_filter
from engine_helpers import inputs_for, tiny_models

MODELS = tiny_models()


def test_mlp_sites_are_hidden_linears_without_classifier():
    sites = find_sites(MODELS["mlp"], inputs_for("mlp"))
    assert [s.fqn for s in sites] == ["features.fc1", "features.fc2"]
    assert all(s.norm is None and s.channel_dim == -1 for s in sites)


def test_conv_followed_by_batchnorm_is_corrected_after_the_norm():
    sites = find_sites(MODELS["cnn-bn"], inputs_for("cnn-bn"))
    assert all(s.norm == s.fqn and s.producer != s.fqn for s in sites)
    assert [s.channels for s in sites] == [8, 16]


def test_classifier_excluded_by_default_and_included_on_request():
    model, x = MODELS["cnn"], inputs_for("cnn")
    default = [s.producer for s in find_sites(model, x)]
    with_clf = [s.producer for s in find_sites(model, x, include_classifier=True)]
    assert with_clf[:-1] == default and with_clf[-1] == "classifier"


def test_resnet18_sites_follow_execution_order_including_shortcuts():
    sites = find_sites(MODELS["resnet18"], inputs_for("resnet18", 2))
    fqns = [s.fqn for s in sites]
    assert fqns[0] == "bn1" and "layer2.0.downsample.1" in fqns and "fc" not in fqns
    assert len(sites) == 20  # 1 stem + 16 block convs + 3 downsample convs, all with BN


def test_token_model_channels_are_the_last_dim():
    sites = find_sites(MODELS["tokens"], inputs_for("tokens"))
    assert [s.fqn for s in sites] == ["embed", "blocks.0.fc1", "blocks.0.fc2"]
    assert all(s.channel_dim == -1 for s in sites)


@pytest.mark.parametrize("select", [["features.fc2"], "re:fc2$", lambda m, fqn: fqn.endswith("fc2")])
def test_select_by_fqn_regex_or_filter_fn(select):
    sites = find_sites(MODELS["mlp"], inputs_for("mlp"), select=select)
    assert [s.fqn for s in sites] == ["features.fc2"]


def test_make_filter_matches_exact_names_and_regexes():
    f = make_filter(["a.b", "re:^layer\\d"])
    assert f(None, "a.b") and f(None, "layer3.conv") and not f(None, "a.bc")


def test_layer_called_twice_is_skipped():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.other = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.other(self.fc(self.fc(x))))

    assert [s.fqn for s in find_sites(Shared(), torch.randn(3, 4))] == ["other"]


def test_discovery_restores_train_mode_and_leaves_no_hooks():
    model = MODELS["cnn-bn"].train()
    find_sites(model, inputs_for("cnn-bn"))
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()


def test_residual_blocks_are_measurable_extra_sites():
    model, x = MODELS["resnet18"], inputs_for("resnet18", 2)
    sites = find_sites(model, x, blocks="re:^layer\\d\\.\\d$")
    blocks = [s for s in sites if s.kind == "block"]
    assert [s.fqn for s in blocks] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1",
                                       "layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    assert [s.channels for s in blocks][::2] == [64, 128, 256, 512]
    fqns = [s.fqn for s in sites]
    assert fqns.index("layer1.0.bn2") < fqns.index("layer1.0") < fqns.index("layer1.1.bn1")


def test_block_sites_are_refused_by_repair_with_the_reason():
    from prune_repair import collect_stats, repair_

    model, x = MODELS["resnet-bn"], inputs_for("resnet-bn")
    goal = collect_stats(model, x, block_outputs=["layer1.0"])
    assert goal.site("layer1.0").kind == "block" and goal["layer1.0"].mean.shape == (8,)
    with pytest.raises(ValueError, match="cannot be folded into the original architecture"):
        repair_(model, goal, x)


def test_blocks_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no submodule"):
        find_sites(MODELS["mlp"], inputs_for("mlp"), blocks=["nope"])


def test_groupnorm_and_layernorm_with_a_per_channel_affine_take_the_site():
    sites = find_sites(MODELS["resnet-ln"], inputs_for("resnet-ln"))
    assert all(isinstance(MODELS["resnet-ln"].get_submodule(s.fqn), nn.GroupNorm) for s in sites)
    post_ln = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    site, = find_sites(post_ln, torch.randn(5, 3, 4))
    assert (site.fqn, site.producer, site.channel_dim) == ("1", "0", -1)
    no_affine = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=False), nn.Linear(6, 2))
    assert find_sites(no_affine, torch.randn(5, 4))[0].fqn == "0"


def test_a_layer_called_twice_is_named_in_a_warning_not_skipped_silently():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.relu(self.shared(torch.relu(self.shared(x)))))

    with pytest.warns(UserWarning, match="run more than once per forward and are not corrected.*: shared"):
        sites = find_sites(Twice(), torch.randn(3, 4), include_classifier=True)
    assert [s.fqn for s in sites] == ["head"]
