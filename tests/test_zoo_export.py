"""Every family can be exported: the classifier (stages, pool, a head) as the export wraps it, traced
with torch.jit.trace and captured with torch.export (dynamic batch; for text, dynamic sequence
length too), gives the PyTorch model's logits on inputs of another batch size and length.

Measured with torch 2.14, transformers 5.24, timm 1.0.31: no family fails either path."""
from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
from torch import nn

from autoft.core.model import Classifier
from autoft.export.export import dynamic_shapes, wrap
from autoft.zoo import get_backbone, hf_text, timm_models, torchvision_models as tv
from autoft.zoo.base import Backbone, Preprocessing


def _image(name: str):
    if name.startswith("small:"):
        from test_zoo_torchvision import _small_nets

        make, size, _ = _small_nets()[name.removeprefix("small:")]
        torch.manual_seed(0)
        stages, pool, width = tv.split(make())
        return Backbone(name, stages, pool, width, Preprocessing("image", size, (0.5,) * 3, (0.5,) * 3)), size
    if name == "timm:swin":
        from timm.models.swin_transformer import SwinTransformer

        model = SwinTransformer(img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(2, 2),
                                num_heads=(1, 2), num_classes=5)
        stages, pool, width = timm_models.split(model)
        return Backbone(name, stages, pool, width, Preprocessing("image", 32, (0.5,) * 3, (0.5,) * 3)), 32
    torch.manual_seed(0)
    bb = get_backbone(name, pretrained=name.endswith("_folded"))
    return bb, (bb.preprocessing.input_size if name in ("timm:test_vit", "resnet20") else 64)


def _text(family: str):
    from test_zoo_hf import _model

    stages, pool, width = hf_text.split(_model(family))
    return Backbone(family, stages, pool, width, Preprocessing("text", tokenizer=None, max_length=32))


IMAGE = ["resnet20", "resnet18", "squeezenet1_1", "densenet121", "googlenet", "small:vit", "small:swin",
         "small:maxvit", "mobilenet_v3_small_folded", "timm:test_vit", "timm:test_convnext",
         "timm:mobilenetv3_small_050", "timm:swin"]
TEXT = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "deberta-v3", "modernbert"]


@pytest.mark.parametrize("name", IMAGE + [f"text:{f}" for f in TEXT])
def test_family_traces_and_exports(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    gen = torch.Generator().manual_seed(0)
    if name.startswith("text:"):
        bb = _text(name.removeprefix("text:"))

        def inputs(n, length):
            ids = torch.randint(4, 100, (n, length), generator=gen)
            mask = torch.ones(n, length, dtype=torch.long)
            mask[0, length // 2:] = 0
            return ids, mask

        example, other = inputs(8, 12), inputs(3, 20)
    else:
        bb, size = _image(name)
        example = (torch.randn(8, 3, size, size, generator=gen),)
        other = (torch.randn(3, 3, size, size, generator=gen),)
    bb.set_unfreeze(1)
    modality = bb.preprocessing.modality
    net = wrap(Classifier(bb, nn.Linear(bb.feature_dim, 3)), modality)
    with torch.no_grad():
        ref = net(*other)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example, check_trace=False)
        assert (traced(*other) - ref).abs().max() < 1e-4, "torch.jit.trace"
        program = torch.export.export(net, example, dynamic_shapes=dynamic_shapes(modality, bb.preprocessing),
                                      strict=False)
        assert (program.module()(*other) - ref).abs().max() < 1e-4, "torch.export"
