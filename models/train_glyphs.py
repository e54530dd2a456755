"""Train the reference glyph CNNs on CPU and export them to ONNX, with their model cards.

Needs the ``train`` extra (PyTorch) next to onnx and onnxruntime; the data comes from
``onnxcomp.evaldata`` (fonts bundled with matplotlib: the ``eval`` extra). Example:

    python models/train_glyphs.py --arch resnet --out models/glyph_resnet.onnx
    python models/train_glyphs.py --arch mobilenetv2 --out models/glyph_mobilenetv2.onnx

The script writes ``<out>.onnx`` (BatchNormalization kept, dynamic batch, opset 13) and the card
``<out>.md``; the card's figures are measured in onnxruntime on the exported file, and the run fails
if onnxruntime and PyTorch disagree on the accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxcomp import evaldata  # noqa: E402

OPSET = 13
# Subsets that tests/test_models.py re-measures (prefixes of the test splits).
TEST_SUBSET = {"all": 62 * 20, "digits": 10 * 50}


# ----------------------------------------------------------------------------------------------
# architectures


class BasicBlock(nn.Module):
    """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus identity or 1x1 conv-BN projection."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class GlyphResNet(nn.Module):
    """ResNet-style: stem 3x3 conv (32 @ 32x32), stages of 2 basic blocks at 32 / 64 / 128 channels
    on 16x16 / 8x8 / 4x4 maps (the first block of each stage strides by 2), global pool, linear."""

    def __init__(self, num_classes: int = 62, widths=(32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for w in widths:
            blocks += [BasicBlock(cin, w, 2), BasicBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6 (if t > 1), 3x3 depthwise-BN-ReLU6, 1x1 project-BN,
    identity residual when shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
        layers += [nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
                   nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


# (expansion t, out channels c, repeats n, first stride s), as in the MobileNetV2 paper's table
MBV2_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 3, 2), (6, 96, 1, 1))


class GlyphMobileNetV2(nn.Module):
    """MobileNetV2-style: stem 3x3 conv (32 @ 32x32); inverted residuals (t = expansion, c = out
    channels, n = blocks, s = first stride) t1-c16-n1-s1, t6-c24-n2-s2, t6-c32-n3-s2, t6-c64-n3-s2,
    t6-c96-n1-s1 (maps 32x32 -> 16 -> 8 -> 4); 1x1 head conv to 384; global pool, linear. ReLU6."""

    def __init__(self, num_classes: int = 62, head: int = 384):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for t, c, n, s in MBV2_CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


ARCHS = {"resnet": GlyphResNet, "mobilenetv2": GlyphMobileNetV2}


# ----------------------------------------------------------------------------------------------
# training and evaluation


def predict_torch(net: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(net(torch.from_numpy(x[i:i + batch])).numpy())
    return np.concatenate(out)


def predict_onnx(path: Path, x: np.ndarray, batch: int = 512) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def train(args) -> dict:
    torch.manual_seed(args.seed)
    t0 = time.time()
    x, y = evaldata.glyph_dataset("train", "all", 32, args.n_train, args.data_seed)
    t_data = time.time() - t0
    print(f"train data: {x.shape} in {t_data:.1f}s", file=sys.stderr)
    net = ARCHS[args.arch]().to(memory_format=torch.channels_last)  # NHWC: 1.5-2.5x faster on CPU
    steps_per_epoch = len(x) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.25)
    gen = torch.Generator().manual_seed(args.seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t1 = time.time()
    step, run_loss, run_acc = 0, 0.0, 0.0
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            logits = net(xt[idx].contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            batch_acc = (logits.argmax(1) == yt[idx]).float().mean().item()
            run_loss = 0.98 * run_loss + 0.02 * loss.item() if step > 1 else loss.item()
            run_acc = 0.98 * run_acc + 0.02 * batch_acc if step > 1 else batch_acc
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}/{total} loss {run_loss:.3f} acc~{100 * run_acc:.1f} "
                      f"{time.time() - t1:.0f}s", file=sys.stderr)
    t_train = time.time() - t1
    net = net.to(memory_format=torch.contiguous_format).eval()
    return {"net": net, "train_seconds": t_train, "data_seconds": t_data, "steps": total}


def export(net: nn.Module, out: Path) -> None:
    import onnx

    net.eval()
    dummy = torch.zeros(1, 1, 32, 32)
    # TrainingMode.PRESERVE on an eval-mode module exports inference BatchNormalization nodes and skips
    # the EVAL-mode peephole that would fold them into the convolutions (onnxcomp's normalize does that).
    torch.onnx.export(net, (dummy,), str(out), dynamo=False, opset_version=OPSET, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    n_bn_torch = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    if n_bn != n_bn_torch:
        raise SystemExit(f"export folded BatchNorm: {n_bn} BatchNormalization nodes, {n_bn_torch} in torch")


def _confusions(logits: np.ndarray, y: np.ndarray, top: int = 8) -> list[tuple[str, str, int]]:
    """Most frequent (true glyph, predicted glyph, count) errors."""
    pred = logits.argmax(1)
    pairs: dict[tuple[int, int], int] = {}
    for t, p in zip(y[pred != y].tolist(), pred[pred != y].tolist(), strict=True):
        pairs[(t, p)] = pairs.get((t, p), 0) + 1
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [(evaldata.GLYPH_CLASSES[t], evaldata.GLYPH_CLASSES[p], c) for (t, p), c in ranked]


def evaluate(net: nn.Module, out: Path) -> dict:
    import onnx

    from onnxcomp.analysis import count_params, total_macs

    figures: dict = {}
    for task in ("all", "digits"):
        x, y = evaldata.glyph_dataset("test", task, 32)
        lt, lo = predict_torch(net, x), predict_onnx(out, x)
        acc_t, acc_o = evaldata.accuracy(lt, y), evaldata.accuracy(lo, y)
        agree = float(100 * np.mean(lt.argmax(1) == lo.argmax(1)))
        print(f"test[{task}] n={len(y)}: torch {acc_t:.2f}  onnxruntime {acc_o:.2f}  agreement {agree:.2f}",
              file=sys.stderr)
        if abs(acc_t - acc_o) > 1e-9:
            raise SystemExit(f"onnxruntime accuracy {acc_o} differs from torch {acc_t} on test[{task}]")
        k = TEST_SUBSET[task]
        figures[task] = {"n": len(y), "accuracy": round(acc_o, 2),
                         "subset_n": k, "subset_accuracy": round(evaldata.accuracy(lo[:k], y[:k]), 2),
                         "max_abs_logit_diff": float(np.abs(lt - lo).max()),
                         "confusions": _confusions(lo, y)}
        x, y = evaldata.glyph_dataset("calib", task, 32)
        figures[task]["calib_n"] = len(y)
        figures[task]["calib_accuracy"] = round(evaldata.accuracy(predict_onnx(out, x), y), 2)
    model = onnx.load(str(out))
    figures["params"] = count_params(model)
    figures["macs"] = total_macs(model, {"input": [1, 1, 32, 32]})
    figures["bytes"] = out.stat().st_size
    figures["opset"] = OPSET
    figures["nodes"] = {op: sum(n.op_type == op for n in model.graph.node)
                        for op in sorted({n.op_type for n in model.graph.node})}
    return figures


def write_card(args, out: Path, result: dict, fig: dict) -> Path:
    card = out.with_suffix(".md")
    name = out.stem
    arch_doc = " ".join((ARCHS[args.arch].__doc__ or "").split())
    cmd = (f"python models/train_glyphs.py --arch {args.arch} --out models/{out.name} --epochs {args.epochs} "
           f"--n-train {args.n_train} --batch-size {args.batch_size} --lr {args.lr} --wd {args.wd} "
           f"--seed {args.seed} --data-seed {args.data_seed}")
    a, d = fig["all"], fig["digits"]
    meta = {"model": out.name, "input": "input", "input_shape": [None, 1, 32, 32], "output": "logits",
            "classes": evaldata.GLYPH_CLASSES, "data_seed": args.data_seed,
            "test_all_n": a["n"], "test_all_accuracy": a["accuracy"],
            "test_all_subset_n": a["subset_n"], "test_all_subset_accuracy": a["subset_accuracy"],
            "test_digits_n": d["n"], "test_digits_accuracy": d["accuracy"],
            "test_digits_subset_n": d["subset_n"], "test_digits_subset_accuracy": d["subset_accuracy"],
            "params": fig["params"], "macs": fig["macs"], "bytes": fig["bytes"], "opset": fig["opset"]}
    ops = ", ".join(f"{k} {v}" for k, v in fig["nodes"].items())
    conf = ", ".join(f"{t} -> {p}: {c}" for t, p, c in a["confusions"]) or "none"
    text = f"""# {name}

{arch_doc}

| | |
|---|---|
| file | `models/{out.name}` ({fig['bytes']:,} bytes, opset {fig['opset']}, dynamic batch) |
| input | `input` float32 [N, 1, 32, 32], white glyph on dark background, values in [0, 1] |
| output | `logits` float32 [N, 62], class k = `"{evaldata.GLYPH_CLASSES}"[k]` |
| parameters | {fig['params']:,} (all initializers, BatchNorm statistics included) |
| MACs | {fig['macs']:,} per image (onnxcomp.analysis, Conv + Gemm) |
| graph | {ops} |
| BatchNorm | kept as BatchNormalization nodes (not folded): onnxcomp's `normalize` pass folds them |

The file is the plain `torch.onnx.export` (TorchScript exporter, `dynamo=False`,
`training=TrainingMode.PRESERVE` on the eval-mode module so that BatchNorm is not folded). Identity
nodes, if any, are the exporter's de-duplication of initializers with equal values (e.g. the biases
of the two BatchNorms summed in a residual block, which receive identical updates in training).

## Data

`onnxcomp.evaldata.glyph_dataset` (deterministic, no download): the 62 glyphs 0-9A-Za-z rendered
from the 19 fonts bundled with matplotlib (DejaVu Sans / Sans Mono / Serif with bold and italic
faces, STIX General x4, Computer Modern cmr/cmb/cmss/cmtt/cmti) on a fixed baseline and cap
height, with a random rotation (+-10 deg), scale (0.85-1.12), aspect (0.9-1.1), shear (+-0.15),
shift (+-2 px), contrast and pixel noise. Train, calibration and test splits are independent random
streams over the same fonts, so the test measures generalisation to new renderings, not to unseen
typefaces. Some classes are ambiguous by nature at glyph level (o/O/0, l/I/1, c/C, s/S, v/V, w/W,
x/X, z/Z differ only by size), which caps the reachable accuracy below 100%.

- train: `glyph_dataset("train", "all", n={args.n_train}, seed={args.data_seed})`
- calib: `glyph_dataset("calib", "all")` ({a['calib_n']} images, 8 per class) and
  `glyph_dataset("calib", "digits")` ({d['calib_n']} images)
- test: `glyph_dataset("test", "all")` ({a['n']} images, 100 per class) and
  `glyph_dataset("test", "digits")` ({d['n']} images)

**Specialized task (digits)**: images of the 10 digit classes only; the 62-class model is scored by
argmax over all 62 logits (a digit image predicted as the letter O counts as an error). Value-locality
trimming calibrates on `calib/digits` and is judged on `test/digits`.

## Accuracy (onnxruntime, top-1, this file)

| split | images | accuracy |
|---|---|---|
| test, all 62 classes | {a['n']} | **{a['accuracy']:.2f}%** |
| test, first {a['subset_n']} (tests/test_models.py) | {a['subset_n']} | {a['subset_accuracy']:.2f}% |
| test, digits only (specialized) | {d['n']} | **{d['accuracy']:.2f}%** |
| test, digits, first {d['subset_n']} (tests/test_models.py) | {d['subset_n']} | {d['subset_accuracy']:.2f}% |
| calib, all | {a['calib_n']} | {a['calib_accuracy']:.2f}% |
| calib, digits | {d['calib_n']} | {d['calib_accuracy']:.2f}% |

PyTorch and onnxruntime give the same accuracy on both test splits (largest logit difference
{max(a['max_abs_logit_diff'], d['max_abs_logit_diff']):.1e}). Most frequent errors on the full test
split (true -> predicted: count): {conf}.

## Training recipe

SGD (momentum 0.9, Nesterov), weight decay {args.wd}, one-cycle learning rate peaking at {args.lr}
(25% warm-up), batch {args.batch_size}, {args.epochs} epochs over {args.n_train} images
({result['steps']} steps), plain cross-entropy, no augmentation beyond the rendered one. CPU, one
thread (`torch.set_num_threads(1)`, on a 2-core machine shared with other jobs):
{result['train_seconds']:.0f} s of training after {result['data_seconds']:.0f} s of data generation. torch {torch.__version__}, Python
{platform.python_version()}, seeds: torch {args.seed}, data {args.data_seed}.

Reproduce (from the repository root, with the `train` and `eval` extras installed):

```
{cmd}
```

Same data bytes on any machine; the trained weights are reproducible on the same CPU and torch
build, and may differ in the last bits elsewhere.

```json
{json.dumps(meta, indent=1)}
```
"""
    card.write_text(text)
    return card


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--out", type=Path, required=True, help="output .onnx (the card goes next to it as .md)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=62 * 600)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = train(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(result["net"], args.out)
    fig = evaluate(result["net"], args.out)
    card = write_card(args, args.out, result, fig)
    print(json.dumps({k: v for k, v in fig.items() if k != "nodes"}, indent=1))
    print(f"wrote {args.out} and {card}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
