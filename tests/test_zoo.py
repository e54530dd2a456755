"""The reference zoo: torchvision-exact parameter counts, valid ONNX, runnable in onnxruntime,
deterministic, well-scaled outputs, meaningful names, published MAC counts."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxcomp import zoo
from onnxcomp.analysis import count_params, total_macs
from onnxcomp.errors import BadInputError
from onnxcomp.graph import attr
from onnxcomp.model import max_runtime_ir_version, model_bytes

# torchvision's figures (sum(p.numel() for p in model.parameters())), typed in independently of zoo.py.
PUBLISHED = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "googlenet": 6_624_904,
    "mobilenetv2": 3_504_872,
}
# The rounded figures the literature quotes (millions), the "within 1%" criterion.
PUBLISHED_M = {"alexnet": 61.1, "vgg16": 138.36, "resnet18": 11.69, "resnet50": 25.56, "googlenet": 6.62,
               "mobilenetv2": 3.50}
BN_LAYERS = {"alexnet": 0, "vgg16": 0, "resnet18": 20, "resnet50": 53, "googlenet": 57, "mobilenetv2": 52}
HEAVY = {"alexnet", "vgg16"}

NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in zoo.ZOO]


@pytest.fixture(scope="module", params=NAMES)
def built(request) -> tuple[str, onnx.ModelProto]:
    """Each model is built once and shared by the tests below (pytest groups tests by this param)."""
    return request.param, zoo.build(request.param)


@pytest.fixture(scope="module")
def session(built) -> ort.InferenceSession:
    _, model = built
    return ort.InferenceSession(model_bytes(model), providers=["CPUExecutionProvider"])


def test_zoo_lists_the_six_architectures():
    assert set(zoo.ZOO) == set(PUBLISHED)
    assert zoo.PUBLISHED_PARAMS == PUBLISHED


def test_parameter_count_matches_torchvision(built):
    name, model = built
    n = zoo.trainable_params(model)
    assert n == PUBLISHED[name]
    assert abs(n / 1e6 - PUBLISHED_M[name]) / PUBLISHED_M[name] < 0.01


def test_count_params_adds_running_stats_and_clip_bounds(built):
    """analysis.count_params counts every initializer: the torchvision count + 2 per BN channel
    (running mean and var) + the two shared ReLU6 bounds."""
    name, model = built
    inits = {t.name: t for t in model.graph.initializer}
    bn_channels = sum(math.prod(inits[n.input[1]].dims) for n in model.graph.node if n.op_type == "BatchNormalization")
    clip_bounds = 2 if any(n.op_type == "Clip" for n in model.graph.node) else 0
    assert count_params(model) == PUBLISHED[name] + 2 * bn_channels + clip_bounds


def test_model_is_valid_onnx_with_the_promised_interface(built):
    name, model = built
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert dims(model.graph.input[0]) == ["batch", 3, 224, 224]
    assert dims(model.graph.output[0]) == ["batch", 1000]
    assert {(o.domain, o.version) for o in model.opset_import} == {("", zoo.OPSET)}
    assert model.ir_version <= max_runtime_ir_version()
    assert not any(n.op_type == "Dropout" for n in model.graph.node)


def test_node_names_are_unique_and_follow_torchvision(built):
    name, model = built
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    inits = {t.name for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    # every layer's weight is the initializer `<node name>.weight`, as in torchvision's state_dict
    assert all(n.input[1] == f"{n.name}.weight" and n.input[1] in inits for n in convs)
    expected = {
        "alexnet": {"features.0": "Conv", "features.10": "Conv", "features.12": "MaxPool", "classifier.6": "Gemm"},
        "vgg16": {"features.0": "Conv", "features.28": "Conv", "features.30": "MaxPool", "classifier.6": "Gemm"},
        "resnet18": {"conv1": "Conv", "bn1": "BatchNormalization", "layer1.0.conv1": "Conv",
                     "layer2.0.downsample.0": "Conv", "layer4.1.bn2": "BatchNormalization", "fc": "Gemm"},
        "resnet50": {"layer1.0.conv3": "Conv", "layer1.0.downsample.1": "BatchNormalization",
                     "layer3.5.conv2": "Conv", "fc": "Gemm"},
        "googlenet": {"conv1.conv": "Conv", "inception3a.branch2.1.conv": "Conv",
                      "inception5b.branch4.0": "MaxPool", "inception5b.concat": "Concat", "fc": "Gemm"},
        "mobilenetv2": {"features.0.0": "Conv", "features.1.conv.0.0": "Conv", "features.3.conv.1.0": "Conv",
                        "features.3.conv.1.2": "Clip", "features.18.0": "Conv", "classifier.1": "Gemm"},
    }[name]
    by_name = {n.name: n for n in model.graph.node}
    assert {k: by_name[k].op_type for k in expected} == expected
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == BN_LAYERS[name]


def test_architecture_details(built):
    """Spot checks of torchvision specifics that the parameter count alone would not catch."""
    name, model = built
    nodes = {n.name: n for n in model.graph.node}
    if name == "resnet50":
        assert attr(nodes["layer2.0.conv2"], "strides") == [2, 2]  # v1.5: stride on the 3x3
        assert attr(nodes["layer2.0.conv1"], "strides") == [1, 1]
    elif name == "mobilenetv2":
        assert attr(nodes["features.3.conv.1.0"], "group") == 144  # depthwise 3x3 on 24 * 6 channels
        assert sum(n.op_type == "Add" for n in nodes.values()) == 10  # residual blocks of MobileNetV2
    elif name == "googlenet":
        assert attr(nodes["inception3a.branch3.1.conv"], "kernel_shape") == [3, 3]  # torchvision's "5x5" branch
        assert attr(nodes["maxpool1"], "ceil_mode") == 1
        assert attr(nodes["conv1.bn"], "epsilon") == pytest.approx(1e-3)
    elif name == "alexnet":
        assert attr(nodes["features.0"], "kernel_shape") == [11, 11] and attr(nodes["features.0"], "strides") == [4, 4]
    elif name == "vgg16":
        assert sum(n.op_type == "Conv" for n in nodes.values()) == 13
    elif name == "resnet18":
        assert sum(n.op_type == "Add" for n in nodes.values()) == 8


def test_batch_norm_statistics_are_not_trivial(built):
    name, model = built
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        gamma, beta, mean, var = (inits[i] for i in n.input[1:5])
        assert np.all(var > 0), n.name
        assert not np.allclose(gamma, 1) and not np.allclose(beta, 0), n.name
        assert not np.allclose(mean, 0) and not np.allclose(var, 1), n.name


@pytest.mark.parametrize("batch", [1, 2])
def test_runs_in_onnxruntime_with_finite_well_scaled_logits(built, session, batch):
    name, _ = built
    x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    (y,) = session.run(None, {"input": x})
    assert y.shape == (batch, 1000) and y.dtype == np.float32
    assert np.isfinite(y).all()
    # He fan_in init + calibrated BN keep the logits O(1): neither vanishing nor exploding with depth
    assert 0.1 < float(y.std()) < 50, float(y.std())
    if batch == 2:  # the batch dim is truly dynamic: each sample's logits do not depend on the other
        (y0,) = session.run(None, {"input": x[:1]})
        np.testing.assert_allclose(y[:1], y0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "mobilenetv2"])
def test_same_seed_gives_identical_bytes(name):
    a, b = model_bytes(zoo.build(name, seed=0)), model_bytes(zoo.build(name, seed=0))
    assert a == b
    assert model_bytes(zoo.build(name, seed=1)) != a


def test_tensors_are_seeded_independently():
    """Each tensor has its own generator keyed by its name: same name + seed, same values across models."""
    r18, r50 = zoo.build("resnet18"), zoo.build("resnet50")
    w18 = next(t for t in r18.graph.initializer if t.name == "conv1.weight")
    w50 = next(t for t in r50.graph.initializer if t.name == "conv1.weight")
    assert w18.raw_data == w50.raw_data
    w = numpy_helper.to_array(w18)
    assert abs(float(w.std()) - math.sqrt(2 / (3 * 7 * 7))) < 0.05 * math.sqrt(2 / (3 * 7 * 7))  # He, fan_in


# torchvision's published GFLOPS (multiply-accumulates of the Conv and Linear layers) at 1x3x224x224
PUBLISHED_GMACS = {"alexnet": 0.71, "vgg16": 15.47, "resnet18": 1.81, "resnet50": 4.09, "googlenet": 1.50,
                   "mobilenetv2": 0.30}


def test_macs_match_published_figures(built):
    name, model = built
    macs = total_macs(model, {"input": [1, 3, 224, 224]})
    assert macs is not None
    assert abs(macs / 1e9 - PUBLISHED_GMACS[name]) / PUBLISHED_GMACS[name] < 0.02, macs


@pytest.mark.parametrize("name, gmacs", [("resnet18", 1.81), ("mobilenetv2", 0.30)])
def test_macs_unchanged_by_normalize(name, gmacs):
    """Folding BN into convs moves parameters, not MACs (BN is not counted as a layer)."""
    from onnxcomp.passes.base import Context, get_pass

    model = zoo.build(name)
    out = get_pass("normalize")().run(model, Context()).model
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    assert total_macs(out, {"input": [1, 3, 224, 224]}) == total_macs(model, {"input": [1, 3, 224, 224]})


def test_unknown_name_is_bad_input_with_a_suggestion():
    with pytest.raises(BadInputError, match="did you mean 'resnet18'"):
        zoo.build("resnet19")
