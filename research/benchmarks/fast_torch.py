"""Our fast CNN (research.models.fast) as arrays and rebuilt in PyTorch layer by layer, for
the benchmarks that run a PyTorch reference on the same network (explain_vs_gradcam,
explain_vs_quantus). No flags and no TensorFlow import here: `torch_network` runs in the
reference's venv (torch only), `network_arrays` in ours."""

from __future__ import annotations

import numpy as np


def network_arrays(model) -> dict:
    """Every weight the reference needs, by our layer names, in Keras layouts."""
    out = {}
    norm = model.get_layer("normalize")
    out["norm_mean"] = np.asarray(norm.mean).reshape(-1)
    out["norm_var"] = np.asarray(norm.variance).reshape(-1)
    w = model.get_layer("whiten")
    out["whiten_kernel"], out["whiten_bias"] = np.asarray(w.kernel), np.asarray(w.bias)
    groups = sorted({x.name.split("_")[0] for x in model.layers if x.name.startswith("group")})
    out["groups"] = np.array(len(groups))
    for g in groups:
        for i in (1, 2):
            out[f"{g}_conv{i}"] = np.asarray(model.get_layer(f"{g}_conv{i}").kernel)
            bn = model.get_layer(f"{g}_{i}_bn")
            gamma = getattr(bn, "gamma", None)
            out[f"{g}_bn{i}_gamma"] = (np.ones(bn.beta.shape, np.float32) if gamma is None
                                       else np.asarray(gamma))
            for k in ("beta", "moving_mean", "moving_variance"):
                out[f"{g}_bn{i}_{k}"] = np.asarray(getattr(bn, k))
            out["bn_epsilon"] = np.array(bn.epsilon)
    out["scale"] = np.array(float(model.get_layer("feature_scale").scale))
    head = model.get_layer("logits")
    out["head_kernel"] = np.asarray(head.kernel)
    out["head_bias"] = (np.zeros(head.kernel.shape[1], np.float32) if head.bias is None
                        else np.asarray(head.bias))
    return out


def torch_network(a: dict):
    import torch
    from torch import nn

    def conv_weight(k):  # HWIO -> OIHW
        return torch.from_numpy(np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1))))

    class Group(nn.Module):
        def __init__(self, g):
            super().__init__()
            k1, k2 = a[f"{g}_conv1"], a[f"{g}_conv2"]
            self.conv1 = nn.Conv2d(k1.shape[2], k1.shape[3], 3, padding=1, bias=False)
            self.pool = nn.MaxPool2d(2)
            self.norm1 = nn.BatchNorm2d(k1.shape[3], eps=float(a["bn_epsilon"]))
            self.act1 = nn.GELU()
            self.conv2 = nn.Conv2d(k2.shape[2], k2.shape[3], 3, padding=1, bias=False)
            self.norm2 = nn.BatchNorm2d(k2.shape[3], eps=float(a["bn_epsilon"]))
            self.act2 = nn.GELU()
            with torch.no_grad():
                self.conv1.weight.copy_(conv_weight(k1))
                self.conv2.weight.copy_(conv_weight(k2))
                for i, norm in ((1, self.norm1), (2, self.norm2)):
                    norm.weight.copy_(torch.from_numpy(a[f"{g}_bn{i}_gamma"]))
                    norm.bias.copy_(torch.from_numpy(a[f"{g}_bn{i}_beta"]))
                    norm.running_mean.copy_(torch.from_numpy(a[f"{g}_bn{i}_moving_mean"]))
                    norm.running_var.copy_(torch.from_numpy(a[f"{g}_bn{i}_moving_variance"]))

        def forward(self, x):
            x = self.act1(self.norm1(self.pool(self.conv1(x))))
            return self.act2(self.norm2(self.conv2(x)))

    class Net(nn.Module):
        """Input: NCHW images in [0, 1] (as our preprocess_fn('unit') gives ours)."""
        def __init__(self):
            super().__init__()
            k = a["whiten_kernel"]
            self.register_buffer("mean", torch.from_numpy(a["norm_mean"]).view(1, -1, 1, 1))
            self.register_buffer("std", torch.from_numpy(np.sqrt(a["norm_var"])).view(
                1, -1, 1, 1))
            self.whiten = nn.Conv2d(k.shape[2], k.shape[3], k.shape[0], bias=True)
            self.act = nn.GELU()
            self.groups = nn.Sequential(*[Group(f"group{i}") for i in range(int(a["groups"]))])
            self.head = nn.Linear(*a["head_kernel"].shape)
            with torch.no_grad():
                self.whiten.weight.copy_(conv_weight(k))
                self.whiten.bias.copy_(torch.from_numpy(a["whiten_bias"]))
                self.head.weight.copy_(torch.from_numpy(a["head_kernel"].T.copy()))
                self.head.bias.copy_(torch.from_numpy(a["head_bias"]))

        def forward(self, x):
            x = self.groups(self.act(self.whiten((x - self.mean) / self.std)))
            return self.head(torch.amax(x, dim=(2, 3)) * float(a["scale"]))

    return Net().eval()
