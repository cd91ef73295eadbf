"""Block-by-block exact repair (issue 11): one block of the model at a time over all batches.

The specification: ``passes="blockwise"`` gives the same weights as the per-site passes (and
lockstep) in float64, whatever the block inputs wait in (the device, host memory, files that
are removed afterwards), on torchvision CNNs and transformers and on HF decoders with a
key/value cache and padded tokens; the chain of blocks is found where the forward really is
a chain, and a clear error names the fix where it is not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.resnet import BasicBlock
from torchvision.models.vision_transformer import VisionTransformer

from prune_repair import collect_stats, reconstruct_, repair_
from prune_repair.engine.run.block_chain import BlockChain, find_block_chain
from engine_helpers import damage_
from test_lockstep import assert_same_weights


def _bn_stats_(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.double().eval()


def _narrow_resnet() -> nn.Module:
    """ResNet-shaped (stem, residual blocks with a strided downsample, head) but 8-16 channels wide:
    reconstruction solves one ridge problem per output row, too slow on resnet18's 512 x 4608 layers."""
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down),
                                       BasicBlock(16, 16)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """One test model (built on demand: building all of them each time was most of these tests' time)."""
    torch.manual_seed(0)
    if name == "resnet18":
        return _bn_stats_(resnet18(num_classes=10)), torch.randn(12, 3, 32, 32, dtype=torch.float64)
    if name == "narrow-resnet":
        return _bn_stats_(_narrow_resnet()), torch.randn(12, 3, 16, 16, dtype=torch.float64)
    if name == "vit":
        return (VisionTransformer(image_size=16, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                                  num_classes=4).double().eval(), torch.randn(12, 3, 16, 16, dtype=torch.float64))
    # torchvision's ConvNeXt (CNBlock, LayerNorm2d, layer scale) at a few channels per stage
    stages = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)]
    return ConvNeXt(stages, num_classes=4).double().eval(), torch.randn(9, 3, 32, 32, dtype=torch.float64)


def _repaired(model, goal, data, **kw):
    m = copy.deepcopy(model)
    report = repair_(m, goal, data, **kw)
    return m, report


@pytest.mark.parametrize("name, other", [("resnet18", "per-site"), ("vit", "per-site"), ("convnext", "lockstep")])
def test_blockwise_equals_per_site_and_lockstep_passes(name, other):
    model, x = _model(name)
    goal = collect_stats(model, x)
    damage_(model)
    batches = list(x.split(4 if name != "convnext" else 3))
    expected, _ = _repaired(model, goal, batches, passes=other)
    blockwise, report = _repaired(model, goal, batches, passes="blockwise")
    assert_same_weights(blockwise, expected)
    assert any(not torch.equal(a, b) for a, b in zip(blockwise.state_dict().values(), model.state_dict().values()))
    info = report.extra["blockwise"]
    assert info["blocks"] >= 3 and report.passes == info["max_passes"]
    # fewer forwards than per-site passes: each segment runs 1 + (its sites) times at most
    assert info["max_passes"] < len(report.sites)


def test_offload_to_host_memory_or_files_gives_the_same_weights_and_leaves_nothing(tmp_path):
    model, x = _model("resnet18")
    goal = collect_stats(model, x)
    damage_(model)
    batches = list(x.split(4))
    on_device, _ = _repaired(model, goal, batches, passes="blockwise")
    in_host, _ = _repaired(model, goal, batches, passes="blockwise", offload="cpu")
    in_files, _ = _repaired(model, goal, batches, passes="blockwise", offload=tmp_path / "new" / "spill")
    (tmp_path / "kept").mkdir()
    in_kept, _ = _repaired(model, goal, batches, passes="blockwise", offload=tmp_path / "kept")
    assert_same_weights(in_host, on_device, tol=0)
    assert_same_weights(in_files, on_device, tol=0)
    assert_same_weights(in_kept, on_device, tol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # the folders it made are gone ...
    assert list((tmp_path / "kept").iterdir()) == []  # ... and so are its files in the user's one


def test_one_batch_is_one_inline_pass_per_segment_and_equals_the_default():
    model, x = _model("vit")
    goal = collect_stats(model, x)
    damage_(model)
    default, _ = _repaired(model, goal, x)
    blockwise, report = _repaired(model, goal, x, passes="blockwise")
    assert_same_weights(blockwise, default)
    assert report.passes == 1


@pytest.mark.filterwarnings("ignore:reconstruction is under-determined")  # few rows on purpose: small and fast
@pytest.mark.parametrize("name", ["narrow-resnet", "vit"])
def test_blockwise_reconstruction_equals_per_site_and_one_batch(name):
    reference, x = _model(name)
    model = copy.deepcopy(reference)
    damage_(model)
    out = {}
    for key, data, passes in (("per-site", list(x.split(4)), "per-site"), ("blockwise", list(x.split(4)), "blockwise"),
                              ("one", x, "lockstep"), ("blockwise, one", x, "blockwise")):
        out[key] = copy.deepcopy(model)
        report = reconstruct_(out[key], reference, data, passes=passes)
        assert report.passes["model"] > 0
    assert_same_weights(out["blockwise"], out["per-site"])
    assert_same_weights(out["blockwise, one"], out["one"])
    assert any(not torch.equal(a, b) for a, b in zip(out["blockwise"].state_dict().values(),
                                                     model.state_dict().values()))


def test_reset_mode_blockwise_equals_lockstep():
    model, x = _model("resnet18")
    goal = collect_stats(model, x)
    damage_(model)
    lockstep, _ = _repaired(model, goal, list(x.split(5)), repair="reset")
    blockwise, _ = _repaired(model, goal, list(x.split(5)), repair="reset", passes="blockwise")
    assert_same_weights(blockwise, lockstep)


def test_the_chain_of_torchvision_models_is_their_residual_blocks():
    assert find_block_chain(*_model("resnet18")).names == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert find_block_chain(*_model("vit")).names == [f"encoder.layers.encoder_layer_{i}" for i in range(3)]


class _LongSkip(nn.Module):
    """Block 0's output is read again after the last block (a U-Net-style skip)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h0 = self.blocks[0](x)
        h = self.blocks[2](self.blocks[1](h0))
        return self.head(h + h0)


def test_a_block_output_read_again_later_ends_the_chain_and_stays_exact():
    torch.manual_seed(0)
    model, x = _LongSkip().double(), torch.randn(30, 8, dtype=torch.float64)
    chain = find_block_chain(model, x)
    assert chain.names[0] != "blocks.0.0" and "blocks.2.1" in chain.names  # h0 is not a chain link
    goal = collect_stats(model, x)
    damage_(model)
    per_site, _ = _repaired(model, goal, list(x.split(7)), passes="per-site")
    blockwise, _ = _repaired(model, goal, list(x.split(7)), passes="blockwise")
    assert_same_weights(blockwise, per_site)


class _NoContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_layers_are_split_into_stem_blocks_and_tail_in_run_order():
    seq = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2), nn.Linear(2, 2))
    chain = BlockChain(seq, ["1", "2"], [seq[1], seq[2]], [None, None])
    assert chain.split(["0", "1.0", "1.1", "2", "3"]) == [[0], [1, 2], [3], [4]]
    with pytest.raises(ValueError, match="layer '3' runs between the blocks 1 ... 2"):
        chain.split(["1.0", "3", "2"])
    with pytest.raises(ValueError, match="site 'b' of block '1' comes after a later block's"):
        chain.split(["2", "1.0"], labels=["a", "b"], what="site")


def test_clear_errors_where_blockwise_does_not_apply(tmp_path):
    torch.manual_seed(0)
    model, x = _NoContainers().double(), torch.randn(10, 4, dtype=torch.float64)
    goal = collect_stats(model, x)
    with pytest.raises(ValueError, match=r"no chain of blocks found.*blocks=\[...\], or use passes='per-site'"):
        repair_(copy.deepcopy(model), goal, list(x.split(5)), passes="blockwise")
    seq, xs = _model("resnet18")
    with pytest.raises(ValueError, match="do not form a chain"):
        find_block_chain(seq, xs, blocks=["layer1.1", "layer1.0"])
    with pytest.raises(ValueError, match="blocks: .*no attribute"):
        find_block_chain(seq, xs, blocks=["layer9"])
    with pytest.raises(ValueError, match="apply to passes='blockwise' only"):
        repair_(copy.deepcopy(model), goal, x, offload=tmp_path)
    with pytest.raises(ValueError, match="apply to passes='blockwise' only"):
        reconstruct_(copy.deepcopy(model), model, x, blocks=["a"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_decoders_with_a_kv_cache_and_padding_equal_per_site(arch):
    transformers = pytest.importorskip("transformers")
    configs = {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            n_positions=16, n_embd=16, n_layer=2, n_head=2, vocab_size=50)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=16, vocab_size=50)),
    }
    cls, config = configs[arch]
    torch.manual_seed(0)
    model = cls(config).double().eval()
    ids = torch.randint(1, 50, (12, 8))
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]} for i in range(0, 12, 4)]
    goal = collect_stats(model, batches)
    damage_(model)
    assert len(find_block_chain(model, batches[0]).names) == 2
    per_site, _ = _repaired(model, goal, batches, passes="per-site")
    blockwise, _ = _repaired(model, goal, batches, passes="blockwise")
    assert_same_weights(blockwise, per_site)


class _FewInBlocks(nn.Module):
    """Most layers are plain attributes; only a small nn.Sequential forms a chain."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.tail = nn.Sequential(nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.tail(self.c(torch.relu(self.b(torch.relu(self.a(x))))))


def test_a_chain_holding_few_sites_is_exact_but_warns():
    torch.manual_seed(0)
    model, x = _FewInBlocks().double(), torch.randn(20, 4, dtype=torch.float64)
    goal = collect_stats(model, x)
    damage_(model)
    per_site, _ = _repaired(model, goal, list(x.split(5)), passes="per-site")
    with pytest.warns(UserWarning, match=r"holds only 0 of the 3 sites.*blocks=\[...\]"):
        blockwise, _ = _repaired(model, goal, list(x.split(5)), passes="blockwise")
    assert_same_weights(blockwise, per_site)
