"""The `ai.onnxcomp.WinogradConv` op: its standard-op body (a model-local function) and its calls.

`WinogradConv(X, U, K, A[, B]) -> Y` is a 3x3, stride-1, dilation-1, group-1 convolution with
explicit `pads` whose weights are stored pre-transformed, U = G g G^T as [a*a, C_out, C_in]
(a = m + 2 for output tile m). K is the input transform as a [a*a, 1, a, a] correlation kernel and
A = kron(A^T, A^T) [m*m, a*a] the output transform (shared by every layer of one tile size). A
runtime with a native kernel may implement the op from `tile`, `pads`, U and B alone; the other
attributes (`grid_pads`, `tile_strides`, `tile_shape`, `grid_shape`, `output_kernel_shape` (the output
transform's ConvTranspose kernel), `block_shape`, `crop`)
describe the layout the body uses at the layer's input size, and `points` the interpolation points
U was made with. Overloads: "" (plain), "bias" (B [C_out] added), "crop" (the tile grid overhangs
the output: sliced to `crop` = [H_out, W_out]), "bias_crop", and each of them with "grouped" (the
products as a grouped 1x1 Conv, below; attributes `image_shape`, `weight_shape`, `groups`; with a
bias, B is that Conv's bias at the products of tile position (i, i) of interpolation point 1,
`bias_pads` zeros before and after it, instead of an Add over the output: see `point_one`).

Body, as measured fastest in onnxruntime (what won and lost is in DESIGN.md): channels become the
batch (Reshape [N*C, 1, H, W]), the input transform is one stride-m Conv with kernel K (onnxruntime
runs it in its blocked layout), Reshape [N, C, a*a, P] and a Transpose to [N, a*a, C, P] (innermost
axis kept), the products one batched MatMul with U as the constant *left* operand (or, "grouped", one 1x1 Conv
with a*a groups on the transformed input seen as an image [N, a*a*C_in, P, 1], U reshaped to
[a*a*C_out, C_in, 1, 1] at load: onnxruntime prepacks a Conv's constant weight, and on an AMD EPYC
VM a 512-channel layer at 28x28 ran 1.92x faster than direct this way against 1.60x with the
MatMul; at 14x14 slower, 1.03x against 1.22x, so the pass times both), and the output
transform one ConvTranspose: the products seen as an image [N, a*a, C_out*T_h, T_w], a kernel
A^T [a*a, 1, m, m] (folded at load) and stride m write each tile's m x m outputs in place, so its one
output channel [N, 1, C_out*T_h*m, T_w*m] is already Y [N, C_out, T_h*m, T_w*m] row by row. On the
output stage alone it ran 1.16-1.71x faster (two runs) than the MatMul by A plus DepthToSpace(m, DCR) it replaced,
with bit-identical results (`python benchmarks/winograd.py --part stage`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

DOMAIN = "ai.onnxcomp"
OP = "WinogradConv"
DOMAIN_VERSION = 1
MIN_OPSET = 13  # Constant(value_ints) and the opset-13 forms of Reshape/Slice in the body
_INTS = onnx.AttributeProto.INTS
_LAYOUT_ATTRS = ("grid_pads", "tile_strides", "tile_shape", "grid_shape", "output_kernel_shape", "block_shape")
_GROUPED_ATTRS = ("image_shape", "weight_shape", "groups")


def overload(bias: bool, crop: bool, grouped: bool = False) -> str:
    return "_".join(k for k, on in (("bias", bias), ("crop", crop), ("grouped", grouped)) if on)


def _ref(name: str, ref: str, kind: int) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, kind
    return a


def function(opset: int, *, bias: bool, crop: bool, grouped: bool = False) -> onnx.FunctionProto:
    """The body of one overload, importing the default domain at `opset` (the model's: a function
    importing another version than its model fails onnx's checker)."""
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], outputs: list[str], refs: tuple = (), **attrs) -> None:
        node = helper.make_node(op, inputs, outputs, **attrs)
        node.attribute.extend(refs)
        nodes.append(node)

    add("Constant", [], ["channels_as_batch"], value_ints=[-1, 1, 0, 0])
    add("Reshape", ["X", "channels_as_batch"], ["x_planes"])
    add("Conv", ["x_planes", "K"], ["v_grid"], (_ref("pads", "grid_pads", _INTS), _ref("strides", "tile_strides", _INTS)))
    add("Constant", [], ["tile_shape"], (_ref("value_ints", "tile_shape", _INTS),))
    add("Reshape", ["v_grid", "tile_shape"], ["v_tiles"])
    add("Transpose", ["v_tiles"], ["v"], perm=[0, 2, 1, 3])
    fused_bias = bias and grouped
    if grouped:
        add("Constant", [], ["image_shape"], (_ref("value_ints", "image_shape", _INTS),))
        add("Reshape", ["v", "image_shape"], ["v_image"])
        add("Constant", [], ["weight_shape"], (_ref("value_ints", "weight_shape", _INTS),))
        add("Reshape", ["U", "weight_shape"], ["u_kernels"])
        conv_inputs = ["v_image", "u_kernels"]
        if fused_bias:  # B at the products of the point-1 tile position, zero elsewhere (folded at load)
            add("Constant", [], ["bias_pads"], (_ref("value_ints", "bias_pads", _INTS),))
            add("Pad", ["B", "bias_pads"], ["products_bias"])
            conv_inputs.append("products_bias")
        add("Conv", conv_inputs, ["products"], (_ref("group", "groups", onnx.AttributeProto.INT),),
            kernel_shape=[1, 1])
    else:
        add("MatMul", ["U", "v"], ["products"])
    add("Constant", [], ["grid_shape"], (_ref("value_ints", "grid_shape", _INTS),))
    add("Reshape", ["products", "grid_shape"], ["products_grid"])
    add("Transpose", ["A"], ["a_t"], perm=[1, 0])
    # one Constant, not [-1, 1] ++ tile_strides by Concat: onnx's shape inference cannot follow a
    # Concat of Constants below opset 15, and the MAC count of the body needs the kernel's shape
    add("Constant", [], ["output_kernel_shape"], (_ref("value_ints", "output_kernel_shape", _INTS),))
    add("Reshape", ["a_t", "output_kernel_shape"], ["out_kernel"])
    add("ConvTranspose", ["products_grid", "out_kernel"], ["y_rows"], (_ref("strides", "tile_strides", _INTS),))
    add("Constant", [], ["block_shape"], (_ref("value_ints", "block_shape", _INTS),))
    y = "Y" if not ((bias and not fused_bias) or crop) else "y_grid"
    add("Reshape", ["y_rows", "block_shape"], [y])
    if crop:
        out = "Y" if not bias or fused_bias else "y_cropped"
        add("Constant", [], ["crop_starts"], value_ints=[0, 0])
        add("Constant", [], ["crop_ends"], (_ref("value_ints", "crop", _INTS),))
        add("Constant", [], ["crop_axes"], value_ints=[2, 3])
        add("Slice", [y, "crop_starts", "crop_ends", "crop_axes"], [out])
        y = out
    inputs = ["X", "U", "K", "A"]
    if bias:
        inputs.append("B")
    if bias and not fused_bias:
        add("Constant", [], ["bias_shape"], value_ints=[-1, 1, 1])
        add("Reshape", ["B", "bias_shape"], ["bias_planes"])
        add("Add", [y, "bias_planes"], ["Y"])
    attributes = (["tile", "pads", "points", *_LAYOUT_ATTRS] + (["crop"] if crop else [])
                  + (list(_GROUPED_ATTRS) if grouped else []) + (["bias_pads"] if fused_bias else []))
    fn = helper.make_function(DOMAIN, OP, inputs, ["Y"], nodes, [helper.make_opsetid("", opset)],
                              attributes=attributes,
                              doc_string="3x3 stride-1 convolution by Winograd F(m x m, 3 x 3) on pre-transformed weights")
    fn.overload = overload(bias, crop, grouped)
    return fn


@dataclass(frozen=True)
class Geometry:
    """One layer's tile grid: input [*, C_in, H, W], explicit conv `pads` [top, left, bottom, right]."""

    m: int
    c_in: int
    c_out: int
    height: int
    width: int
    pads: tuple[int, int, int, int]

    @property
    def alpha(self) -> int:
        return self.m + 2

    @property
    def out_hw(self) -> tuple[int, int]:
        t, left, b, r = self.pads
        return self.height + t + b - 2, self.width + left + r - 2

    @property
    def tiles_hw(self) -> tuple[int, int]:
        ho, wo = self.out_hw
        return -(-ho // self.m), -(-wo // self.m)

    @property
    def tiles(self) -> int:
        th, tw = self.tiles_hw
        return th * tw

    @property
    def crop(self) -> bool:
        th, tw = self.tiles_hw
        return (th * self.m, tw * self.m) != self.out_hw

    def attributes(self, points: list[float], grouped: bool = False, bias: bool = False) -> dict:
        """The call's attributes for this grid (`grouped`: with the grouped-Conv products' shapes, and
        with `bias` where the products' bias goes, `bias_pads`). ValueError when `grouped` and `bias`
        and 1 is not among `points`."""
        ho, wo = self.out_hw
        th, tw = self.tiles_hw
        t, left, b, r = self.pads
        a2 = self.alpha**2
        out = {"tile": self.m, "pads": list(self.pads), "points": [float(p) for p in points],
               "grid_pads": [t, left, b + th * self.m - ho, r + tw * self.m - wo],
               "tile_strides": [self.m, self.m], "tile_shape": [-1, self.c_in, a2, th * tw],
               "grid_shape": [-1, a2, self.c_out * th, tw], "output_kernel_shape": [a2, 1, self.m, self.m],
               "block_shape": [-1, self.c_out, th * self.m, tw * self.m]}
        if self.crop:
            out["crop"] = [ho, wo]
        if grouped:
            out.update({"image_shape": [-1, a2 * self.c_in, th * tw, 1], "weight_shape": [a2 * self.c_out, self.c_in, 1, 1],
                        "groups": a2})
            if bias:
                k = (self.alpha + 1) * point_one(points)
                out["bias_pads"] = [k * self.c_out, (a2 - 1 - k) * self.c_out]
        return out


def call(inputs: list[str], output: str, name: str, geometry: Geometry, points: list[float], bias: bool,
         grouped: bool = False) -> onnx.NodeProto:
    """The WinogradConv node for one layer (inputs X, U, K, A[, B]); `grouped`: products by grouped Conv."""
    node = helper.make_node(OP, inputs, [output], name=name, domain=DOMAIN, **geometry.attributes(points, grouped, bias))
    node.overload = overload(bias, geometry.crop, grouped)
    return node


def point_one(points: list[float]) -> int:
    """The tile row/column of interpolation point 1. The output transform's column there is all ones
    (the output polynomial's powers at 1), so a value c added to the products at tile position
    (i, i) adds c to every output of the tile: the bias rides on the products' Conv instead of a
    separate Add over the output. ValueError without point 1."""
    for i, p in enumerate(points):
        if p == 1.0:
            return i
    raise ValueError(f"interpolation points {points} lack 1: the bias cannot ride on the products")


def is_call(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == OP
