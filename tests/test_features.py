"""Feature taps: stage selection by traced shapes, parameter sharing with the model, attention transfer through them."""

import itertools

import pytest
import torch
from torch import nn

from worker.distill.features import FeatureTap, pair_stages, stage_nodes
from worker.distill.losses import AttentionTransferLoss
from worker.distill.students import create_model

ARCHS = ["resnet8", "resnet20", "resnet32x4", "wrn_16_2", "resnet18", "mobilenet_v3_small"]


def _bn_stats(model):
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_nodes_end_three_stages_of_shrinking_size(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
    model.train()
    stats = _bn_stats(model)
    x = torch.randn(1, 3, 32, 32)  # eval-mode probing works on one sample
    nodes = stage_nodes(model, x)
    assert len(nodes) == 3
    # choosing the nodes neither changes the model's mode nor its BatchNorm statistics
    assert all(m.training for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(model), strict=True))
    with torch.no_grad():
        _, feats = FeatureTap(model, nodes).eval()(x)
    sizes = [tuple(f.shape[-2:]) for f in feats]
    assert all(f.dim() == 4 and f.shape[0] == 1 for f in feats)
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in itertools.pairwise(sizes)), sizes
    assert all(h > 1 or w > 1 for h, w in sizes)


def test_stage_nodes_of_a_cifar_resnet_are_the_ends_of_its_three_layers():
    # resnet20: three stages of three blocks at 32, 16 and 8 pixels; each ends with its last block's second ReLU.
    nodes = stage_nodes(create_model("resnet20", num_classes=10), torch.randn(1, 3, 32, 32))
    assert nodes == ["layer1.2.relu_1", "layer2.2.relu_1", "layer3.2.relu_1"]


def test_stage_nodes_count_takes_the_deepest_stages():
    model = create_model("resnet18", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    assert stage_nodes(model, x, count=2) == stage_nodes(model, x, count=3)[1:]
    # at 32x32 resnet18 has four stages above 1x1 (16, 8, 4, 2 pixels); asking for more gives them all
    assert len(stage_nodes(model, x, count=10)) == 4


def test_stage_nodes_keep_a_frozen_submodule_frozen():
    model = create_model("resnet8", num_classes=10).train()
    model.bn1.eval()
    stage_nodes(model, torch.randn(1, 3, 32, 32))
    FeatureTap(model, ["layer1.0.relu_1"])
    assert model.training and not model.bn1.training


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:  # control flow on a tensor's value: torch.fx cannot trace this
            x = x * 2
        return self.fc(x.mean((2, 3)))


def test_an_untraceable_model_is_a_value_error():
    with pytest.raises(ValueError, match="trace"):
        stage_nodes(_DataDependent(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError):
        FeatureTap(_DataDependent(), ["conv"])


def test_the_tap_shares_its_parameters_with_the_model():
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    tap = FeatureTap(model, stage_nodes(model, x))
    assert {id(p) for p in tap.parameters()} == {id(p) for p in model.parameters()}

    tap.train()
    torch.manual_seed(1)
    logits, _ = tap(x)
    assert torch.equal(logits, model.train()(x))  # train mode: BatchNorm on batch statistics, in both

    before = model.conv1.weight.detach().clone()
    opt = torch.optim.SGD(tap.parameters(), lr=0.1)
    logits, feats = tap(x)
    (nn.functional.cross_entropy(logits, y) + sum(f.mean() for f in feats)).backward()
    opt.step()
    assert not torch.equal(model.conv1.weight, before)  # a step through the tap trained the model

    tap.eval()
    with torch.no_grad():
        assert torch.equal(tap(x)[0], model.eval()(x))


def test_tap_mode_switches_graph_and_shared_modules():
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", num_classes=10)  # its classifier has dropout
    x = torch.randn(2, 3, 32, 32)
    tap = FeatureTap(model, stage_nodes(model, x))
    # the tap holds the model's leaf modules (its containers are the tap's own), so it switches those
    leaves = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout))]
    tap.eval()
    assert not any(m.training for m in leaves)
    with torch.no_grad():
        assert torch.equal(tap(x)[0], tap(x)[0])  # eval graph: no dropout, BatchNorm on running statistics
        assert torch.equal(tap(x)[0], model(x))
    tap.train()
    assert all(m.training for m in leaves)
    with torch.no_grad():
        assert not torch.equal(tap(x)[0], tap(x)[0])  # train graph: dropout is live


def test_pair_stages_matches_from_the_deepest_stage():
    assert pair_stages(["a", "b", "c"], ["x", "y"]) == [("b", "x"), ("c", "y")]
    assert pair_stages(["a"], ["x", "y", "z"]) == [("a", "z")]
    assert pair_stages([], ["x"]) == []


def test_attention_transfer_between_a_resnet8_student_and_a_resnet20_teacher():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet20", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    pairs = pair_stages(stage_nodes(student, x), stage_nodes(teacher, x))
    s_tap = FeatureTap(student, [s for s, _ in pairs]).train()
    t_tap = FeatureTap(teacher, [t for _, t in pairs]).eval()
    with torch.no_grad():
        _, t_feats = t_tap(x)
    _, s_feats = s_tap(x)
    loss = AttentionTransferLoss()(s_feats, t_feats)
    assert loss.item() > 0
    loss.backward()
    assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
