"""Reference CNNs built directly in ONNX (no deep-learning framework), with deterministic weights.

`build(name, seed=0)` returns a ModelProto for one of `ZOO`'s architectures. Every model follows
torchvision's module layout exactly (same layers, same parameter count, same names: node
`layer1.0.conv1`, initializer `layer1.0.conv1.weight`), with:

- input `input` float32 [batch, 3, 224, 224] (`batch` symbolic), output `logits` [batch, 1000];
- opset 17, IR version clamped to what the installed onnxruntime loads (`model.runtime_compatible`);
- inference-time graphs: Dropout is omitted, BatchNormalization is kept as BatchNormalization nodes
  (so the normalize pass has real folding to do), ReLU6 is `Clip(x, 0, 6)`, torchvision's
  `AdaptiveAvgPool2d` is `GlobalAveragePool` where it pools to 1x1 and omitted where it pools
  6x6 -> 6x6 / 7x7 -> 7x7 (AlexNet, VGG-16 at 224x224: an identity there).

Weights (a random network, not a trained one), each tensor drawn from its own generator
`numpy.random.default_rng([seed, crc32(tensor name)])`, so a tensor does not depend on the others:

- Conv and Gemm weights: He / kaiming normal, **fan_in** mode, std = sqrt(2 / fan_in) with
  fan_in = (C_in / group) * prod(kernel). fan_in (not torchvision's fan_out) keeps the forward
  activations O(1) through depth, including depthwise and 1x1 expansion layers, so the outputs
  are well scaled and validation tolerances (rtol/atol) stay meaningful.
- Conv / Gemm biases (where torchvision has them): uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  PyTorch's default bias init (non-zero, so passes must carry biases).
- BatchNormalization: gamma = 1 + 0.1 N(0,1), beta = 0.1 N(0,1), eps as torchvision (1e-5;
  GoogLeNet 1e-3). Running statistics are calibrated without data: the per-channel mean and
  variance each BN's input has on CALIB_BATCH seeded N(0, 1) images (one onnxruntime pass, every BN
  normalizing by its batch statistics as in training), then perturbed (mean + 0.1 std N(0,1),
  var * exp(0.1 N(0,1))). So every BN is non-trivial (folding it changes the conv weights and bias)
  and roughly standardizes its input, as a trained one does: activations and logits stay O(1)
  through depth instead of doubling in variance at every residual block.

Determinism: the same (name, seed) gives byte-identical models on one machine (the calibration pass
runs single-threaded); across CPU types the BN statistics may differ in the last float bits.

Parameter counts: `trainable_params(model)` counts what torchvision's `sum(p.numel() for p in
model.parameters())` counts (Conv/Gemm weights and biases, BN gamma and beta; not BN running
statistics, not the two Clip bounds). `onnxcomp.analysis.count_params` counts every initializer, so
it also includes the running statistics (2 per BN channel) and the Clip bounds.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
INPUT = "input"
OUTPUT = "logits"
BATCH = "batch"
NUM_CLASSES = 1000
CALIB_BATCH = 4  # images in the BN-calibration pass

# torchvision's published counts (sum of model.parameters()), which trainable_params() reproduces.
PUBLISHED_PARAMS: dict[str, int] = {
    "alexnet": 61_100_840,
    "vgg16": 138_357_544,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "googlenet": 6_624_904,
    "mobilenetv2": 3_504_872,
}


class _Builder:
    """Appends nodes and initializers straight into one ModelProto (no intermediate copies)."""

    def __init__(self, name: str, seed: int):
        self.seed = int(seed)
        self.model = onnx.ModelProto()
        self.graph = self.model.graph
        self.graph.name = name
        self._names: set[str] = set()
        self._clip_bounds = False
        self.bn_noise: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        inp = self.graph.input.add()
        inp.CopyFrom(helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [BATCH, 3, 224, 224]))

    # -- tensors ------------------------------------------------------------------------------
    def rng(self, tensor: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(tensor.encode())])

    def initializer(self, name: str, array: np.ndarray) -> str:
        arr = np.ascontiguousarray(array, dtype=np.float32)
        t = self.graph.initializer.add()
        t.name = name
        t.data_type = TensorProto.FLOAT
        t.dims.extend(arr.shape)
        t.raw_data = arr.tobytes()
        return name

    def _he_array(self, name: str, shape: Sequence[int], fan_in: int) -> np.ndarray:
        w = self.rng(name).standard_normal(tuple(shape), dtype=np.float32)
        w *= np.float32(math.sqrt(2.0 / fan_in))
        return w

    def _bias_array(self, name: str, n: int, fan_in: int) -> np.ndarray:
        bound = 1.0 / math.sqrt(fan_in)
        return self.rng(name).uniform(-bound, bound, n).astype(np.float32)

    def node(self, op: str, inputs: Sequence[str], name: str, out: str | None = None, **attrs) -> str:
        """Add a node named `name`; its output tensor is `out` (default: the node name)."""
        if name in self._names:
            raise ValueError(f"duplicate node name {name!r}")
        self._names.add(name)
        out = out or name
        self.graph.node.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    # -- layers -------------------------------------------------------------------------------
    def conv(self, x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0,
             group: int = 1, bias: bool = True) -> str:
        fan_in = (cin // group) * k * k
        inputs = [x, self.initializer(f"{name}.weight", self._he_array(f"{name}.weight", (cout, cin // group, k, k), fan_in))]
        if bias:
            inputs.append(self.initializer(f"{name}.bias", self._bias_array(f"{name}.bias", cout, fan_in)))
        return self.node("Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4, group=group, dilations=[1, 1])

    def bn(self, x: str, name: str, c: int, eps: float = 1e-5) -> str:
        """BatchNormalization with gamma = 1 + 0.1 N(0,1), beta = 0.1 N(0,1); its running statistics
        are set later by `_calibrate_bn` (placeholders 0 / 1 until then)."""
        rng = self.rng(name)
        gamma = 1.0 + 0.1 * rng.standard_normal(c)
        beta = 0.1 * rng.standard_normal(c)
        # perturbations applied on top of the measured statistics (see _calibrate_bn)
        self.bn_noise[name] = (0.1 * rng.standard_normal(c), np.exp(0.1 * rng.standard_normal(c)))
        inputs = [x,
                  self.initializer(f"{name}.weight", gamma),
                  self.initializer(f"{name}.bias", beta),
                  self.initializer(f"{name}.running_mean", np.zeros(c)),
                  self.initializer(f"{name}.running_var", np.ones(c))]
        return self.node("BatchNormalization", inputs, name, epsilon=eps)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def relu6(self, x: str, name: str) -> str:
        if not self._clip_bounds:  # one shared pair of scalar bounds for every ReLU6
            self.initializer("relu6.min", np.array(0.0, np.float32))
            self.initializer("relu6.max", np.array(6.0, np.float32))
            self._clip_bounds = True
        return self.node("Clip", [x, "relu6.min", "relu6.max"], name)

    def add(self, a: str, b: str, name: str) -> str:
        return self.node("Add", [a, b], name)

    def concat(self, xs: Sequence[str], name: str) -> str:
        return self.node("Concat", list(xs), name, axis=1)

    def maxpool(self, x: str, name: str, k: int, stride: int, pad: int = 0, ceil: bool = False) -> str:
        return self.node("MaxPool", [x], name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4, ceil_mode=int(ceil))

    def gap(self, x: str, name: str) -> str:
        return self.node("GlobalAveragePool", [x], name)

    def flatten(self, x: str, name: str = "flatten") -> str:
        return self.node("Flatten", [x], name, axis=1)

    def linear(self, x: str, name: str, fin: int, fout: int, out: str | None = None) -> str:
        w = self.initializer(f"{name}.weight", self._he_array(f"{name}.weight", (fout, fin), fin))
        b = self.initializer(f"{name}.bias", self._bias_array(f"{name}.bias", fout, fin))
        return self.node("Gemm", [x, w, b], name, out=out, transB=1)

    def finish(self, out: str, doc: str) -> onnx.ModelProto:
        from onnxcomp import __version__
        from onnxcomp.model import runtime_compatible

        if out != OUTPUT:
            raise ValueError("the last node must write the graph output")
        o = self.graph.output.add()
        o.CopyFrom(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH, NUM_CLASSES]))
        m = self.model
        m.opset_import.add(domain="", version=OPSET)
        m.producer_name = "onnxcomp.zoo"
        m.producer_version = __version__
        m.doc_string = doc
        m.metadata_props.add(key="onnxcomp.zoo", value=self.graph.name)
        m.metadata_props.add(key="onnxcomp.zoo.seed", value=str(self.seed))
        m.ir_version = onnx.IR_VERSION
        runtime_compatible(m)
        self._calibrate_bn()
        return m

    def _calibrate_bn(self) -> None:
        """Data-free BN calibration: set each BN's running statistics to the per-channel mean and
        variance of its input on CALIB_BATCH deterministic N(0, 1) images, every BN normalizing by its
        batch statistics as in training (one onnxruntime pass), then perturb them
        (mean + 0.1 std N(0,1), var * exp(0.1 N(0,1))). Each BN then roughly standardizes its input
        as a trained one does, so activations and logits stay O(1) through depth."""
        bns = [n for n in self.graph.node if n.op_type == "BatchNormalization"]
        if not bns:
            return
        import onnxruntime as ort

        cal = onnx.ModelProto()
        cal.CopyFrom(self.model)
        nodes: list[onnx.NodeProto] = []
        stats: list[tuple[str, str]] = []
        for n in cal.graph.node:
            if n.op_type == "BatchNormalization":
                z, e = self.bn_noise[n.name]
                x, p = n.input[0], f"{n.name}/calib"
                self._add_const(cal, f"{p}/z", z)
                self._add_const(cal, f"{p}/e", e)
                nodes += [
                    helper.make_node("ReduceMean", [x], [f"{p}/mean"], axes=[0, 2, 3], keepdims=0),
                    helper.make_node("ReduceMean", [x], [f"{p}/mean_k"], axes=[0, 2, 3], keepdims=1),
                    helper.make_node("Sub", [x, f"{p}/mean_k"], [f"{p}/dev"]),
                    helper.make_node("Mul", [f"{p}/dev", f"{p}/dev"], [f"{p}/dev2"]),
                    helper.make_node("ReduceMean", [f"{p}/dev2"], [f"{p}/var"], axes=[0, 2, 3], keepdims=0),
                    helper.make_node("Sqrt", [f"{p}/var"], [f"{p}/std"]),
                    helper.make_node("Mul", [f"{p}/std", f"{p}/z"], [f"{p}/shift"]),
                    helper.make_node("Add", [f"{p}/mean", f"{p}/shift"], [f"{p}/rmean"]),
                    helper.make_node("Mul", [f"{p}/var", f"{p}/e"], [f"{p}/rvar"]),
                ]
                n.input[3], n.input[4] = f"{p}/rmean", f"{p}/rvar"
                stats.append((f"{p}/rmean", f"{p}/rvar"))
                cal.graph.output.add().name = f"{p}/rmean"
                cal.graph.output.add().name = f"{p}/rvar"
            nodes.append(n)
        del cal.graph.node[:]
        cal.graph.node.extend(nodes)
        replaced = {name for n in bns for name in n.input[3:5]}
        keep = [t for t in cal.graph.initializer if t.name not in replaced]
        del cal.graph.initializer[:]
        cal.graph.initializer.extend(keep)
        del keep
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1  # results independent of the machine's core count
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(cal.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        del cal
        x = self.rng("calibration").standard_normal((CALIB_BATCH, 3, 224, 224), dtype=np.float32)
        names = [t for pair in stats for t in pair]
        values = dict(zip(names, sess.run(names, {INPUT: x}), strict=True))
        del sess
        inits = {t.name: t for t in self.graph.initializer}
        for n, (rm, rv) in zip(bns, stats, strict=True):
            inits[n.input[3]].raw_data = np.ascontiguousarray(values[rm], np.float32).tobytes()
            inits[n.input[4]].raw_data = np.ascontiguousarray(values[rv], np.float32).tobytes()

    @staticmethod
    def _add_const(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
        t = model.graph.initializer.add()
        t.name, t.data_type = name, TensorProto.FLOAT
        t.dims.extend(array.shape)
        t.raw_data = np.ascontiguousarray(array, np.float32).tobytes()


# -- architectures ----------------------------------------------------------------------------

def alexnet(seed: int = 0) -> onnx.ModelProto:
    """torchvision AlexNet (the one-tower variant with 64/192/384/256/256 filters): 61,100,840 params."""
    b = _Builder("alexnet", seed)
    x = INPUT
    x = b.relu(b.conv(x, "features.0", 3, 64, 11, 4, 2), "features.1")
    x = b.maxpool(x, "features.2", 3, 2)
    x = b.relu(b.conv(x, "features.3", 64, 192, 5, 1, 2), "features.4")
    x = b.maxpool(x, "features.5", 3, 2)
    x = b.relu(b.conv(x, "features.6", 192, 384, 3, 1, 1), "features.7")
    x = b.relu(b.conv(x, "features.8", 384, 256, 3, 1, 1), "features.9")
    x = b.relu(b.conv(x, "features.10", 256, 256, 3, 1, 1), "features.11")
    x = b.maxpool(x, "features.12", 3, 2)  # 256 x 6 x 6; avgpool(6x6) is the identity
    x = b.flatten(x)
    x = b.relu(b.linear(x, "classifier.1", 256 * 6 * 6, 4096), "classifier.2")
    x = b.relu(b.linear(x, "classifier.4", 4096, 4096), "classifier.5")
    x = b.linear(x, "classifier.6", 4096, NUM_CLASSES, out=OUTPUT)
    return b.finish(x, alexnet.__doc__ or "")


def vgg16(seed: int = 0) -> onnx.ModelProto:
    """torchvision VGG-16 (configuration D, no BN): 138,357,544 params."""
    b = _Builder("vgg16", seed)
    cfg: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    x, cin, i = INPUT, 3, 0
    for v in cfg:
        if v == "M":
            x = b.maxpool(x, f"features.{i}", 2, 2)
            i += 1
        else:
            x = b.relu(b.conv(x, f"features.{i}", cin, int(v), 3, 1, 1), f"features.{i + 1}")
            cin, i = int(v), i + 2
    x = b.flatten(x)  # 512 x 7 x 7; avgpool(7x7) is the identity
    x = b.relu(b.linear(x, "classifier.0", 512 * 7 * 7, 4096), "classifier.1")
    x = b.relu(b.linear(x, "classifier.3", 4096, 4096), "classifier.4")
    x = b.linear(x, "classifier.6", 4096, NUM_CLASSES, out=OUTPUT)
    return b.finish(x, vgg16.__doc__ or "")


def _resnet(name: str, bottleneck: bool, layers: Sequence[int], seed: int, doc: str) -> onnx.ModelProto:
    b = _Builder(name, seed)
    x = b.conv(INPUT, "conv1", 3, 64, 7, 2, 3, bias=False)
    x = b.relu(b.bn(x, "bn1", 64), "relu")
    x = b.maxpool(x, "maxpool", 3, 2, 1)
    expansion = 4 if bottleneck else 1
    inplanes = 64
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
        for bi in range(blocks):
            stride = 2 if (bi == 0 and li > 1) else 1
            p = f"layer{li}.{bi}"
            identity = x
            if bottleneck:  # torchvision v1.5: the stride sits on the 3x3 conv
                y = b.relu(b.bn(b.conv(x, f"{p}.conv1", inplanes, planes, 1, bias=False), f"{p}.bn1", planes), f"{p}.relu")
                y = b.conv(y, f"{p}.conv2", planes, planes, 3, stride, 1, bias=False)
                y = b.relu(b.bn(y, f"{p}.bn2", planes), f"{p}.relu_1")
                y = b.bn(b.conv(y, f"{p}.conv3", planes, planes * 4, 1, bias=False), f"{p}.bn3", planes * 4)
            else:
                y = b.conv(x, f"{p}.conv1", inplanes, planes, 3, stride, 1, bias=False)
                y = b.relu(b.bn(y, f"{p}.bn1", planes), f"{p}.relu")
                y = b.bn(b.conv(y, f"{p}.conv2", planes, planes, 3, 1, 1, bias=False), f"{p}.bn2", planes)
            if stride != 1 or inplanes != planes * expansion:
                d = b.conv(x, f"{p}.downsample.0", inplanes, planes * expansion, 1, stride, bias=False)
                identity = b.bn(d, f"{p}.downsample.1", planes * expansion)
            y = b.add(y, identity, f"{p}.add")
            x = b.relu(y, f"{p}.relu_{2 if bottleneck else 1}")
            inplanes = planes * expansion
    x = b.flatten(b.gap(x, "avgpool"))
    x = b.linear(x, "fc", 512 * expansion, NUM_CLASSES, out=OUTPUT)
    return b.finish(x, doc)


def resnet18(seed: int = 0) -> onnx.ModelProto:
    """torchvision ResNet-18 (BasicBlock [2, 2, 2, 2]): 11,689,512 params."""
    return _resnet("resnet18", False, (2, 2, 2, 2), seed, resnet18.__doc__ or "")


def resnet50(seed: int = 0) -> onnx.ModelProto:
    """torchvision ResNet-50 v1.5 (Bottleneck [3, 4, 6, 3], stride on the 3x3): 25,557,032 params."""
    return _resnet("resnet50", True, (3, 4, 6, 3), seed, resnet50.__doc__ or "")


def googlenet(seed: int = 0) -> onnx.ModelProto:
    """torchvision GoogLeNet (Inception v1 with BN, no auxiliary heads, no transform_input): 6,624,904 params."""
    b = _Builder("googlenet", seed)

    def basic(x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> str:
        y = b.conv(x, f"{name}.conv", cin, cout, k, stride, pad, bias=False)
        return b.relu(b.bn(y, f"{name}.bn", cout, eps=1e-3), f"{name}.relu")

    def inception(x: str, name: str, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pp: int) -> str:
        b1 = basic(x, f"{name}.branch1", cin, c1, 1)
        b2 = basic(basic(x, f"{name}.branch2.0", cin, c3r, 1), f"{name}.branch2.1", c3r, c3, 3, 1, 1)
        # torchvision's branch3 uses a 3x3 conv (not the paper's 5x5); its weights and count follow that.
        b3 = basic(basic(x, f"{name}.branch3.0", cin, c5r, 1), f"{name}.branch3.1", c5r, c5, 3, 1, 1)
        b4 = basic(b.maxpool(x, f"{name}.branch4.0", 3, 1, 1, ceil=True), f"{name}.branch4.1", cin, pp, 1)
        return b.concat([b1, b2, b3, b4], f"{name}.concat")

    x = basic(INPUT, "conv1", 3, 64, 7, 2, 3)
    x = b.maxpool(x, "maxpool1", 3, 2, ceil=True)
    x = basic(x, "conv2", 64, 64, 1)
    x = basic(x, "conv3", 64, 192, 3, 1, 1)
    x = b.maxpool(x, "maxpool2", 3, 2, ceil=True)
    x = inception(x, "inception3a", 192, 64, 96, 128, 16, 32, 32)
    x = inception(x, "inception3b", 256, 128, 128, 192, 32, 96, 64)
    x = b.maxpool(x, "maxpool3", 3, 2, ceil=True)
    x = inception(x, "inception4a", 480, 192, 96, 208, 16, 48, 64)
    x = inception(x, "inception4b", 512, 160, 112, 224, 24, 64, 64)
    x = inception(x, "inception4c", 512, 128, 128, 256, 24, 64, 64)
    x = inception(x, "inception4d", 512, 112, 144, 288, 32, 64, 64)
    x = inception(x, "inception4e", 528, 256, 160, 320, 32, 128, 128)
    x = b.maxpool(x, "maxpool4", 2, 2, ceil=True)
    x = inception(x, "inception5a", 832, 256, 160, 320, 32, 128, 128)
    x = inception(x, "inception5b", 832, 384, 192, 384, 48, 128, 128)
    x = b.flatten(b.gap(x, "avgpool"))
    x = b.linear(x, "fc", 1024, NUM_CLASSES, out=OUTPUT)
    return b.finish(x, googlenet.__doc__ or "")


def mobilenetv2(seed: int = 0) -> onnx.ModelProto:
    """torchvision MobileNetV2 (width 1.0, ReLU6 as Clip, depthwise convs as group=C): 3,504,872 params."""
    b = _Builder("mobilenetv2", seed)

    def cna(x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, act: bool = True) -> str:
        """Conv2dNormActivation: `name.0` conv (no bias), `name.1` BN, `name.2` ReLU6."""
        y = b.bn(b.conv(x, f"{name}.0", cin, cout, k, stride, (k - 1) // 2, group, bias=False), f"{name}.1", cout)
        return b.relu6(y, f"{name}.2") if act else y

    x = cna(INPUT, "features.0", 3, 32, 3, 2)
    cin, idx = 32, 1
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{idx}.conv"
            hidden = cin * t
            y, j = x, 0
            if t != 1:
                y, j = cna(y, f"{p}.0", cin, hidden, 1), 1
            y = cna(y, f"{p}.{j}", hidden, hidden, 3, stride, group=hidden)
            y = b.bn(b.conv(y, f"{p}.{j + 1}", hidden, c, 1, bias=False), f"{p}.{j + 2}", c)
            if stride == 1 and cin == c:
                y = b.add(x, y, f"features.{idx}.add")
            x, cin, idx = y, c, idx + 1
    x = cna(x, f"features.{idx}", cin, 1280, 1)
    x = b.flatten(b.gap(x, "avgpool"))
    x = b.linear(x, "classifier.1", 1280, NUM_CLASSES, out=OUTPUT)
    return b.finish(x, mobilenetv2.__doc__ or "")


ZOO: dict[str, Callable[[int], onnx.ModelProto]] = {
    "alexnet": alexnet,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "googlenet": googlenet,
    "mobilenetv2": mobilenetv2,
}


def build(name: str, seed: int = 0) -> onnx.ModelProto:
    """The architecture `name` (a key of ZOO) with weights drawn from `seed`.

    Same (name, seed) -> byte-identical serialization. Unknown name -> BadInputError naming the choices.
    """
    from onnxcomp.errors import BadInputError

    if name not in ZOO:
        import difflib

        close = difflib.get_close_matches(name, ZOO, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise BadInputError(f"unknown zoo model '{name}'{hint} (choices: {', '.join(ZOO)})")
    return ZOO[name](seed)


def trainable_params(model: onnx.ModelProto) -> int:
    """What torchvision counts as parameters: every initializer except BatchNormalization running
    statistics (inputs 3 and 4 of a BN node) and Clip bounds (inputs 1 and 2 of a Clip node)."""
    excluded: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            excluded.update(node.input[3:5])
        elif node.op_type == "Clip":
            excluded.update(node.input[1:3])
    return int(sum(math.prod(t.dims) for t in model.graph.initializer if t.name not in excluded))
