"""bench/classifier_step.py does the same work on both sides: the PyTorch SEAM network trains
and groups exactly the parameters ``seam.make_optimizer`` does, and keeps BN in inference mode.
(The losses and the network are checked against JAX in test_seam.py and test_convert.py,
which use the same PyTorch code; ``python -m bench.classifier_step`` compares whole
gradients.)"""

import pathlib
import sys

import pytest
from flax import nnx

from pmm_jax.cams import seam

torch = pytest.importorskip("torch")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # bench/ is not installed
from bench import classifier_step as bench  # noqa: E402
from bench import classifier_torch  # noqa: E402

MICRO = ["--width_div=32", "--blocks=1,1,2,1", "--crop=48", "--batch=2", "--num_classes=4"]


def test_torch_seam_trains_the_same_parameter_groups():
    args = bench.parse_args(["--method=seam", *MICRO])
    torch_model, opt, _, _ = bench.build_torch(args)
    names = {id(p): k for k, p in torch_model.named_parameters()}
    torch_groups = {names[id(p)]: (g["mult"], g["weight_decay"] > 0)
                    for g in opt.param_groups for p in g["params"]}
    model = nnx.eval_shape(lambda: bench.jax_model(args)[0])
    flax_groups = {bench.torch_key(path): seam.GROUPS[group]
                   for path, group in seam.param_labels(model).items() if group != seam.FROZEN}
    assert torch_groups == flax_groups
    assert {k for k, p in torch_model.named_parameters() if p.requires_grad} == set(torch_groups)
    assert "backbone.b3.conv_branch2a.weight" in torch_groups
    assert torch_groups["f9.weight"] == (10.0, True)
    assert not any(k.startswith(("backbone.conv1a", "backbone.b2")) or "bn" in k
                   for k in torch_groups)


def test_train_mode_keeps_batchnorm_in_inference_mode():
    model = classifier_torch.train_mode(classifier_torch.TorchCAMClassifier(
        3, div=32, blocks=(1, 1, 1, 1)))
    assert model.training and model.dropout7.training
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
