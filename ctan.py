"""Cross-Task Attention Network (CTAN) and its baselines, in one file.

Kim, Purdie, McIntosh, "Cross-Task Attention Network: Improving Multi-Task Learning for Medical
Imaging Applications", MICCAI 2023 Workshops (arXiv 2309.03837).

The full text of the paper is not available to us; what is known is summarised in the project's
PAPER.md. Every module therefore says whether it is **from the paper** (or from the baseline's own
paper) or **ours**, and every choice of ours is a constructor argument.

Reading order: building blocks (residual blocks, encoder, heads, MTAN's task attention, CTAN's
cross-task attention, MFE-UNet's ResFormer and DFE, the guidance network), then the networks (STL,
HPS, MTAN, CTAN, MFE-UNet, guided dose models), then the factory ``build_model``.

Every network maps an input ``x`` of shape (B, C, *spatial) (2D or 3D) to a dict
``{task: output}``: pixel-level tasks give (B, n_out, *spatial), image-level tasks give (B, n_out)
raw logits or values. Imports torch only, so the file can be copied into another codebase.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ARCHS = ("stl", "hps", "mtan", "ctan", "mfe")
TASK_KINDS = ("pixel", "image")


# --------------------------------------------------------------------------------------------
# Dimension-generic layers
# --------------------------------------------------------------------------------------------
def conv(dims, cin, cout, k=3, stride=1, dilation=1, bias=False):
    """A 2D or 3D convolution with 'same' padding for odd kernels."""
    cls = nn.Conv2d if dims == 2 else nn.Conv3d
    return cls(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=bias)


def norm(dims, channels, kind="batch"):
    """Normalisation layer. Batch norm as in ResNet (from ResNet); group/instance norm are our
    options for small 3D batches."""
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"norm must be one of 'batch', 'group', 'instance', got {kind!r}")


def conv_norm_act(dims, cin, cout, k=3, stride=1, norm_kind="batch"):
    return nn.Sequential(conv(dims, cin, cout, k, stride), norm(dims, cout, norm_kind), nn.ReLU(inplace=True))


def avg_pool(x, factor):
    """Average-pool every spatial axis by ``factor`` (ceil mode), 2D or 3D."""
    if factor == 1:
        return x
    pool = F.avg_pool2d if x.dim() == 4 else F.avg_pool3d
    return pool(x, factor, factor, ceil_mode=True)


def upsample(x, size):
    return F.interpolate(x, size=size, mode="nearest")


# --------------------------------------------------------------------------------------------
# Building blocks: residual blocks and the shared encoder (ResNet; He et al. 2016)
# --------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet-18/34 residual block: two 3x3 convolutions (from ResNet)."""

    def __init__(self, dims, cin, cout, stride=1, norm_kind="batch"):
        super().__init__()
        self.body = nn.Sequential(
            conv(dims, cin, cout, 3, stride), norm(dims, cout, norm_kind), nn.ReLU(inplace=True),
            conv(dims, cout, cout, 3), norm(dims, cout, norm_kind))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(conv(dims, cin, cout, 1, stride), norm(dims, cout, norm_kind)))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50 residual block: 1x1 reduce, 3x3, 1x1 expand to ``cout`` = 4 x width
    (from ResNet; the stride sits on the 3x3 as in torchvision's ResNet v1.5)."""

    def __init__(self, dims, cin, cout, stride=1, norm_kind="batch"):
        super().__init__()
        mid = max(1, cout // 4)
        self.body = nn.Sequential(
            conv(dims, cin, mid, 1), norm(dims, mid, norm_kind), nn.ReLU(inplace=True),
            conv(dims, mid, mid, 3, stride), norm(dims, mid, norm_kind), nn.ReLU(inplace=True),
            conv(dims, mid, cout, 1), norm(dims, cout, norm_kind))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(conv(dims, cin, cout, 1, stride), norm(dims, cout, norm_kind)))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


BLOCKS = {"bottleneck": (Bottleneck, 4), "basic": (BasicBlock, 1)}  # block, channel expansion


class ResNetEncoder(nn.Module):
    """Shared residual encoder (ours, following the follow-up paper's ResNet-50 backbone).

    Stem (7x7 conv, stride 2) then a max-pool and four stages of residual blocks; stage s has
    ``depth[s]`` blocks and output channels width * 2**s * expansion; stages 2-4 halve the
    resolution. Returns the feature list [stem (/2), stage1 (/4), stage2 (/8), stage3 (/16),
    stage4 (/32, the bottleneck)], which the U-Net decoder reads as skips.
    Defaults are ResNet-50 (bottleneck blocks, depth (3, 4, 6, 3), width 64); ``block="basic"``
    with the same depth is ResNet-34. ``checkpointing`` recomputes stages in the backward pass to
    save activation memory (for 3D volumes).
    """

    def __init__(self, dims, in_channels, width=64, depth=(3, 4, 6, 3), block="bottleneck",
                 norm_kind="batch", checkpointing=False):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {tuple(BLOCKS)}, got {block!r}")
        block_cls, expansion = BLOCKS[block]
        self.checkpointing = checkpointing
        self.stem = conv_norm_act(dims, in_channels, width, k=7, stride=2, norm_kind=norm_kind)
        self.pool = (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(3, stride=2, padding=1)
        self.channels = [width]
        stages, cin = [], width
        for s, n in enumerate(depth):
            cout = width * 2 ** s * expansion
            stages.append(nn.Sequential(*[
                block_cls(dims, cin if i == 0 else cout, cout, stride=2 if (s > 0 and i == 0) else 1,
                          norm_kind=norm_kind) for i in range(n)]))
            self.channels.append(cout)
            cin = cout
        self.stages = nn.ModuleList(stages)

    def run(self, module, x):
        """Apply a stage, recomputing it in the backward pass when checkpointing is on."""
        if self.checkpointing and self.training and x.requires_grad:
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward(self, x):
        feats = [self.stem(x)]
        x = self.pool(feats[0])
        for stage in self.stages:
            x = self.run(stage, x)
            feats.append(x)
        return feats


# --------------------------------------------------------------------------------------------
# Building blocks: task heads
# --------------------------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    """U-Net up-step: upsample x2, concatenate the skip, two 3x3 conv-norm-ReLU (ours: U-Net)."""

    def __init__(self, dims, cin, cskip, cout, norm_kind="batch"):
        super().__init__()
        self.convs = nn.Sequential(conv_norm_act(dims, cin + cskip, cout, norm_kind=norm_kind),
                                   conv_norm_act(dims, cout, cout, norm_kind=norm_kind))

    def forward(self, x, skip=None, size=None):
        x = upsample(x, skip.shape[2:] if skip is not None else size)
        return self.convs(x if skip is None else torch.cat([x, skip], 1))


class PixelDecoder(nn.Module):
    """Pixel-level head (dose, segmentation): a U-Net decoder over the encoder's feature list with
    skip connections, back to the input resolution (ours: the paper uses one decoder per
    pixel-level task; its exact form is not published)."""

    def __init__(self, dims, channels, n_out, norm_kind="batch"):
        super().__init__()
        w = channels[0]
        widths = [max(8, w * 4 // 2 ** i) for i in range(len(channels))]  # 4w, 2w, w, w/2, w/4 (at least 8)
        blocks, cin = [], channels[-1]
        for skip, cout in zip(channels[-2::-1], widths):  # skips from deep to shallow
            blocks.append(DecoderBlock(dims, cin, skip, cout, norm_kind))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.final = DecoderBlock(dims, cin, 0, widths[-1], norm_kind)  # /2 -> full size
        self.out = conv(dims, widths[-1], n_out, 1, bias=True)

    def forward(self, feats, size):
        x = feats[-1]
        for block, skip in zip(self.blocks, feats[-2::-1]):
            x = block(x, skip)
        return self.out(self.final(x, size=size))


class ImageClassifier(nn.Module):
    """Image-level head (diagnosis, severity): global average pooling of the chosen encoder levels,
    concatenated, then an MLP (ours: the paper's image-level heads are not published).
    ``levels=(-1,)`` reads the bottleneck; MFE-UNet reads the last two stages."""

    def __init__(self, channels, n_out, levels=(-1,), hidden=256, dropout=0.2):
        super().__init__()
        self.levels = tuple(levels)
        self.mlp = nn.Sequential(nn.Linear(sum(channels[i] for i in self.levels), hidden),
                                 nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def forward(self, feats, size=None):
        return self.mlp(torch.cat([feats[i].flatten(2).mean(2) for i in self.levels], 1))


def make_head(dims, kind, channels, n_out, norm_kind="batch", classifier_levels=(-1,), hidden=256):
    """One head per task: a decoder for pixel-level tasks, a classifier for image-level ones."""
    if kind == "pixel":
        return PixelDecoder(dims, channels, n_out, norm_kind)
    return ImageClassifier(channels, n_out, classifier_levels, hidden)


# --------------------------------------------------------------------------------------------
# Building blocks: task-specific attention (MTAN; Liu, Johns, Davison, CVPR 2019)
# --------------------------------------------------------------------------------------------
class TaskAttention(nn.Module):
    """MTAN's soft attention mask for one task at one encoder stage (from MTAN, official
    ResNet version): mask = sigmoid(BN(conv1x1(ReLU(BN(conv1x1([u_b ; a_prev])))))) computed from
    the shared features before the stage's last block (u_b) and the task's previous attended
    features, then multiplied element-wise onto the stage's output u_t: a = mask * u_t."""

    def __init__(self, dims, cin, cout, norm_kind="batch"):
        super().__init__()
        self.mask = nn.Sequential(
            conv(dims, cin, max(1, cout // 4), 1), norm(dims, max(1, cout // 4), norm_kind), nn.ReLU(inplace=True),
            conv(dims, max(1, cout // 4), cout, 1), norm(dims, cout, norm_kind), nn.Sigmoid())

    def forward(self, u_b, u_t, a_prev=None):
        return self.mask(u_b if a_prev is None else torch.cat([u_b, a_prev], 1)) * u_t


# --------------------------------------------------------------------------------------------
# Building blocks: cross-task attention (CTAN)
# --------------------------------------------------------------------------------------------
class CrossTaskAttention(nn.Module):
    """Cross-task attention at one encoder stage (from the paper: tasks exchange information through
    attention, each task's features forming the queries and the other tasks' features the keys and
    values).

    For each task t with features f_t (B, C, *S):
        q = W_q^t LN(f_t)                      one token per voxel
        k, v = W_kv^s LN(pool(f_s)),  s != t   tokens of all other tasks, concatenated
        f_t <- f_t + gamma_t * W_o^t MHA(q, k, v)
    Ours (arguments): ``heads``; inner width C / ``reduction``; keys and values average-pooled until
    at most ``max_tokens`` per task, so that 3D volumes stay affordable; with ``pool_queries`` the
    queries are pooled by the same factor and the update is upsampled back (nearest) before the
    residual, so high-resolution stages cost like a ``max_tokens`` map (ViT-style token reduction;
    ``False`` keeps one query per voxel); the residual gate gamma_t starts at ``gate_init``.
    Attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
    GPU).
    """

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
        while math.prod(math.ceil(s / factor) for s in spatial) > self.max_tokens:
            factor *= 2
        return factor

    def split_heads(self, x):  # (B, N, D) -> (B, heads, N, D / heads)
        return x.unflatten(2, (self.heads, -1)).transpose(1, 2)

    def forward(self, feats):
        shape = feats[0].shape
        factor = self.pool_factor(shape[2:])
        tokens = lambda f: f.flatten(2).transpose(1, 2)  # (B, C, *S) -> (B, N, C)
        kvs = [self.kv[s](self.norm[s](tokens(avg_pool(f, factor)))).chunk(2, dim=-1)
               for s, f in enumerate(feats)]
        out = []
        for t, f in enumerate(feats):
            f_q = avg_pool(f, factor) if self.pool_queries else f
            q = self.split_heads(self.q[t](self.norm[t](tokens(f_q))))
            k = self.split_heads(torch.cat([kv[0] for s, kv in enumerate(kvs) if s != t], 1))
            v = self.split_heads(torch.cat([kv[1] for s, kv in enumerate(kvs) if s != t], 1))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            a = self.out[t](a).transpose(1, 2).reshape(f_q.shape)
            out.append(f + self.gate[t] * (upsample(a, shape[2:]) if a.shape != shape else a))
        return out


# --------------------------------------------------------------------------------------------
# Building blocks: MFE-UNet (Bui, Le, Bum, Choo, arXiv 2412.00351)
# --------------------------------------------------------------------------------------------
def window_partition(x, window):
    """(B, C, *S) with S divisible by ``window`` -> (B * n_windows, window**dims, C) tokens."""
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
    """The transformer branch of a ResFormer stage (from MFE-UNet: long-range attention beside the
    convolutional stage, outputs summed). Pre-norm multi-head self-attention inside non-overlapping
    windows of ``window`` voxels per side, then an MLP; a map no larger than one window gets global
    attention. Windows, as in the official code (Swin layers, window = image size / 16), keep the
    cost linear in the number of voxels at the high-resolution stages, where global attention over
    (H/4 x W/4) tokens, or a 3D volume's, would not fit; at the deep stages the window covers the
    whole map, so attention there is global. Ours, to stay short: one block per stage without
    Swin's shifted windows and relative position bias (the official code has two shifted Swin blocks;
    the convolutional branch already mixes neighbouring windows), and a strided 1x1 projection in
    place of patch merging to reach the stage's output size and channels."""

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
        pad = [(-n) % w for n, w in zip(s, window)]
        x = F.pad(x, [p for q in reversed(pad) for p in (0, q)])
        t, grid = window_partition(x, window)
        q, k, v = self.qkv(self.norm1(t)).unflatten(2, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        t = t + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        t = t + self.mlp(self.norm2(t))
        x = window_merge(t, grid, window, b)
        return x[(slice(None), slice(None), *[slice(0, n) for n in s])]


class ResFormerEncoder(ResNetEncoder):
    """ResFormer encoder (from MFE-UNet): ResNet-34 basic-block stages (64/128/256/512 at width 64),
    each with a window-attention transformer branch alongside; the two outputs are summed."""

    def __init__(self, dims, in_channels, width=64, depth=(3, 4, 6, 3), norm_kind="batch",
                 heads=4, window=8, checkpointing=False):
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
    """CBAM spatial attention: sigmoid(conv7x7([mean_c ; max_c])) times the input (as MFE-UNet's DFE)."""

    def __init__(self, dims):
        super().__init__()
        self.conv = conv(dims, 2, 1, 7, bias=True)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class DilatedFeatureEnhancement(nn.Module):
    """DFE skip refinement (from MFE-UNet): parallel 3x3 branches with dilations 6, 12, 18 and a
    1x1 branch, concatenated, fused by conv + BN, plus a 1x1 shortcut, ReLU, spatial attention.
    Branch width C/4 is ours."""

    def __init__(self, dims, channels, dilations=(6, 12, 18), norm_kind="batch"):
        super().__init__()
        mid = max(1, channels // 4)
        self.branches = nn.ModuleList(
            [nn.Sequential(conv(dims, channels, mid, 1), norm(dims, mid, norm_kind), nn.ReLU(inplace=True))] +
            [nn.Sequential(conv(dims, channels, mid, 3, dilation=d), norm(dims, mid, norm_kind), nn.ReLU(inplace=True))
             for d in dilations])
        self.fuse = nn.Sequential(conv(dims, mid * len(self.branches), channels, 1), norm(dims, channels, norm_kind))
        self.shortcut = conv(dims, channels, channels, 1)
        self.attention = SpatialAttention(dims)

    def forward(self, x):
        y = self.fuse(torch.cat([b(x) for b in self.branches], 1))
        return self.attention(F.relu(y + self.shortcut(x)))


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------
class MultiTaskNet(nn.Module):
    """Base of every network: checks the input and applies one head per task to that task's
    encoder features. Subclasses define ``features(x) -> {task: [feature maps, shallow to deep]}``."""

    size_multiple = 32  # five stride-2 steps in the encoder
    default_encoder = ResNetEncoder  # used when no ``encoder`` factory is given: ResNet-50

    def __init__(self, tasks, in_channels, dims, channels, norm_kind="batch", classifier_levels=(-1,),
                 classifier_hidden=256):
        super().__init__()
        self.tasks, self.in_channels, self.dims = dict(tasks), in_channels, dims
        self.heads = nn.ModuleDict({name: make_head(dims, kind, channels, n, norm_kind, classifier_levels,
                                                    classifier_hidden)
                                    for name, (kind, n) in self.tasks.items()})

    @classmethod
    def encoder_factory(cls, encoder, dims, in_channels):
        """``encoder`` (a no-argument callable that builds one encoder), or the class default."""
        return encoder or (lambda: cls.default_encoder(dims, in_channels))

    def check(self, x):
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, {', '.join('S' * self.dims)}) "
                             f"for this {self.dims}D model, got {tuple(x.shape)}")
        if any(s % self.size_multiple for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be a multiple of {self.size_multiple} "
                             "(the encoder halves it five times): crop or pad the input")

    def forward(self, x):
        self.check(x)
        feats = self.features(x)
        return {name: head(feats[name], x.shape[2:]) for name, head in self.heads.items()}


class STL(MultiTaskNet):
    """Single-task learning baseline (from the paper's comparison): one full encoder per task,
    nothing shared; tasks only meet in the summed loss."""

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, **head_options):
        encoder = self.encoder_factory(encoder, dims, in_channels)
        encoders = {name: encoder() for name in tasks}
        super().__init__(tasks, in_channels, dims, next(iter(encoders.values())).channels, norm_kind, **head_options)
        self.encoders = nn.ModuleDict(encoders)

    def features(self, x):
        return {name: enc(x) for name, enc in self.encoders.items()}


class HPS(MultiTaskNet):
    """Hard parameter sharing baseline (from the paper's comparison): one shared encoder, one head
    per task."""

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, **head_options):
        shared = self.encoder_factory(encoder, dims, in_channels)()
        super().__init__(tasks, in_channels, dims, shared.channels, norm_kind, **head_options)
        self.encoder = shared

    def features(self, x):
        feats = self.encoder(x)
        return {name: feats for name in self.tasks}


class MTAN(MultiTaskNet):
    """Multi-Task Attention Network baseline (from MTAN, official ResNet version): a shared encoder
    and, per task and stage, a soft attention mask over the shared features (``TaskAttention``).
    The attended features a_s pass through a transition to the next stage's size and feed the next
    mask. Each task's heads read [stem, a_1 .. a_4]. Needs at least two blocks per stage (the mask
    reads the features before the last block).

    ``transition``: "block", the official 'encoder_block_att' (a strided residual block of the
    encoder's kind at the next stage's width), or "conv" (ours: a strided 1x1 conv-norm-ReLU, the
    block's shortcut alone; about a quarter of its FLOPs, for speed)."""

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, transition="block",
                 **head_options):
        shared = self.encoder_factory(encoder, dims, in_channels)()
        super().__init__(tasks, in_channels, dims, shared.channels, norm_kind, **head_options)
        if transition not in ("block", "conv"):
            raise ValueError(f"transition must be 'block' (official MTAN) or 'conv' (light), got {transition!r}")
        if any(len(stage) < 2 for stage in shared.stages):
            raise ValueError("mtan/ctan need depth >= 2 blocks in every stage (the attention mask reads "
                             "the features before each stage's last block)")
        self.encoder = shared
        block_cls = type(shared.stages[0][0])
        ch = shared.channels[1:]
        self.attention = nn.ModuleList(
            nn.ModuleList(TaskAttention(dims, ch[s] * (1 if s == 0 else 2), ch[s], norm_kind) for _ in self.tasks)
            for s in range(len(ch)))
        step = (lambda cin, cout: block_cls(dims, cin, cout, stride=2, norm_kind=norm_kind) if transition == "block"
                else conv_norm_act(dims, cin, cout, k=1, stride=2, norm_kind=norm_kind))
        self.transition = nn.ModuleList(nn.ModuleList(step(ch[s], ch[s + 1]) for _ in self.tasks)
                                        for s in range(len(ch) - 1))

    def exchange(self, stage, feats):
        """Hook between tasks after each stage: nothing crosses tasks in MTAN."""
        return feats

    def features(self, x):
        enc = self.encoder
        stem = enc.stem(x)
        u, prev, out = enc.pool(stem), [None] * len(self.tasks), [[stem] for _ in self.tasks]
        for s, stage in enumerate(enc.stages):
            u_b = enc.run(stage[:-1], u)
            u = enc.run(stage[-1], u_b)
            a = [att(u_b, u, p) for att, p in zip(self.attention[s], prev)]
            a = self.exchange(s, a)
            for feats, a_t in zip(out, a):
                feats.append(a_t)
            if s < len(self.transition):
                prev = [enc.run(f, a_t) for f, a_t in zip(self.transition[s], a)]
        return dict(zip(self.tasks, out))


class CTAN(MTAN):
    """Cross-Task Attention Network (from the paper): MTAN's task-specific features, plus
    cross-task attention after the chosen encoder stages, so each task's features at that stage
    are updated with what the other tasks found (``CrossTaskAttention``); the exchanged features
    flow into the next stage, the skip connections and the heads.

    ``cross_stages``: the stages (1-4; 4 is the bottleneck) with cross-task attention (ours:
    all four by default; an empty tuple turns it off and gives exactly MTAN with the same
    ``transition``). ``heads``, ``reduction``, ``max_tokens``, ``gate_init``, ``pool_queries``:
    see ``CrossTaskAttention``."""

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, transition="block",
                 cross_stages=(1, 2, 3, 4), heads=4, reduction=4, max_tokens=512, gate_init=0.1, pool_queries=True,
                 **head_options):
        super().__init__(tasks, in_channels, dims, norm_kind, encoder, transition, **head_options)
        if len(self.tasks) < 2:
            raise ValueError("ctan needs at least two tasks (cross-task attention has nothing to attend to)")
        n_stages = len(self.encoder.stages)
        if any(s not in range(1, n_stages + 1) for s in cross_stages):
            raise ValueError(f"cross_stages must be within 1..{n_stages}, got {tuple(cross_stages)}")
        self.cross = nn.ModuleDict({
            str(s): CrossTaskAttention(self.encoder.channels[s], len(self.tasks), heads, reduction, max_tokens,
                                       gate_init, pool_queries)
            for s in sorted(set(cross_stages))})

    def exchange(self, stage, feats):
        key = str(stage + 1)
        return self.cross[key](feats) if key in self.cross else feats


class MFEUNet(MultiTaskNet):
    """MFE-UNet (Bui, Le, Bum, Choo, arXiv 2412.00351): a ResFormer encoder shared by all tasks,
    skips refined by DFE modules (shared by the decoders), one U-Net decoder per pixel-level task,
    and image-level heads reading the last two encoder stages pooled and concatenated, then FC 32
    (from that paper; the official head has no activation between its two linear layers, ours
    reuses ``ImageClassifier`` with ReLU and dropout there)."""

    default_encoder = ResFormerEncoder

    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, dilations=(6, 12, 18),
                 classifier_levels=(-2, -1), classifier_hidden=32):
        shared = self.encoder_factory(encoder, dims, in_channels)()
        super().__init__(tasks, in_channels, dims, shared.channels, norm_kind, classifier_levels, classifier_hidden)
        self.encoder = shared
        self.pixel_tasks = [name for name, (kind, _) in self.tasks.items() if kind == "pixel"]
        self.dfe = nn.ModuleList(DilatedFeatureEnhancement(dims, c, dilations, norm_kind)
                                 for c in (shared.channels[:-1] if self.pixel_tasks else []))

    def features(self, x):
        feats = self.encoder(x)
        refined = [dfe(f) for dfe, f in zip(self.dfe, feats)] + feats[-1:]  # decoders read refined skips
        return {name: refined if name in self.pixel_tasks else feats for name in self.tasks}


# --------------------------------------------------------------------------------------------
# Deep multimodal guidance (Mallya, Hamarneh, MICCAI 2022), for dose prediction
# --------------------------------------------------------------------------------------------
class GuidanceNetwork(nn.Module):
    """G (from the guidance paper, there an MLP on one latent vector; here, for dense features, per
    encoder scale a light 1x1-conv network with dropout, ours): maps the inferior model's encoder
    features to the superior model's, trained with MSE while both encoders are frozen."""

    def __init__(self, dims, channels, dropout=0.1):
        super().__init__()
        self.maps = nn.ModuleList(nn.Sequential(
            conv(dims, c, c, 1, bias=True), nn.ReLU(inplace=True),
            (nn.Dropout2d if dims == 2 else nn.Dropout3d)(dropout), conv(dims, c, c, 1, bias=True))
            for c in channels)

    def forward(self, feats):
        return [g(f) for g, f in zip(self.maps, feats)]


class GuidedModel(nn.Module):
    """The guided dose model, stage (c) or (d) of the guidance method: the (frozen) inferior encoder
    reads the CT alone; G predicts the superior model's features from it. ``combine=False`` (c):
    the superior model's heads decode G(features); ``combine=True`` (d): new heads decode
    [features ; G(features)]. Only the CT is ever read."""

    def __init__(self, inferior, guidance, heads, combine=False):
        super().__init__()
        self.inferior, self.guidance, self.heads, self.combine = inferior, guidance, heads, combine
        self.in_channels, self.dims, self.tasks = inferior.in_channels, inferior.dims, inferior.tasks

    def forward(self, x):
        self.inferior.check(x)
        feats = self.inferior.features(x)
        out = {}
        for name, head in self.heads.items():
            guided = self.guidance(feats[name])
            out[name] = head([torch.cat(p, 1) for p in zip(feats[name], guided)] if self.combine else guided,
                             x.shape[2:])
        return out


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
NETWORKS = {"stl": STL, "hps": HPS, "mtan": MTAN, "ctan": CTAN, "mfe": MFEUNet}


def build_model(arch, tasks, in_channels, dims=2, width=64, depth=(3, 4, 6, 3), block="bottleneck",
                norm_kind="batch", checkpointing=False, **options):
    """Build any network of this file.

    arch: one of ``ARCHS``. tasks: ``{name: (kind, n_out)}`` with kind "pixel" or "image".
    in_channels: input channels. dims: 2 or 3. width, depth, block: the residual encoder
    (ResNet-50 by default; ``mfe`` uses basic blocks, i.e. ResNet-34, whatever ``block`` says).
    Other keyword options go to the network's constructor (e.g. MTAN's and CTAN's ``transition``;
    CTAN's ``cross_stages``, ``heads``, ``max_tokens``, ``gate_init``, ``pool_queries``; MFE-UNet's
    ``window``).
    """
    if arch not in NETWORKS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    if not tasks:
        raise ValueError("tasks is empty: give {name: (kind, n_out)} with kind 'pixel' or 'image'")
    for name, spec in tasks.items():
        if len(spec) != 2 or spec[0] not in TASK_KINDS or int(spec[1]) < 1:
            raise ValueError(f"task {name!r}: expected (kind, n_out) with kind in {TASK_KINDS} and n_out >= 1, "
                             f"got {spec!r}")
    enc_options = dict(width=width, depth=tuple(depth), norm_kind=norm_kind, checkpointing=checkpointing)
    if arch == "mfe":
        window = options.pop("window", 8)
        heads = options.pop("attention_heads", 4)
        encoder = lambda: ResFormerEncoder(dims, in_channels, heads=heads, window=window, **enc_options)
    else:
        encoder = lambda: ResNetEncoder(dims, in_channels, block=block, **enc_options)
    return NETWORKS[arch](tasks, in_channels, dims, norm_kind=norm_kind, encoder=encoder, **options)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    examples = {  # a small example of each dataset's task set (see data.py)
        "openkbp (2D slices)": ({"dose": ("pixel", 1), "structures": ("pixel", 10)}, 1, 2, 128),
        "ham10000": ({"segmentation": ("pixel", 1), "diagnosis": ("image", 7)}, 3, 2, 192),
        "stoic (3D)": ({"covid": ("image", 2), "severe": ("image", 2)}, 1, 3, 64),
    }
    for title, (tasks, cin, dims, size) in examples.items():
        print(f"{title}: tasks {tasks}, input (2, {cin}, {', '.join([str(size)] * dims)})")
        for arch in ARCHS:
            model = build_model(arch, tasks, cin, dims).eval()
            with torch.no_grad():
                out = model(torch.zeros(2, cin, *[size] * dims))
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items())
            print(f"  {arch:5s} {count_parameters(model) / 1e6:7.1f} M parameters   {shapes}")
