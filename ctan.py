"""Cross-Task Attention Network (CTAN; Kim, Purdie, McIntosh, MICCAI 2023 Workshops, arXiv 2309.03837) and baselines.

We lack the paper's full text (we have its abstract and summaries): each module says whether a choice is **from
the paper** (or the baseline's paper) or **ours**, and each choice of ours is an argument. Networks map x (B, C, *S),
2D or 3D, to {task: output}: (B, n_out, *S) for pixel-level tasks, (B, n_out) for image-level ones. Torch only.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ARCHS = ("stl", "hps", "mtan", "ctan", "mfe")
TASK_KINDS = ("pixel", "image")


# Dimension-generic layers --------------------------------------------------------------------------------------------
def conv(dims, cin, cout, k=3, stride=1, dilation=1, bias=False):
    """A 2D or 3D convolution with 'same' padding for odd kernels."""
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, cout, k, stride, dilation * (k // 2), dilation, bias=bias)


def norm(dims, channels, kind="batch"):
    """Batch norm as in ResNet (from ResNet); group and instance norm are our options for small 3D batches."""
    layers = {"batch": lambda: (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels),
              "group": lambda: nn.GroupNorm(math.gcd(32, channels), channels),
              "instance": lambda: (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)}
    if kind not in layers:
        raise ValueError(f"norm must be one of {tuple(layers)}, got {kind!r}")
    return layers[kind]()


def conv_norm(dims, cin, cout, k=3, stride=1, norm_kind="batch", act=True, dilation=1):
    """conv -> norm (-> ReLU), as a list of layers to splice into an ``nn.Sequential``."""
    return [conv(dims, cin, cout, k, stride, dilation), norm(dims, cout, norm_kind)] + [nn.ReLU(inplace=True)] * act


def blocks(x, factor):
    """(B, C, *S) -> (B, C, S_1 / factor, factor, S_2 / factor, factor, ...): a view of x cut into blocks."""
    return x.reshape(*x.shape[:2], *[v for n in x.shape[2:] for v in (n // factor, factor)])


def avg_pool(x, factor):
    """Average-pool every spatial axis by ``factor`` (ceil mode), 2D or 3D."""
    return x if factor == 1 else (F.avg_pool2d if x.dim() == 4 else F.avg_pool3d)(x, factor, factor, ceil_mode=True)


def add_upsampled(x, y, factor):
    """x + y upsampled by ``factor`` (nearest: y's value at each of x's blocks, the edge blocks cut to x's size);
    where the factor divides the size, y is broadcast over x's blocks instead of materialising the upsampled map."""
    if any(n % factor for n in x.shape[2:]):
        return x + F.interpolate(y, scale_factor=factor, mode="nearest")[(..., *[slice(n) for n in x.shape[2:]])]
    return (blocks(x, factor) + blocks(y, 1)).reshape(x.shape)


# Residual blocks and the shared encoder (ResNet; He et al. 2016) -----------------------------------------------------
class ResidualBlock(nn.Module):
    """ReLU(body(x) + shortcut(x)); the shortcut is a strided 1x1 conv + norm where the shape changes (from ResNet)."""

    def __init__(self, dims, cin, cout, stride, norm_kind, body):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(*conv_norm(dims, cin, cout, 1, stride, norm_kind, act=False)))

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu_()


class BasicBlock(ResidualBlock):
    """ResNet-18/34 block: two 3x3 convolutions (from ResNet)."""
    expansion = 1

    def __init__(self, dims, cin, cout, stride=1, norm_kind="batch"):
        super().__init__(dims, cin, cout, stride, norm_kind, conv_norm(dims, cin, cout, 3, stride, norm_kind) +
                         conv_norm(dims, cout, cout, 3, 1, norm_kind, act=False))


class Bottleneck(ResidualBlock):
    """ResNet-50 block: 1x1 reduce to cout/4, 3x3 (with the stride, as torchvision's v1.5), 1x1 expand (ResNet)."""
    expansion = 4

    def __init__(self, dims, cin, cout, stride=1, norm_kind="batch"):
        mid = max(1, cout // 4)
        super().__init__(dims, cin, cout, stride, norm_kind, conv_norm(dims, cin, mid, 1, 1, norm_kind) +
                         conv_norm(dims, mid, mid, 3, stride, norm_kind) +
                         conv_norm(dims, mid, cout, 1, 1, norm_kind, act=False))


class ResNetEncoder(nn.Module):
    """Shared encoder (ours, after the follow-up paper's ResNet-50): 7x7 stride-2 stem, max-pool, four stages of
    ``depth[s]`` blocks (width * 2**s * expansion channels). Returns [stem, stage1 .. stage4] at /2, /4 .. /32.
    ``block="basic"`` gives ResNet-34; ``checkpointing`` recomputes stages in the backward pass (3D memory)."""

    def __init__(self, dims, in_channels, width=64, depth=(3, 4, 6, 3), block="bottleneck", norm_kind="batch",
                 checkpointing=False):
        super().__init__()
        block_cls, self.checkpointing = {"bottleneck": Bottleneck, "basic": BasicBlock}.get(block), checkpointing
        if block_cls is None:
            raise ValueError(f"block must be 'bottleneck' or 'basic', got {block!r}")
        self.stem = nn.Sequential(*conv_norm(dims, in_channels, width, 7, 2, norm_kind))
        self.pool = (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(3, stride=2, padding=1)
        self.channels = [width] + [width * 2 ** s * block_cls.expansion for s in range(len(depth))]
        self.stages = nn.ModuleList(
            nn.Sequential(*[block_cls(dims, self.channels[s] if i == 0 else cout, cout, 2 if s > 0 and i == 0 else 1,
                                      norm_kind) for i in range(n)])
            for s, (n, cout) in enumerate(zip(depth, self.channels[1:])))

    def run(self, fn, *args):
        """fn(*args), recomputed in the backward pass when checkpointing is on."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x):
        feats = [self.stem(x)]
        x = self.pool(feats[0])
        for stage in self.stages:
            x = self.run(stage, x)
            feats.append(x)
        return feats


# Task heads ----------------------------------------------------------------------------------------------------------
class PixelDecoder(nn.Module):
    """Pixel-level head: a U-Net decoder with skips back to the input size (one per pixel-level task as in the
    paper; its form is ours). The output conv runs in fp32 under autocast: a bf16 dose loses ~0.04 Gy."""

    def __init__(self, dims, channels, n_out, norm_kind="batch"):
        super().__init__()
        widths = [max(8, channels[0] * 4 // 2 ** i) for i in range(len(channels))]  # 4w, 2w, w, w/2, w/4; >= 8
        cins = [c + skip for c, skip in zip([channels[-1]] + widths[:-1], [*channels[-2::-1], 0])]
        self.blocks = nn.ModuleList(  # U-Net up-steps: upsample x2, concatenate the skip, two 3x3 conv-norm-ReLU
            nn.Sequential(*conv_norm(dims, cin, cout, 3, 1, norm_kind), *conv_norm(dims, cout, cout, 3, 1, norm_kind))
            for cin, cout in zip(cins, widths))  # the last one, /2 -> full size, has no skip
        self.out = conv(dims, widths[-1], n_out, 1, bias=True)

    def forward(self, feats, size):
        x = feats[-1]
        for block, skip in zip(self.blocks, [*feats[-2::-1], None]):
            x = F.interpolate(x, size=size if skip is None else skip.shape[2:], mode="nearest")
            x = block(x if skip is None else torch.cat([x, skip], 1))
        with fp32(x):
            return self.out(x.float())


class ImageClassifier(nn.Module):
    """Image-level head (ours; the paper's is unpublished): average pooling of encoder ``levels``, then an MLP."""

    def __init__(self, channels, n_out, levels=(-1,), hidden=256, dropout=0.2):
        super().__init__()
        self.levels = tuple(levels)
        self.mlp = nn.Sequential(nn.Linear(sum(channels[i] for i in self.levels), hidden),
                                 nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def forward(self, feats, size=None):
        x = torch.cat([feats[i].flatten(2).mean(2) for i in self.levels], 1)
        with fp32(x):  # tiny; bf16 logits would tie scores and so AUCs
            return self.mlp(x.float())


def make_head(dims, kind, channels, n_out, norm_kind="batch", classifier_levels=(-1,), hidden=256):
    """One head per task: a decoder for pixel-level tasks, a classifier for image-level ones."""
    return (PixelDecoder(dims, channels, n_out, norm_kind) if kind == "pixel" else
            ImageClassifier(channels, n_out, classifier_levels, hidden))


# Attention: MTAN's task masks (Liu, Johns, Davison, CVPR 2019) and CTAN's cross-task attention -----------------------
class TaskAttention(nn.Module):
    """MTAN's soft mask for one task and stage (from MTAN): a = sigmoid(BN(conv1x1(ReLU(BN(conv1x1([u_b ; a_prev]))))))
    * u_t; u_b: shared features before the stage's last block, u_t: its output, a_prev: the task's previous a."""

    def __init__(self, dims, cin, cout, norm_kind="batch"):
        super().__init__()
        mid = max(1, cout // 4)
        self.mask = nn.Sequential(*conv_norm(dims, cin, mid, 1, 1, norm_kind),
                                  *conv_norm(dims, mid, cout, 1, 1, norm_kind, act=False))

    def forward(self, u_b, u_t, a_prev=None):  # the sigmoid overwrites the norm's output, which its backward skips
        return self.mask(u_b if a_prev is None else torch.cat([u_b, a_prev], 1)).sigmoid_() * u_t


class CrossTaskAttention(nn.Module):
    """Cross-task attention at one stage (from the paper: a task's features give the queries, the other tasks' the
    keys and values): q = W_q^t LN_t(P f_t),  k, v = W_kv^s LN_s(P f_s) for all s != t,  f_t <- f_t + up(gamma_t
    W_o^t MHA(q, k, v)), for task t with features f_t (B, C, *S) and P an average pooling.
    Ours (arguments): ``heads``; inner width C / ``reduction``; P pools by powers of 2 to at most ``max_tokens``
    tokens (bounded cost in 3D); ``pool_queries=False``: one query per voxel, no P or up(); gamma_t starts at
    ``gate_init``. LN_t(P f_t) is computed once, for t's queries and the others' keys and values."""

    def __init__(self, channels, n_tasks, heads=4, reduction=4, max_tokens=512, gate_init=0.1, pool_queries=True):
        super().__init__()
        inner = max(heads, channels // reduction // heads * heads)
        self.heads, self.max_tokens, self.pool_queries = heads, max_tokens, pool_queries
        self.norm = nn.ModuleList(nn.LayerNorm(channels) for _ in range(n_tasks))
        self.q = nn.ModuleList(nn.Linear(channels, inner) for _ in range(n_tasks))
        self.kv = nn.ModuleList(nn.Linear(channels, 2 * inner) for _ in range(n_tasks))
        self.out = nn.ModuleList(nn.Linear(inner, channels) for _ in range(n_tasks))
        self.gate = nn.Parameter(torch.full((n_tasks,), float(gate_init)))

    def pool_factor(self, spatial):
        factor = 1
        while math.prod([-(-s // factor) for s in spatial]) > self.max_tokens:
            factor *= 2
        return factor

    def forward(self, feats):
        factor = self.pool_factor(feats[0].shape[2:])
        pooled = [avg_pool(f, factor) for f in feats]
        tokens = [ln(p.flatten(2).transpose(1, 2)) for ln, p in zip(self.norm, pooled)]  # (B, N, C)
        kvs = [kv(x).chunk(2, -1) for kv, x in zip(self.kv, tokens)]
        full = factor > 1 and not self.pool_queries
        out = []
        for t, f in enumerate(feats):
            q = self.q[t](self.norm[t](f.flatten(2).transpose(1, 2)) if full else tokens[t])
            k, v = ([kv[i] for s, kv in enumerate(kvs) if s != t] for i in (0, 1))
            k, v = (x[0] if len(x) == 1 else torch.cat(x, 1) for x in (k, v))
            a = F.scaled_dot_product_attention(*[x.unflatten(2, (self.heads, -1)).transpose(1, 2) for x in (q, k, v)])
            a = (self.gate[t] * self.out[t](a.transpose(1, 2).flatten(2))).transpose(1, 2)
            out.append(add_upsampled(f, a.reshape((f if full else pooled[t]).shape), 1 if full else factor))
        return out


# Networks: the common base, MTAN, CTAN, then the baselines STL and HPS -----------------------------------------------
class MultiTaskNet(nn.Module):
    """Base (ours): validates the tasks, builds the encoder (``encoder()``; one per task with ``per_task_encoders``)
    and a head per task. Subclasses define ``features(x) -> {task: [feature maps, shallow to deep]}``."""

    size_multiple = 32  # five stride-2 steps in the encoder
    default_encoder = ResNetEncoder  # ResNet-50

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, per_task_encoders=False,
                 classifier_levels=(-1,), classifier_hidden=256):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims!r}")
        if not tasks or any(len(spec) != 2 or spec[0] not in TASK_KINDS or int(spec[1]) < 1 for spec in tasks.values()):
            raise ValueError(f"tasks: expected {{name: (kind, n_out)}} with kind in {TASK_KINDS} and n_out >= 1, "
                             f"got {tasks!r}")
        self.tasks, self.in_channels, self.dims = dict(tasks), in_channels, dims
        build = encoder or (lambda: self.default_encoder(dims, in_channels))
        if per_task_encoders:
            self.encoders = nn.ModuleDict({name: build() for name in self.tasks})
        else:
            self.encoder = build()
        channels = (self.encoders[next(iter(self.tasks))] if per_task_encoders else self.encoder).channels
        self.heads = nn.ModuleDict({name: make_head(dims, kind, channels, n, norm_kind, classifier_levels,
                                                    classifier_hidden) for name, (kind, n) in self.tasks.items()})

    def check(self, x):
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, {', '.join('S' * self.dims)}) "
                             f"for this {self.dims}D model, got {tuple(x.shape)}")
        if any(s % self.size_multiple for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be a multiple of {self.size_multiple} "
                             "(the encoder halves it five times): crop or pad the input")

    def forward(self, x):
        self.check(x)
        return {name: self.heads[name](feats, x.shape[2:]) for name, feats in self.features(x).items()}


class MTAN(MultiTaskNet):
    """MTAN baseline (from MTAN, official ResNet version): a shared encoder, per task and stage a ``TaskAttention``
    mask; a_s passes a ``transition`` ("block", from MTAN: a strided residual block; "conv", ours: a strided 1x1
    conv-norm-ReLU, a quarter of the FLOPs) to feed the next mask. Task t's head reads [stem, a_1 .. a_4]."""

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, transition="block",
                 **head_options):
        if transition not in ("block", "conv"):
            raise ValueError(f"transition must be 'block' (official MTAN) or 'conv' (light), got {transition!r}")
        super().__init__(tasks, in_channels, dims, norm_kind, encoder, **head_options)
        if any(len(stage) < 2 for stage in self.encoder.stages):
            raise ValueError("mtan/ctan need depth >= 2 blocks in every stage (masks read the next-to-last one)")
        block_cls, ch = type(self.encoder.stages[0][0]), self.encoder.channels[1:]
        self.attention = nn.ModuleList(
            nn.ModuleList(TaskAttention(dims, c * (1 if s == 0 else 2), c, norm_kind) for _ in self.tasks)
            for s, c in enumerate(ch))
        step = (lambda cin, cout: block_cls(dims, cin, cout, 2, norm_kind) if transition == "block"
                else nn.Sequential(*conv_norm(dims, cin, cout, 1, 2, norm_kind)))
        self.transition = nn.ModuleList(nn.ModuleList(step(cin, cout) for _ in self.tasks)
                                        for cin, cout in zip(ch[:-1], ch[1:]))
        self.cross = nn.ModuleDict()  # {str(stage): module exchanging the tasks' a_s}: none in MTAN, see CTAN

    def features(self, x):
        enc = self.encoder
        stem = enc.stem(x)
        u, prev, attended = enc.pool(stem), [None] * len(self.tasks), []
        for s, stage in enumerate(enc.stages):
            u_b = enc.run(stage[:-1], u)
            u = enc.run(stage[-1], u_b)
            a = [att(u_b, u, p) for att, p in zip(self.attention[s], prev)]
            if str(s + 1) in self.cross:
                a = self.cross[str(s + 1)](a)
            attended.append(a)
            if s < len(self.transition):
                prev = [enc.run(f, a_t) for f, a_t in zip(self.transition[s], a)]
        return {name: [stem, *a] for name, a in zip(self.tasks, zip(*attended))}


class CTAN(MTAN):
    """Cross-Task Attention Network (from the paper): MTAN's task-specific features plus cross-task attention
    after the chosen stages (``CrossTaskAttention``); the exchanged features flow into the next stage, the skips
    and the heads. ``cross_stages`` (ours: all four; 4 is the bottleneck; () gives exactly MTAN with the same
    ``transition``). ``heads``, ``reduction``, ``max_tokens``, ``gate_init``, ``pool_queries``: see
    ``CrossTaskAttention``."""

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, transition="block",
                 cross_stages=(1, 2, 3, 4), heads=4, reduction=4, max_tokens=512, gate_init=0.1, pool_queries=True,
                 **head_options):
        if len(tasks) < 2:
            raise ValueError("ctan needs at least two tasks (cross-task attention has nothing to attend to)")
        super().__init__(tasks, in_channels, dims, norm_kind, encoder, transition, **head_options)
        n_stages = len(self.encoder.stages)
        if any(s not in range(1, n_stages + 1) for s in cross_stages):
            raise ValueError(f"cross_stages must be within 1..{n_stages}, got {tuple(cross_stages)}")
        self.cross.update({
            str(s): CrossTaskAttention(self.encoder.channels[s], len(self.tasks), heads, reduction, max_tokens,
                                       gate_init, pool_queries) for s in sorted(set(cross_stages))})


class STL(MultiTaskNet):
    """Single-task learning baseline (from the paper's comparison): one full encoder per task, nothing shared;
    tasks only meet in the summed loss."""

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, **head_options):
        super().__init__(tasks, in_channels, dims, norm_kind, encoder, per_task_encoders=True, **head_options)

    def features(self, x):
        return {name: enc(x) for name, enc in self.encoders.items()}


class HPS(MultiTaskNet):
    """Hard parameter sharing baseline (from the paper's comparison): one shared encoder, one head per task."""

    def features(self, x):
        feats = self.encoder(x)
        return {name: feats for name in self.tasks}


# MFE-UNet (Bui, Le, Bum, Choo, arXiv 2412.00351) ---------------------------------------------------------------------
def window_partition(x, window):
    """(B, C, *S) with S divisible by ``window`` -> (B * n_windows, window**dims, C) tokens, and the window grid."""
    b, c, *s = x.shape
    grid = [n // w for n, w in zip(s, window)]
    x = x.reshape(b, c, *[v for g, w in zip(grid, window) for v in (g, w)])
    d = len(s)  # axes: b, c, g1, w1, g2, w2, (g3, w3)
    x = x.permute(0, *[2 + 2 * i for i in range(d)], *[3 + 2 * i for i in range(d)], 1)
    return x.reshape(-1, math.prod(window), c), grid


def window_merge(tokens, grid, window, batch):
    """Inverse of ``window_partition``."""
    d, c = len(grid), tokens.shape[-1]
    x = tokens.reshape(batch, *grid, *window, c)
    x = x.permute(0, 2 * d + 1, *[v for i in range(d) for v in (1 + i, 1 + d + i)])
    return x.reshape(batch, c, *[g * w for g, w in zip(grid, window)])


class WindowTransformer(nn.Module):
    """Transformer branch of a ResFormer stage (from MFE-UNet: attention beside the convolutional stage, outputs
    summed): pre-norm multi-head self-attention in non-overlapping windows of ``window`` voxels per side (linear
    cost at the large stages; a map within one window gets global attention), then an MLP. Ours, to stay short:
    one block per stage, no shifted windows or relative position bias (the official code has two Swin blocks),
    and a strided 1x1 projection in place of patch merging to reach the stage's size and channels."""

    def __init__(self, dims, cin, cout, stride, heads=4, window=8, mlp_ratio=2):
        super().__init__()
        self.heads, self.window = heads, window
        self.proj = conv(dims, cin, cout, 1, stride, bias=True)
        self.norm1, self.norm2 = nn.LayerNorm(cout), nn.LayerNorm(cout)
        self.qkv, self.out = nn.Linear(cout, 3 * cout), nn.Linear(cout, cout)
        self.mlp = nn.Sequential(nn.Linear(cout, mlp_ratio * cout), nn.GELU(), nn.Linear(mlp_ratio * cout, cout))

    def forward(self, x):
        x = self.proj(x)
        b, c, *s = x.shape
        window = [min(self.window, n) for n in s]
        x = F.pad(x, [p for n, w in zip(reversed(s), reversed(window)) for p in (0, (-n) % w)])
        t, grid = window_partition(x, window)
        q, k, v = self.qkv(self.norm1(t)).unflatten(2, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        t = t + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        t = t + self.mlp(self.norm2(t))
        return window_merge(t, grid, window, b)[(slice(None), slice(None), *[slice(0, n) for n in s])]


class ResFormerEncoder(ResNetEncoder):
    """ResFormer encoder (from MFE-UNet): ResNet-34 basic-block stages (64/128/256/512 at width 64), each with a
    window-attention transformer branch alongside; the two outputs are summed."""

    def __init__(self, dims, in_channels, width=64, depth=(3, 4, 6, 3), norm_kind="batch", heads=4, window=8,
                 checkpointing=False):
        super().__init__(dims, in_channels, width, depth, "basic", norm_kind, checkpointing)
        self.transformers = nn.ModuleList(
            WindowTransformer(dims, self.channels[s], self.channels[s + 1], 1 if s == 0 else 2, heads, window)
            for s in range(len(depth)))

    def forward(self, x):
        feats = [self.stem(x)]
        x = self.pool(feats[0])
        for stage, transformer in zip(self.stages, self.transformers):
            x = self.run(stage, x) + self.run(transformer, x)
            feats.append(x)
        return feats


class SpatialAttention(nn.Module):
    """CBAM spatial attention, as in MFE-UNet's DFE: x * sigmoid(conv7x7([mean_c x ; max_c x]))."""

    def __init__(self, dims):
        super().__init__()
        self.conv = conv(dims, 2, 1, 7, bias=True)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class DilatedFeatureEnhancement(nn.Module):
    """DFE skip refinement (from MFE-UNet): a 1x1 branch and 3x3 branches with dilations 6, 12, 18, concatenated,
    fused by conv + BN, plus a 1x1 shortcut, ReLU, spatial attention. Branch width C/4 is ours."""

    def __init__(self, dims, channels, dilations=(6, 12, 18), norm_kind="batch"):
        super().__init__()
        mid = max(1, channels // 4)
        self.branches = nn.ModuleList(nn.Sequential(*conv_norm(dims, channels, mid, 1 if d == 1 else 3, 1, norm_kind,
                                                               dilation=d)) for d in (1, *dilations))
        self.fuse = nn.Sequential(*conv_norm(dims, mid * len(self.branches), channels, 1, 1, norm_kind, act=False))
        self.shortcut = conv(dims, channels, channels, 1)
        self.attention = SpatialAttention(dims)

    def forward(self, x):
        y = self.fuse(torch.cat([b(x) for b in self.branches], 1))
        return self.attention(F.relu(y + self.shortcut(x)))


class MFEUNet(MultiTaskNet):
    """MFE-UNet (from that paper): a shared ResFormer encoder, skips refined by DFE modules (shared by the
    decoders), one U-Net decoder per pixel-level task, image-level heads on the last two stages pooled and
    concatenated, then FC 32 (the official head has no activation between its linear layers; ours reuses
    ``ImageClassifier`` with ReLU and dropout there)."""

    default_encoder = ResFormerEncoder

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, dilations=(6, 12, 18),
                 classifier_levels=(-2, -1), classifier_hidden=32):
        super().__init__(tasks, in_channels, dims, norm_kind, encoder, False, classifier_levels, classifier_hidden)
        self.pixel_tasks = [name for name, (kind, _) in self.tasks.items() if kind == "pixel"]
        self.dfe = nn.ModuleList(DilatedFeatureEnhancement(dims, c, dilations, norm_kind)
                                 for c in (self.encoder.channels[:-1] if self.pixel_tasks else []))

    def features(self, x):
        feats = self.encoder(x)
        refined = [dfe(f) for dfe, f in zip(self.dfe, feats)] + feats[-1:]  # decoders read refined skips
        return {name: refined if name in self.pixel_tasks else feats for name in self.tasks}


# Deep multimodal guidance (Mallya, Hamarneh, MICCAI 2022), for dose prediction ---------------------------------------
class GuidanceNetwork(nn.Module):
    """G: maps the inferior model's encoder features to the superior model's, trained with MSE while both
    encoders are frozen (from the guidance paper, there an MLP on one latent; ours for dense features: per
    encoder scale a 1x1-conv, ReLU, dropout, 1x1-conv network)."""

    def __init__(self, dims, channels, dropout=0.1):
        super().__init__()
        self.maps = nn.ModuleList(nn.Sequential(
            conv(dims, c, c, 1, bias=True), nn.ReLU(inplace=True),
            (nn.Dropout2d if dims == 2 else nn.Dropout3d)(dropout), conv(dims, c, c, 1, bias=True))
            for c in channels)

    def forward(self, feats):
        return [g(f) for g, f in zip(self.maps, feats)]


class Frozen(nn.Module):
    """Base of the guided models (ours): the children named in ``frozen`` get no gradients and stay in eval mode
    (BN statistics, dropout) even while the model trains, so the stages they come from stay as trained."""

    frozen = ()

    def train(self, mode=True):
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval().requires_grad_(False)
        return self


class GuidanceObjective(Frozen):
    """Stage (b) of the guidance method: G's mean squared error to the frozen superior model's features, one value
    per case, averaged over the encoder scales. x = [CT ; ROI masks]; the frozen inferior model reads the CT. The
    inferior and superior models are STL models of the same tasks and encoder sizes (ours)."""

    frozen = ("inferior", "superior")

    def __init__(self, inferior, superior, guidance):
        super().__init__()
        self.inferior, self.superior, self.guidance = inferior, superior, guidance
        self.train()

    def forward(self, x):  # {"guidance": (B,) MSE}
        with torch.no_grad():
            f_inf = self.inferior.features(x[:, :self.inferior.in_channels])
            f_sup = self.superior.features(x)
        pairs = [(g, t) for name in f_inf for g, t in zip(self.guidance(f_inf[name]), f_sup[name])]
        return {"guidance": sum((g.float() - t.float()).square().flatten(1).mean(1) for g, t in pairs) / len(pairs)}


class GuidedModel(Frozen):
    """The guided model, stage (c) or (d) of the guidance method: the frozen inferior model reads the CT alone and
    the frozen G predicts the superior model's features from it. With the superior model's ``heads`` (c) they decode
    G(f); without (d) new heads, the only trained part, decode [f ; G(f)]."""

    frozen = ("inferior", "guidance")

    def __init__(self, inferior, guidance, heads=None):
        super().__init__()
        self.inferior, self.guidance, self.combine = inferior, guidance, heads is None
        self.in_channels, self.dims, self.tasks = inferior.in_channels, inferior.dims, inferior.tasks
        channels = {name: [2 * c for c in encoder.channels] for name, encoder in inferior.encoders.items()}
        self.heads = heads or nn.ModuleDict({name: make_head(self.dims, kind, channels[name], n)
                                             for name, (kind, n) in self.tasks.items()})
        self.train()

    def forward(self, x):
        self.inferior.check(x)
        feats = self.inferior.features(x)
        out = {}
        for name, head in self.heads.items():
            guided = self.guidance(feats[name])
            out[name] = head([torch.cat(p, 1) for p in zip(feats[name], guided)] if self.combine else guided,
                             x.shape[2:])
        return out


# Task weighting -------------------------------------------------------------------------------------------------------
class Weighting(nn.Module):
    """Task weighting: combines the task losses {task: scalar} into one loss, with the scheme of the paper named.
    equal: the plain sum (ours: the CTAN paper's weighting is not known to us).
    dwa: Dynamic Weight Average (MTAN; Liu, Johns, Davison 2019): w_k = T softmax_k(r_k / 2), r_k =
         L_k(e-1) / L_k(e-2) from the mean training losses of the last two epochs (w = 1 before).
    uncertainty: Kendall, Gal, Cipolla (2018): sum_k exp(-s_k) L_k / 2 + s_k / 2, s_k learnable.
    mfe: MFE-UNet's L_seg + 0.25 L_cls: weight 1 for pixel-level tasks, 0.25 for image-level ones.
    tasks: {name: (kind, n_out)} as the networks take them. Call ``end_epoch`` with the epoch's mean losses (DWA's
    history travels in the state_dict)."""

    def __init__(self, method, tasks, temperature=2.0):
        super().__init__()
        self.method, self.tasks, self.temperature = method, list(tasks), temperature
        self.image_tasks = {name for name, (kind, _) in tasks.items() if kind == "image"}
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks))) if method == "uncertainty" else None
        self.history = []  # mean training loss per task, one list per finished epoch (DWA)

    def weights(self):
        """The current weight of each task (uncertainty: exp(-s) / 2)."""
        if self.method == "uncertainty":
            return dict(zip(self.tasks, (0.5 * torch.exp(-self.log_vars)).tolist()))
        if self.method == "dwa" and len(self.history) >= 2:
            ratio = torch.tensor(self.history[-1]) / torch.tensor(self.history[-2]).clamp_min(1e-12)
            return dict(zip(self.tasks, (len(self.tasks) * torch.softmax(ratio / self.temperature, 0)).tolist()))
        return {t: 0.25 if self.method == "mfe" and t in self.image_tasks else 1.0 for t in self.tasks}

    def forward(self, losses):
        if self.method == "uncertainty":
            return sum(0.5 * torch.exp(-s) * losses[t] + 0.5 * s for t, s in zip(self.tasks, self.log_vars))
        w = self.weights()
        return sum(w[t] * losses[t] for t in self.tasks)

    def end_epoch(self, mean_losses):
        self.history.append([float(mean_losses[t]) for t in self.tasks])

    def get_extra_state(self):
        return {"history": self.history}

    def set_extra_state(self, state):
        self.history = [list(h) for h in state["history"]]


# Factory -------------------------------------------------------------------------------------------------------------
NETWORKS = {"stl": STL, "hps": HPS, "mtan": MTAN, "ctan": CTAN, "mfe": MFEUNet}


def build_model(arch, tasks, in_channels, dims=2, width=64, depth=(3, 4, 6, 3), block="bottleneck",
                norm_kind="batch", checkpointing=False, **options):
    """Build any network of this file. arch: one of ``ARCHS``; tasks: {name: (kind, n_out)}, kind "pixel" or
    "image"; dims: 2 or 3; width, depth, block: the residual encoder (ResNet-50 by default; ``mfe`` always uses
    basic blocks, i.e. ResNet-34, and takes ``window`` and ``attention_heads``). Other keyword options go to the
    network's constructor (e.g. ``transition``, ``cross_stages``, ``max_tokens``), which validates them."""
    if arch not in NETWORKS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    enc = dict(width=width, depth=tuple(depth), norm_kind=norm_kind, checkpointing=checkpointing)
    if arch == "mfe":
        enc.update(heads=options.pop("attention_heads", 4), window=options.pop("window", 8))
        encoder = lambda: ResFormerEncoder(dims, in_channels, **enc)
    else:
        encoder = lambda: ResNetEncoder(dims, in_channels, block=block, **enc)
    return NETWORKS[arch](tasks, in_channels, dims, norm_kind=norm_kind, encoder=encoder, **options)


def fp32(x):
    """Autocast off where x lives (ours): output layers run in fp32, as rounding a dose to bf16 costs ~0.04 Gy."""
    return torch.autocast("cpu" if x.device.type == "meta" else x.device.type, enabled=False)  # meta: no autocast


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":  # parameter counts at the default widths
    for title, tasks, cin, dims in [("openkbp", {"dose": ("pixel", 1), "structures": ("pixel", 10)}, 1, 2),
                                    ("ham10000", {"segmentation": ("pixel", 1), "diagnosis": ("image", 7)}, 3, 2),
                                    ("stoic (3D)", {"covid": ("image", 2), "severe": ("image", 2)}, 1, 3)]:
        with torch.device("meta"):
            counts = {arch: count_parameters(build_model(arch, tasks, cin, dims)) / 1e6 for arch in ARCHS}
        print(f"{title}: " + ", ".join(f"{arch} {n:.1f} M" for arch, n in counts.items()))
