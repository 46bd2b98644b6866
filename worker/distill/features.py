"""Intermediate features of a model, for feature distillation: pick the ends of its spatial stages and tap them.

Built on torchvision's fx feature extraction (`get_graph_node_names`, `create_feature_extractor`): node names are
module paths such as `layer2.1.relu_1`, stable for a given architecture.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

_LOGITS = "logits"


def stage_nodes(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
    """The nodes ending each of the model's last `count` spatial stages, in forward order.

    A stage is a run of consecutive nodes whose 4-D outputs share one (H, W); 1x1 maps (pooled heads,
    squeeze-excitation gates) are not stages. ValueError if torch.fx cannot trace the model.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    train_names, eval_names = _node_names(model)
    inputs = set(inspect.signature(model.forward).parameters)
    in_both = set(train_names)
    # A tap must find its nodes in both graphs (train and eval may differ, e.g. by dropout or aux heads).
    candidates = [n for n in eval_names if n in in_both and n not in inputs]
    sizes = _spatial_sizes(model, candidates, example)
    groups: list[tuple[tuple[int, int], str]] = []
    for name in candidates:
        size = sizes.get(name)
        if size is None or size == (1, 1):
            continue
        # Keep the last node of a run of one size: an in-place op on it (ReLU(inplace=True)) keeps the size and
        # would itself be the run's last node, so the tapped tensor is not overwritten after it is taken.
        if groups and groups[-1][0] == size:
            groups[-1] = (size, name)
        else:
            groups.append((size, name))
    if not groups:
        raise ValueError(f"{type(model).__name__} has no spatial feature maps larger than 1x1 at input size "
                         f"{tuple(example.shape[-2:])}")
    return [name for _, name in groups[-count:]]


def pair_stages(student_nodes: Sequence[str], teacher_nodes: Sequence[str]) -> list[tuple[str, str]]:
    """(student, teacher) stage pairs matched from the deepest stage backwards; min(len) pairs, in forward order."""
    k = min(len(student_nodes), len(teacher_nodes))
    if k == 0:
        return []
    return list(zip(student_nodes[-k:], teacher_nodes[-k:], strict=True))


class FeatureTap(nn.Module):
    """`forward(x) -> (logits, [features at nodes])` over the very parameters of `model` (no copy): training
    the tap trains the model. Build it after moving the model to its device.

    torchvision's extractor traces the model twice; the tap runs the train-mode graph while training and the
    eval-mode graph otherwise, and `train()`/`eval()` on the tap switch the shared BatchNorm/dropout modules.
    """

    def __init__(self, model: nn.Module, nodes: Sequence[str]) -> None:
        super().__init__()
        train_names, eval_names = _node_names(model)
        # The graph's last node is the model's output (students return plain logits).
        train_out, eval_out = train_names[-1], eval_names[-1]
        if not nodes or train_out in nodes or eval_out in nodes:
            raise ValueError(f"a feature tap needs stage nodes other than the output node; got {list(nodes)}")
        self.nodes = list(nodes)
        stage_keys = {node: f"stage{i}" for i, node in enumerate(self.nodes)}
        try:
            with _modes_kept(model):
                self.extractor = create_feature_extractor(
                    model, train_return_nodes={**stage_keys, train_out: _LOGITS},
                    eval_return_nodes={**stage_keys, eval_out: _LOGITS}, suppress_diff_warning=True)
        except Exception as e:  # fx fails with many types (TraceError, TypeError, RuntimeError, ...)
            raise ValueError(f"cannot tap {type(model).__name__} at {self.nodes}: {e}") from e
        self._keys = list(stage_keys.values())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.extractor(x)
        return out[_LOGITS], [out[k] for k in self._keys]


def _node_names(model: nn.Module) -> tuple[list[str], list[str]]:
    try:
        with _modes_kept(model):  # tracing flips the model to train and to eval
            return get_graph_node_names(model, suppress_diff_warning=True)
    except Exception as e:  # fx fails with many types (TraceError, TypeError, RuntimeError, ...)
        raise ValueError(f"torch.fx cannot trace {type(model).__name__} (data-dependent control flow or an "
                         f"untraceable call in its forward): {e}") from e


def _spatial_sizes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """(H, W) of every node among `names` that outputs a 4-D tensor, from one eval-mode forward pass of
    `example` (eval and no_grad: BatchNorm's running statistics stay untouched)."""
    try:
        with _modes_kept(model):  # the probe shares the model's submodules, and switches their modes
            probe = create_feature_extractor(model, return_nodes=names, suppress_diff_warning=True).eval()
            with torch.no_grad():
                out = probe(example)
    except Exception as e:  # fx fails with many types (TraceError, TypeError, RuntimeError, ...)
        raise ValueError(f"cannot trace {type(model).__name__} on an input of shape {tuple(example.shape)}: "
                         f"{e}") from e
    return {name: (int(v.shape[-2]), int(v.shape[-1])) for name, v in out.items()
            if isinstance(v, torch.Tensor) and v.dim() == 4}


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag afterwards: tracing flips the whole model to train and to eval,
    which would unfreeze, say, a teacher's BatchNorm that was deliberately left in eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
