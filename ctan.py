"""Cross-Task Attention Network (CTAN; Kim, Purdie, McIntosh, MICCAI 2023 Workshops, arXiv 2309.03837) for
multi-task learning in medical imaging, its baselines and two related systems, in one file that needs torch only.

CTAN's data flow, in the notation used throughout (tasks t = 1..T, encoder stages s = 1..n, n = 4 by default):
    x (B, C_in, *S), 2D or 3D  ->  shared encoder: stem, then stages s giving shared features p^s
    task-specific features (MTAN's attention):  a_t^s = m_t^s * p^s,  m_t^s = mask_t^s([p_b^s ; g^s(a_t^(s-1))])
        p_b^s: the shared features before stage s's last block; g^s: the transition into stage s
    cross-task attention after stage s:  a_t^s <- a_t^s + gamma_t up(W_o^t MHA(q_t, k_t, v_t) + b_o^t), where t's
        queries q_t come from its own a_t^s and its keys and values k_t, v_t from every other task's a_r^s
    task heads: task t reads [stem, a_t^1 .. a_t^n]: a U-Net decoder (pixel-level) or pooling + MLP (image-level)

Provenance: we have the paper's abstract and its authors' follow-up (arXiv 2411.18767), not its full text. From the
abstract: cross-task attention, the baselines STL, HPS, MTAN; from the follow-up: a shared ResNet-50 encoder, a
decoder per task. Ours (inferred; each class says whose is what): a task's queries, the other tasks' keys and values
(cross-attention as usually read); MTAN's masks and transitions as the task features; pooling, heads, widths.

Map of the file: CrossTaskAttention, TaskAttention (CTAN's exchange, MTAN's masks); MultiTaskNet, MTAN, CTAN, STL,
HPS (the networks); residual blocks, ResNetEncoder (the encoder protocol), PixelDecoder, ImageClassifier, layers;
MFEUNet, ResFormerEncoder, GuidanceNetwork, GuidanceObjective, GuidedModel (related systems); Weighting, build_model.

Usage (outputs are raw: logits for segmentation and classification, unscaled values for regression):
    tasks = {"dose": ("pixel", 1), "diagnosis": ("image", 3)}   # {name: (kind, n_out)}, kind "pixel" or "image"
    model = build_model("ctan", tasks, in_channels=1, dims=2, width=16, depth=(2, 2, 2, 2))
    x, dose, label = torch.randn(8, 1, 128, 128), torch.rand(8, 1, 128, 128), torch.randint(0, 3, (8,))
    out = model(x)   # {"dose": (8, 1, 128, 128), "diagnosis": (8, 3)}; sizes: multiples of 2^(n+1) = 32
    weighting = Weighting("equal", tasks)   # "uncertainty": give weighting.parameters() to the optimiser
    loss = weighting({"dose": F.l1_loss(out["dose"], dose), "diagnosis": F.cross_entropy(out["diagnosis"], label)})
"""
import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ARCHS = ("stl", "hps", "mtan", "ctan", "mfe")
TASK_KINDS = ("pixel", "image")
NORMS = ("batch", "group", "instance")

# The attention: CTAN's cross-task attention, and MTAN's task masks it builds on -------------------------------------
class CrossTaskAttention(nn.Module):
    """Cross-task attention at one stage (the paper's idea: attention across the tasks; as we read it, each task
    queries the other tasks' features). For every task t, with a_t (B, C, *S) its features, P a pooling to N tokens:
        q_t = W_q^t LN(P a_t) + b_q^t                    queries: task t's own tokens (B, N, D)
        k_t, v_t = W_kv^r LN(P a_r), for every r != t    keys and values: the other tasks' tokens, concatenated into
                                                         one sequence (B, (T-1) N, D): one softmax over all of them
        a_t <- a_t + gamma_t up(W_o^t MHA(q_t, k_t, v_t) + b_o^t)   multi-head attention, a gated residual update
    Ours (inferred; the abstract names only the idea): the queries, keys and values above, the one softmax, and as
    arguments: D = channels // reduction (rounded down to a multiple of the heads) in ``attention_heads`` heads, fewer
    where a head would get under ``min_head_dim`` values (4 heads of 4 take 5x the time of 1 of 16 on a CPU); P averages
    each axis by a power of 2 (capped at its size) to at most ``max_tokens`` tokens (None: no pooling), bounding the
    cost in 3D; up() gives each pooled block its token's update; gamma_t starts at ``gate_init``; LN has no affine and
    W_kv no bias (W absorbs the affine; softmax ignores a key bias, a value bias only shifts b_o); all tasks at once."""
    def __init__(self, channels, n_tasks, attention_heads=4, min_head_dim=16, reduction=4, max_tokens=512,
                 gate_init=0.1):
        super().__init__()
        for name in ("channels", "attention_heads", "min_head_dim", "reduction"):
            check_arg(name, locals()[name], is_int, "an integer >= 1")
        check_arg("n_tasks", n_tasks, lambda v: is_int(v, 2), ">= 2: ctan needs at least two tasks")
        check_arg("max_tokens", max_tokens, lambda v: v is None or is_int(v), "an integer >= 1 or None (no limit)")
        check_arg("gate_init", gate_init, is_real, "a finite number")
        self.attention_heads = h = max(1, min(attention_heads, channels // reduction // min_head_dim))
        self.inner = max(h, channels // reduction // h * h)  # D, a multiple of the heads
        self.max_tokens = max_tokens
        n, c, d = n_tasks, channels, self.inner
        self.w_q, self.b_q = uniform((n, c, d), c), uniform((n, 1, d), c)  # W_q^t, b_q^t
        self.w_kv = uniform((n, c, 2 * d), c)  # W_kv^t: task t's keys and values, for the other tasks
        self.w_o, self.b_o = uniform((n, d, c), d), uniform((n, 1, c), d)  # W_o^t, b_o^t
        self.gate = nn.Parameter(torch.full((n_tasks, 1, 1), float(gate_init)))  # gamma_t

    def pool_factor(self, spatial):  # per axis: the least power of 2 (at most the axis' size) giving <= max_tokens
        factor = 1
        while self.max_tokens and math.prod([-(-n // min(factor, n)) for n in spatial]) > self.max_tokens:
            factor *= 2
        return tuple(min(factor, n) for n in spatial)

    def forward(self, a):  # a: T maps (B, C, *S) -> T maps (B, C, *S)
        check_arg("a", a, lambda v: len(v) == len(self.gate) and len({a_t.shape for a_t in v}) == 1 and
                  v[0].shape[1] == self.w_q.shape[1], f"{len(self.gate)} maps (B, {self.w_q.shape[1]}, *S), one shape")
        b, c, *spatial = a[0].shape
        n, h, d = len(a), self.attention_heads, self.inner
        factor = self.pool_factor(spatial)  # per axis
        pooled = [avg_pool(a_t.flatten(0, 1)[:, None], factor) for a_t in a]  # T maps (B*C, 1, *S'), S' = S/factor
        # as B*C one-channel maps: the same values, and no copies of a_t in a CPU backward (z's grad is channels last)
        z = torch.cat([p.view(b, c, -1).transpose(1, 2) for p in pooled]).view(n, -1, c)  # (T, B*N, C): N tokens a case
        z = F.layer_norm(z, (c,))  # LN over C of each token
        q = torch.baddbmm(self.b_q, z, self.w_q).view(n * b, -1, h, d // h).transpose(1, 2)  # (T*B, h, N, D/h)
        kv = torch.bmm(z, self.w_kv).view(n, b, -1, 2, h, d // h)  # (T, B, N, 2, h, D/h)
        kv = torch.stack([kv.roll(-r, 0) for r in range(1, n)], 1)  # (T, T-1, B, N, 2, h, D/h): [t, r-1] is t + r's
        k, v = kv.permute(4, 0, 2, 5, 1, 3, 6).reshape(2, n * b, h, -1, d // h)  # (T*B, h, (T-1)*N, D/h) each
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, d)  # (T, B*N, D)
        u = torch.baddbmm(self.b_o * self.gate, o, self.w_o * self.gate)  # (T, B*N, C): gamma_t (W_o^t MHA + b_o^t)
        u = u.view(n, b, *pooled[0].shape[2:], c).movedim(-1, 2)  # (T, B, C, *S'): channels last, as CPU upsample likes
        return [a_t + upsample(u_t, factor, spatial) for a_t, u_t in zip(a, u)]  # T maps (B, C, *S)

def uniform(shape, fan_in):  # a parameter drawn as nn.Linear draws its weights and biases: U(+-1/sqrt(fan_in))
    return nn.Parameter(torch.empty(shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5))

class TaskAttention(nn.Module):
    """MTAN's attention module for one task and stage (from MTAN; Liu, Johns, Davison, CVPR 2019): the soft mask
    m_t^s = sigmoid(norm(conv1x1(ReLU(norm(conv1x1([p_b^s ; g^s(a_t^(s-1))])))))) (p_b^s alone at stage 1) selects
    task t's features from the stage's shared output: a_t^s = m_t^s * p^s."""
    def __init__(self, dims, cin, cout, norm_kind="batch"):
        super().__init__()
        mid = max(1, cout // 4)
        self.mask = nn.Sequential(*conv_norm(dims, cin, mid, 1, 1, norm_kind),
                                  *conv_norm(dims, mid, cout, 1, 1, norm_kind, act=False))

    def forward(self, p_b, p, g_prev=None):  # (B, C, *S) each, g_prev = g^s(a_t^(s-1)) -> a_t^s (B, C, *S)
        m = self.mask(p_b if g_prev is None else torch.cat([p_b, g_prev], 1))
        return m.sigmoid_() * p  # in place: the norm's backward does not read its output

# The networks: the common base, MTAN, CTAN, then the baselines STL and HPS ------------------------------------------
class UnknownOption(TypeError):
    """A keyword argument that the network does not take; the message lists those it does."""

class MultiTaskNet(nn.Module):
    """Base of every network (ours): checks the tasks, builds the encoder (``encoder``: a module or a function
    returning one, see ResNetEncoder for the protocol; default ResNet-50) and a head per task. Subclasses define
    ``features(x) -> {task: [maps, shallow first]}``; forward: x (B, C_in, *S) -> {task: (B, n_out, *S) | (B, n_out)}"""
    per_task_encoders = False  # STL: one encoder per task
    needs = ("channels",)  # what features() uses of the encoder
    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, classifier_levels=(-1,),
                 classifier_hidden=256, **unknown):
        super().__init__()
        if unknown:
            valid = [p for c in type(self).__mro__[-3::-1] for p in inspect.signature(c.__init__).parameters
                     if p not in ("self", "tasks", "in_channels", "options", "unknown")]
            raise UnknownOption(f"{type(self).__name__}: unknown option {', '.join(map(repr, unknown))}; valid: "
                                f"{', '.join(dict.fromkeys(valid))}")
        self.tasks = check_tasks(tasks)
        self.in_channels = check_arg("in_channels", in_channels, is_int, "an integer >= 1")
        self.dims = check_arg("dims", dims, lambda v: is_int(v, 2) and v <= 3, "2 or 3")
        check_arg("norm_kind", norm_kind, lambda v: v in NORMS, f"one of {NORMS}")
        check_arg("classifier_hidden", classifier_hidden, is_int, "an integer >= 1")
        if self.per_task_encoders:
            self.encoders = nn.ModuleDict({name: self.make_encoder(encoder) for name in self.tasks})
            if len(set(map(id, self.encoders.values()))) < len(self.tasks):  # a module, or a function returning one
                raise ValueError("encoder: stl builds one per task: pass a function returning a new one each call")
        else:
            self.encoder = self.make_encoder(encoder)
        self.channels = channels = list((self.encoders[next(iter(self.tasks))] if self.per_task_encoders else
                                         self.encoder).channels)
        check_arg("classifier_levels", classifier_levels, lambda v: len(v) > 0 and is_ints(v, -len(channels)) and
                  max(v) < len(channels), f"indices into the {len(channels)} maps (stem first), e.g. (-1,): the last")
        self.heads = nn.ModuleDict({name: make_head(dims, kind, channels, n, norm_kind, classifier_levels,
                                                    classifier_hidden) for name, (kind, n) in self.tasks.items()})

    def default_encoder(self):
        return ResNetEncoder(self.dims, self.in_channels)  # ResNet-50

    def make_encoder(self, encoder):
        if not isinstance(encoder, nn.Module):  # a function (a class) returning one, called without arguments
            try:
                inspect.signature(encoder or self.default_encoder).bind()
            except (TypeError, ValueError) as e:
                raise ValueError(f"encoder must be a module or a function returning one (e.g. lambda: "
                                 f"ResNetEncoder(2, 1)), got {encoder!r}: {e}") from None
            encoder = (encoder or self.default_encoder)()
        missing = [name for name in self.needs if not hasattr(encoder, name)]
        if not isinstance(encoder, nn.Module) or missing:
            problem = f"lacks {', '.join(missing)}" if missing else "is not an nn.Module"
            raise ValueError(f"encoder must be a module, or a function returning one, with {', '.join(self.needs)} "
                             f"(the protocol: ResNetEncoder): {type(encoder).__name__} {problem}")
        built = getattr(encoder, "dims", self.dims), getattr(encoder, "in_channels", self.in_channels)  # optional
        check_arg("encoder's (dims, in_channels)", built, lambda v: v == (self.dims, self.in_channels),
                  f"the model's {(self.dims, self.in_channels)}")
        return encoder

    def check(self, x):
        check_arg("x", x, lambda v: v.is_floating_point() and v.ndim == self.dims + 2 and v.size(1) == self.in_channels,
                  f"a float tensor (B, {self.in_channels}, {', '.join('DHW'[-self.dims:])}) for a {self.dims}D model")
        check_arg("spatial size", tuple(x.shape[2:]), lambda v: all(s % 2 ** len(self.channels) == 0 for s in v),
                  f"a multiple of {2 ** len(self.channels)} (the encoder halves it {len(self.channels)}x): crop or pad")

    def forward(self, x):
        self.check(x)
        feats = self.features(x)
        check_arg("encoder: its maps' channels", [[f.shape[1] for f in maps] for maps in feats.values()],
                  lambda v: all(c == self.channels for c in v), f"its channels, {self.channels}, for every task")
        return {name: self.heads[name](maps, x.shape[2:]) for name, maps in feats.items()}

class MTAN(MultiTaskNet):
    """MTAN baseline (from MTAN, its official ResNet code): a shared encoder; per task and stage a TaskAttention
    mask on the stage's shared features; a_t^(s-1) reaches stage s's mask through the transition g^s.
    ``transition``: "block" (official: one residual block per stage, shared by the tasks, stride 1, then a 2x
    max-pool where the encoder downsamples; the encoder's ``block`` class) or "conv" (ours: a strided 1x1
    conv-norm-ReLU per task, far fewer FLOPs). Task t's head reads [stem, a_t^1 .. a_t^n] (ours: U-Net skips)."""
    needs = ("channels", "stem", "pool", "stages")
    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, transition="block", **options):
        check_arg("transition", transition, lambda v: v in ("block", "conv"), "'block' (official MTAN) or 'conv'")
        self.needs = self.needs + (("block",) if transition == "block" else ())
        super().__init__(tasks, in_channels, dims, norm_kind, encoder, **options)
        enc, names = self.encoder, list(self.tasks)
        check_arg("encoder", enc, lambda v: not getattr(v, "branches", None), "one without branches (MTAN skips them)")
        blocks = [len(st) if isinstance(st, nn.Sequential) else 0 for st in enc.stages]  # 0: not an nn.Sequential
        if len(enc.channels) != len(blocks) + 1 or min(blocks, default=0) < 2:  # the masks read the next-to-last
            raise ValueError(f"depth (or encoder): mtan/ctan need stages of >= 2 blocks (nn.Sequential), channels for "
                             f"[stem, stage 1 .. n], got {blocks} blocks (0: not an nn.Sequential), {enc.channels}")
        ch = enc.channels[1:]
        self.masks = nn.ModuleDict({str(s): nn.ModuleDict({t: TaskAttention(dims, c * (1 if s == 1 else 2), c,
                                                                            norm_kind) for t in names})
                                    for s, c in enumerate(ch, 1)})
        self.transitions = nn.ModuleDict({  # g^s, into stage s
            str(s): enc.block(dims, cin, cout, 1, norm_kind) if transition == "block" else nn.ModuleDict(
                {t: nn.Sequential(*conv_norm(dims, cin, cout, 1, 2, norm_kind)) for t in names})
            for s, (cin, cout) in enumerate(zip(ch[:-1], ch[1:]), 2)})
        self.cross = nn.ModuleDict()  # {stage: exchange of the tasks' a^s}: none in MTAN, CrossTaskAttention in CTAN

    def features(self, x):  # x (B, C_in, *S) -> {task: [stem, a_t^1 .. a_t^n]}
        enc, names = self.encoder, list(self.tasks)
        stem = enc.stem(x)
        p, a, levels = enc.pool(stem), [None] * len(names), []  # a: a_t^(s-1), none before stage 1
        for s, stage in enumerate(enc.stages, 1):
            p_b = run(enc, stage[:-1], p)  # p_b^s: before the stage's last block
            p = run(enc, stage[-1], p_b)  # p^s: the stage's shared output
            if p_b.shape != p.shape or p.shape[1] != self.channels[s]:  # the masks read p_b^s and multiply p^s
                raise ValueError(f"encoder: mtan/ctan need stage {s}'s last block to keep its input's (C, *S), C = "
                                 f"channels[{s}] = {self.channels[s]}, got {[*p_b.shape[1:]]} -> {[*p.shape[1:]]}")
            if s > 1:  # g^s(a_t^(s-1)): to stage s's channels, then (official MTAN) max-pooled to its size
                g = self.transitions[str(s)]
                a = [run(enc, g[t] if isinstance(g, nn.ModuleDict) else g, a_t) for t, a_t in zip(names, a)]
                a = [y if y.shape == p.shape else (F.max_pool2d if y.dim() == 4 else F.max_pool3d)(y, 2) for y in a]
            a = [self.masks[str(s)][t](p_b, p, a_t) for t, a_t in zip(names, a)]  # a_t^s = m_t^s * p^s
            if str(s) in self.cross:
                a = self.cross[str(s)](a)  # CTAN: the tasks exchange their features
            levels.append(a)
        return {t: [stem, *a] for t, a in zip(names, zip(*levels))}

class CTAN(MTAN):
    """Cross-Task Attention Network (from the paper and its follow-up: cross-task attention between the tasks' features
    in a shared encoder, a head per task). Ours, inferred: its task features are MTAN's (masks, transitions), so CTAN is
    MTAN plus a CrossTaskAttention after each stage in ``cross_stages`` (ours: None, all; () is MTAN). The exchanged
    a_t^s flow into the next mask, the skips and the heads. The other arguments: see CrossTaskAttention."""
    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, transition="block",
                 cross_stages=None, attention_heads=4, min_head_dim=16, reduction=4, max_tokens=512, gate_init=0.1,
                 **options):
        super().__init__(tasks, in_channels, dims, norm_kind, encoder, transition, **options)
        n = len(self.encoder.stages)
        cross_stages = range(1, n + 1) if cross_stages is None else cross_stages
        check_arg("cross_stages", cross_stages, lambda v: is_ints(v) and all(s <= n for s in v),
                  f"stage numbers within 1..{n}, e.g. ({n},) for the deepest alone")
        attention = (len(self.tasks), attention_heads, min_head_dim, reduction, max_tokens, gate_init)
        for s in sorted(set(cross_stages)):
            self.cross[str(s)] = CrossTaskAttention(self.encoder.channels[s], *attention)
        with torch.device("meta"):  # its arguments checked, also where no stage has it (on "meta": no weights drawn)
            CrossTaskAttention(1, *attention)

    def get_extra_state(self):  # the task order: the attention's weights are stacked by it, not named
        return {"tasks": list(self.tasks)}
    def set_extra_state(self, state):  # a state_dict of another task order would load silently scrambled
        check_arg("state_dict tasks", state["tasks"], lambda v: v == [*self.tasks], f"the model's {[*self.tasks]}")

class STL(MultiTaskNet):
    """Single-task learning baseline (from the paper's comparison): an encoder per task, tasks meet only in the loss."""
    per_task_encoders = True
    def features(self, x):
        return {name: enc(x) for name, enc in self.encoders.items()}

class HPS(MultiTaskNet):
    """Hard parameter sharing baseline (from the paper's comparison): one shared encoder, one head per task."""
    def features(self, x):
        return dict.fromkeys(self.tasks, self.encoder(x))  # every task reads the same maps

# The shared encoder (ResNet; He et al. 2016) and the task heads ------------------------------------------------------
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
    """Shared encoder (ours, after the follow-up paper's ResNet-50): 7x7 stride-2 stem, max-pool, stage s = 1..n of
    depth[s-1] blocks and width * 2**(s-1) * expansion channels; returns [stem, stage 1 .. n] at /2, /4 .. /2^(n+1).
    ``block="basic"`` gives ResNet-34; ``checkpointing`` recomputes stages in the backward pass (3D memory).
    The encoder protocol, for an ``encoder=`` of your own: an nn.Module whose forward(x) returns the maps [stem,
    stage 1 .. n], each half the size of the last, and ``channels``, their channel counts. MTAN and CTAN run its
    parts instead: ``stem`` (x -> first map), ``pool`` (-> stage 1's input), ``stages`` (n nn.Sequential of >= 2
    blocks, the last keeping its input's shape) and, for transition="block", ``block``, a class: block(dims, cin,
    cout, stride, norm_kind). Optional: ``run(fn, *args)``, fn(*args) (checkpointing); ``dims``, ``in_channels``."""
    BLOCKS = {"bottleneck": Bottleneck, "basic": BasicBlock}
    def __init__(self, dims, in_channels, width=64, depth=(3, 4, 6, 3), block="bottleneck", norm_kind="batch",
                 checkpointing=False):
        super().__init__()
        check_arg("dims", dims, lambda v: is_int(v, 2) and v <= 3, "2 or 3")
        for name in ("in_channels", "width"):
            check_arg(name, locals()[name], is_int, "an integer >= 1")
        check_arg("depth", depth, lambda v: len(v) > 0 and is_ints(v), "blocks per stage: (3, 4, 6, 3)")
        check_arg("block", block, lambda v: v in self.BLOCKS, f"one of {tuple(self.BLOCKS)}")
        check_arg("norm_kind", norm_kind, lambda v: v in NORMS, f"one of {NORMS}")
        check_arg("checkpointing", checkpointing, lambda v: v in (True, False), "True or False")
        self.block, self.checkpointing = self.BLOCKS[block], checkpointing
        self.dims, self.in_channels = dims, in_channels
        self.branches = None  # ResFormer: a module beside each stage, outputs summed
        self.stem = nn.Sequential(*conv_norm(dims, in_channels, width, 7, 2, norm_kind))
        self.pool = (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(3, stride=2, padding=1)
        self.channels = [width] + [width * 2 ** i * self.block.expansion for i in range(len(depth))]
        self.stages = nn.ModuleList(  # stage i + 1: n blocks, the first strided (but in stage 1: the pool did it)
            nn.Sequential(*[self.block(dims, self.channels[i] if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1,
                                       norm_kind) for j in range(n)])
            for i, (n, cout) in enumerate(zip(depth, self.channels[1:])))

    def run(self, fn, *args):  # fn(*args), recomputed in the backward pass when checkpointing is on
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x):
        feats = [self.stem(x)]
        x = self.pool(feats[0])
        for i, stage in enumerate(self.stages):
            x = self.run(stage, x) if self.branches is None else self.run(stage, x) + self.run(self.branches[i], x)
            feats.append(x)
        return feats

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

    def forward(self, feats, size):  # feats: [stem, ..., deepest]; size: the input's *S -> (B, n_out, *S)
        x = feats[-1]
        for block, skip in zip(self.blocks, [*feats[-2::-1], None]):
            x = F.interpolate(x, size=size if skip is None else skip.shape[2:], mode="nearest")
            x = block(x if skip is None else torch.cat([x, skip], 1))
        with fp32(x):
            return self.out(x.to(self.out.weight.dtype))

class ImageClassifier(nn.Module):
    """Image-level head (ours; the paper's is unpublished): average pooling of the task's maps ``levels``, then an MLP.
    The MLP runs in fp32 under autocast: bf16 logits would tie scores, and so AUCs."""
    def __init__(self, channels, n_out, levels=(-1,), hidden=256, dropout=0.2):
        super().__init__()
        self.levels = tuple(levels)
        self.mlp = nn.Sequential(nn.Linear(sum(channels[i] for i in self.levels), hidden),
                                 nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, n_out))

    def forward(self, feats, size=None):  # -> (B, n_out)
        x = torch.cat([feats[i].flatten(2).mean(2) for i in self.levels], 1)
        with fp32(x):
            return self.mlp(x.to(self.mlp[0].weight.dtype))

def make_head(dims, kind, channels, n_out, norm_kind="batch", classifier_levels=(-1,), hidden=256):  # a task's head
    return (PixelDecoder(dims, channels, n_out, norm_kind) if kind == "pixel" else
            ImageClassifier(channels, n_out, classifier_levels, hidden))

# Dimension-generic layers --------------------------------------------------------------------------------------------
def conv(dims, cin, cout, k=3, stride=1, dilation=1, bias=False):  # 2D or 3D, 'same' padding for odd kernels
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, cout, k, stride, dilation * (k // 2), dilation, bias=bias)
def norm(dims, channels, kind="batch"):  # batch norm as in ResNet; group and instance norm: ours, small 3D batches
    return {"batch": lambda: (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels),
            "group": lambda: nn.GroupNorm(math.gcd(32, channels), channels),
            "instance": lambda: (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)}[kind]()
def conv_norm(dims, cin, cout, k=3, stride=1, norm_kind="batch", act=True, dilation=1):  # [conv, norm (, ReLU)]
    return [conv(dims, cin, cout, k, stride, dilation), norm(dims, cout, norm_kind)] + [nn.ReLU(inplace=True)] * act
def avg_pool(x, factor):  # average-pools each spatial axis by its factor (ceil mode), 2D or 3D
    return x if max(factor) == 1 else (F.avg_pool2d if x.dim() == 4 else F.avg_pool3d)(x, factor, ceil_mode=True)
def upsample(y, factor, size):  # avg_pool's map (B, C, *S') back to size: nearest, by factor per axis, edges cut
    return y if max(factor) == 1 else F.interpolate(y, scale_factor=factor, mode="nearest")[(..., *map(slice, size))]
def run(encoder, fn, *args):  # fn(*args) through the encoder's ``run`` (gradient checkpointing), where it has one
    return encoder.run(fn, *args) if hasattr(encoder, "run") else fn(*args)
def fp32(x):  # autocast off where x lives, for the heads' output layers (ours); on "meta": none
    return torch.autocast("cpu" if x.device.type == "meta" else x.device.type, enabled=False)

# MFE-UNet (Bui, Le, Bum, Choo, arXiv 2412.00351) ---------------------------------------------------------------------
def window_partition(x, window):  # (B, C, *S), S divisible by window -> (B * n_windows, prod(window), C), the grid
    b, c, *s = x.shape
    grid = [n // w for n, w in zip(s, window)]
    x = x.reshape(b, c, *[v for g, w in zip(grid, window) for v in (g, w)])
    x = x.permute(0, *range(2, 2 * len(s) + 2, 2), *range(3, 2 * len(s) + 3, 2), 1)  # b, c, g1, w1.. -> b, g.., w.., c
    return x.reshape(-1, math.prod(window), c), grid

def window_merge(tokens, grid, window, batch):  # the inverse of window_partition
    d, c = len(grid), tokens.shape[-1]
    x = tokens.reshape(batch, *grid, *window, c)
    x = x.permute(0, 2 * d + 1, *[v for i in range(d) for v in (1 + i, 1 + d + i)])
    return x.reshape(batch, c, *[g * w for g, w in zip(grid, window)])

class WindowTransformer(nn.Module):
    """Transformer branch of a ResFormer stage (from MFE-UNet: attention beside the convolutional stage, outputs
    summed): pre-norm multi-head self-attention in windows of ``window`` voxels per side (linear cost at the large
    stages), then an MLP. Ours, to stay short: one block per stage, no shifted windows or relative position bias
    (the official code has two Swin blocks), and a strided 1x1 projection in place of patch merging."""
    def __init__(self, dims, cin, cout, stride, heads=4, window=8, mlp_ratio=2):
        super().__init__()
        self.attention_heads, self.window = heads, window
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
        q, k, v = self.qkv(self.norm1(t)).unflatten(2, (3, self.attention_heads, -1)).permute(2, 0, 3, 1, 4)
        t = t + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        t = t + self.mlp(self.norm2(t))
        return window_merge(t, grid, window, b)[(slice(None), slice(None), *[slice(0, n) for n in s])]

class ResFormerEncoder(ResNetEncoder):
    """ResFormer encoder (from MFE-UNet): ResNet-34 basic-block stages (64/128/256/512 at width 64), each with a
    window-attention transformer branch of ``attention_heads`` heads alongside; the two outputs are summed."""
    def __init__(self, dims, in_channels, width=64, depth=(3, 4, 6, 3), norm_kind="batch", attention_heads=4,
                 window=8, checkpointing=False):
        super().__init__(dims, in_channels, width, depth, "basic", norm_kind, checkpointing)
        check_arg("attention_heads", attention_heads, lambda v: is_int(v) and all(c % v == 0 for c in self.channels),
                  f"an integer >= 1 that divides every stage's channels {self.channels[1:]}")
        check_arg("window", window, is_int, "an integer >= 1")
        self.branches = nn.ModuleList(
            WindowTransformer(dims, self.channels[i], self.channels[i + 1], 1 if i == 0 else 2, attention_heads,
                              window) for i in range(len(depth)))

class DilatedFeatureEnhancement(nn.Module):
    """DFE skip refinement (from MFE-UNet): a 1x1 and 3x3 branches dilated 6, 12, 18, concatenated, fused by conv +
    BN, plus a 1x1 shortcut, ReLU, then CBAM: y * sigmoid(conv7x7([mean_c y ; max_c y])). Branch width C/4: ours."""
    def __init__(self, dims, channels, dilations=(6, 12, 18), norm_kind="batch"):
        super().__init__()
        mid = max(1, channels // 4)
        self.branches = nn.ModuleList(nn.Sequential(*conv_norm(dims, channels, mid, 1 if d == 1 else 3, 1, norm_kind,
                                                               dilation=d)) for d in (1, *dilations))
        self.fuse = nn.Sequential(*conv_norm(dims, mid * len(self.branches), channels, 1, 1, norm_kind, act=False))
        self.shortcut, self.spatial = conv(dims, channels, channels, 1), conv(dims, 2, 1, 7, bias=True)

    def forward(self, x):
        y = F.relu(self.fuse(torch.cat([b(x) for b in self.branches], 1)) + self.shortcut(x))
        return y * torch.sigmoid(self.spatial(torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)))

class MFEUNet(MultiTaskNet):
    """MFE-UNet (from that paper): a shared ResFormer encoder, skips refined by DFE modules (shared by the decoders),
    a U-Net decoder per pixel-level task, image-level heads on the last two stages pooled, then FC 32 (the official
    head has no activation between its linear layers; ours reuses ``ImageClassifier``, ReLU and dropout there)."""
    def __init__(self, tasks, in_channels, dims=2, norm_kind="batch", encoder=None, dilations=(6, 12, 18),
                 classifier_levels=(-2, -1), classifier_hidden=32, **options):
        check_arg("dilations", dilations, is_ints, "a tuple of integers >= 1, e.g. (6, 12, 18)")
        super().__init__(tasks, in_channels, dims, norm_kind, encoder, classifier_levels, classifier_hidden, **options)
        self.pixel_tasks = [name for name, (kind, _) in self.tasks.items() if kind == "pixel"]
        self.dfe = nn.ModuleList(DilatedFeatureEnhancement(dims, c, dilations, norm_kind)
                                 for c in (self.encoder.channels[:-1] if self.pixel_tasks else []))

    def default_encoder(self):
        return ResFormerEncoder(self.dims, self.in_channels)

    def features(self, x):
        feats = self.encoder(x)
        refined = [dfe(f) for dfe, f in zip(self.dfe, feats)] + [feats[-1]]  # decoders read refined skips
        return {name: refined if name in self.pixel_tasks else feats for name in self.tasks}

# Deep multimodal guidance (Mallya, Hamarneh, MICCAI 2022), for dose prediction ---------------------------------------
class GuidanceNetwork(nn.Module):
    """G: maps the inferior model's encoder features to the superior model's (from the guidance paper, there an MLP
    on one latent; ours for dense features: per encoder scale a 1x1-conv, ReLU, dropout, 1x1-conv network)."""
    def __init__(self, dims, channels, dropout=0.1):
        super().__init__()
        self.channels = check_arg("channels", channels, is_ints, "the encoder's channel counts, e.g. model.channels")
        check_arg("dropout", dropout, lambda v: is_real(v) and 0 <= v < 1, "a probability in [0, 1)")
        self.maps = nn.ModuleList(nn.Sequential(
            conv(dims, c, c, 1, bias=True), nn.ReLU(inplace=True),
            (nn.Dropout2d if dims == 2 else nn.Dropout3d)(dropout), conv(dims, c, c, 1, bias=True))
            for c in channels)

    def forward(self, feats):  # the inferior's maps [(B, C_i, *S_i)] -> G's predictions of the superior's, same shapes
        check_arg("G's input", [f.shape[1] for f in feats], lambda v: v == [*self.channels], f"maps of {self.channels} "
                  "channels (those G was built for)")
        return [g(f) for g, f in zip(self.maps, feats)]

class Frozen(nn.Module):
    """Base of the guided models (ours): the children named in ``frozen`` get no gradients and stay in eval mode."""
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
        check_arg("inferior", inferior, lambda v: isinstance(v, STL), "an STL model (its encoders, one per task)")
        check_arg("superior", superior, lambda v: isinstance(v, STL) and v.tasks == inferior.tasks and
                  v.channels == inferior.channels, "an STL model of the inferior's tasks and encoder channels")
        self.inferior, self.superior, self.guidance = inferior, superior, guidance
        self.train()

    def forward(self, x):  # {"guidance": (B,) MSE}
        self.superior.check(x)
        with torch.no_grad():
            f_inf = self.inferior.features(x[:, :self.inferior.in_channels])
            f_sup = self.superior.features(x)
        pairs = [(g, t) for name in f_inf for g, t in zip(self.guidance(f_inf[name]), f_sup[name])]
        return {"guidance": sum((g.float() - t.float()).square().flatten(1).mean(1) for g, t in pairs) / len(pairs)}

class GuidedModel(Frozen):
    """The guided model, stage (c) or (d) of the guidance method: the frozen inferior model reads the CT alone and
    the frozen G predicts the superior model's features from it. With the superior model's ``heads`` (c) they decode
    G(f); without (d) new heads, the only trained part, decode [f ; G(f)]."""
    def __init__(self, inferior, guidance, heads=None):
        super().__init__()
        self.frozen = ("inferior", "guidance") + ("heads",) * (heads is not None)  # (c): nothing to train
        check_arg("inferior", inferior, lambda v: isinstance(v, STL), "an STL model (its encoders, one per task)")
        self.inferior, self.guidance, self.combine = inferior, guidance, heads is None
        self.in_channels, self.dims, self.tasks = inferior.in_channels, inferior.dims, inferior.tasks
        check_arg("heads", heads, lambda v: v is None or set(v) == set(self.tasks), "None (d) or superior.heads (c)")
        self.heads = heads or nn.ModuleDict({name: make_head(self.dims, kind, [2 * c for c in inferior.channels], n)
                                             for name, (kind, n) in self.tasks.items()})
        self.train()

    def forward(self, x):
        self.inferior.check(x)
        feats = {name: (f, self.guidance(f)) for name, f in self.inferior.features(x).items()}  # (f, G(f))
        return {name: head([torch.cat(p, 1) for p in zip(*feats[name])] if self.combine else feats[name][1],
                           x.shape[2:]) for name, head in self.heads.items()}

# Task weighting -------------------------------------------------------------------------------------------------------
class Weighting(nn.Module):
    """Task weighting: the task losses {task: scalar} -> one loss, by the named paper's scheme; tasks as the network's.
    equal: the plain sum (ours: the CTAN paper's weighting is not known to us).
    dwa: Dynamic Weight Average (MTAN): w_t = T softmax_t(r_t / temperature), r_t = L_t(e-1) / L_t(e-2), the mean
         training losses of the last two epochs (w = 1 before): call ``end_epoch`` with each epoch's (in the state).
    uncertainty: Kendall, Gal, Cipolla (2018): sum_t exp(-l_t) L_t / 2 + l_t / 2 (their regression form; ours for
         every task), l_t a learnt log variance: give ``weighting.parameters()`` to the optimiser (else w_t stays 0.5).
    mfe: MFE-UNet's L_seg + 0.25 L_cls: weight 1 for pixel-level tasks, 0.25 for image-level ones."""
    METHODS = ("equal", "dwa", "uncertainty", "mfe")
    def __init__(self, method, tasks, temperature=2.0):
        super().__init__()
        check_arg("method", method, lambda v: v in self.METHODS, f"one of {self.METHODS}")
        check_arg("tasks", tasks, lambda v: v and all(len(s) == 2 and (method != "mfe" or s[0] in TASK_KINDS) for s in
                  v.values()), f"{{name: (kind, n_out)}}, mfe: {TASK_KINDS}")
        check_arg("temperature", temperature, lambda v: is_real(v) and v > 0, "a positive number")
        self.method, self.tasks, self.temperature = method, list(tasks), temperature
        self.image_tasks = {name for name, (kind, _) in tasks.items() if kind == "image"}
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks))) if method == "uncertainty" else None
        self.history = []  # mean training loss per task, one list per finished epoch (DWA)

    def weights(self):  # the current weight w_t of each task (uncertainty: exp(-l_t) / 2)
        if self.method == "uncertainty":
            return dict(zip(self.tasks, (0.5 * torch.exp(-self.log_vars)).tolist()))
        if self.method == "dwa" and len(self.history) >= 2:
            ratio = torch.tensor(self.history[-1]) / torch.tensor(self.history[-2]).clamp_min(1e-12)
            return dict(zip(self.tasks, (len(self.tasks) * torch.softmax(ratio / self.temperature, 0)).tolist()))
        return {t: 0.25 if self.method == "mfe" and t in self.image_tasks else 1.0 for t in self.tasks}

    def forward(self, losses):
        check_arg("losses", losses, lambda v: v.keys() == set(self.tasks) and
                  all(torch.is_tensor(l) and l.numel() == 1 for l in v.values()), f"{{task: loss}} for {self.tasks}, "
                  "each a tensor of one value (a float has no gradient)")
        if self.method == "uncertainty":
            return sum(0.5 * torch.exp(-l_t) * losses[t] + 0.5 * l_t for t, l_t in zip(self.tasks, self.log_vars))
        return sum(w * losses[t] for t, w in self.weights().items())

    def end_epoch(self, mean_losses):
        check_arg("mean_losses", mean_losses, lambda v: v.keys() == set(self.tasks) and
                  all(torch.as_tensor(l).numel() == 1 for l in v.values()), f"{{task: loss}} for {self.tasks}, "
                  "one number each: the epoch's mean")
        self.history.append([float(torch.as_tensor(mean_losses[t])) for t in self.tasks])

    def get_extra_state(self):  # the task order too: log_vars and history are by position
        return {"history": self.history, "tasks": self.tasks}
    def set_extra_state(self, state):
        check_arg("state_dict tasks", state.get("tasks"), lambda v: v == self.tasks, f"this weighting's {self.tasks}")
        self.history = [list(h) for h in state["history"]]

# Checks and the factory ----------------------------------------------------------------------------------------------
def is_int(v, low=1):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low
def is_ints(v, low=1):
    return isinstance(v, (tuple, list, range)) and all(is_int(i, low) for i in v)
def is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
def check_arg(name, value, ok, valid):  # value if ok(value), else one ValueError naming the argument and its range
    try:
        if ok(value):
            return value
    except (TypeError, AttributeError, RuntimeError):  # e.g. len() of a number, .values() of a list, a None tensor
        pass
    got = (f"{type(value).__name__} {value.dtype} {tuple(value.shape)}" if hasattr(value, "dtype") else
           type(value).__name__ if isinstance(value, nn.Module) else repr(value))  # one line: no values, no tree
    got = got if "\n" not in got and len(got) <= 200 else type(value).__name__  # e.g. a list of tensors
    raise ValueError(f"{name} must be {valid}, got {got}")

def check_tasks(tasks):  # {name: (kind, n_out)}: names are strings, kind "pixel" or "image", n_out an integer >= 1
    spec = f"(kind, n_out) with kind in {TASK_KINDS} and n_out >= 1 (an integer)"
    check_arg("tasks", tasks, lambda v: isinstance(v, dict) and v, f"{{name: {spec}}}, e.g. {{'dose': ('pixel', 1)}}")
    for name, value in tasks.items():
        check_arg("task names", name, lambda v: v and "." not in v and not hasattr(nn.ModuleDict(), v),
                  "strings without '.' that are not attributes of nn.ModuleDict (such as 'type', 'keys', 'training')")
        check_arg(f"tasks[{name!r}]", value,
                  lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and v[0] in TASK_KINDS and is_int(v[1]), spec)
    return {name: (kind, int(n)) for name, (kind, n) in tasks.items()}

NETWORKS = {"stl": STL, "hps": HPS, "mtan": MTAN, "ctan": CTAN, "mfe": MFEUNet}

def build_model(arch, tasks, in_channels, dims=2, width=64, depth=(3, 4, 6, 3), block="bottleneck",
                norm_kind="batch", checkpointing=False, encoder=None, **options):
    """Any network of this file. arch: one of ``ARCHS``; tasks: {name: (kind, n_out)}, kind "pixel" or "image";
    dims: 2 or 3; width, depth, block: the residual encoder (ResNet-50 by default; ``mfe`` always uses basic
    blocks, i.e. ResNet-34, and takes ``window`` and ``attention_heads``), or ``encoder``: your own (a module or a
    function returning one; see ResNetEncoder for the protocol). Other keyword options go to the network's class
    (MTAN: ``transition``; CTAN: also ``cross_stages``, ``attention_heads``, ``max_tokens``, ...)."""
    check_arg("arch", arch, lambda v: v in NETWORKS, f"one of {', '.join(ARCHS)}")
    check_arg("block", block, lambda v: v in ResNetEncoder.BLOCKS, f"one of {tuple(ResNetEncoder.BLOCKS)} (mfe: basic)")
    default_depth = isinstance(depth, (tuple, list)) and list(depth) == [3, 4, 6, 3]  # a bad depth: its own message
    if encoder is not None and (width, default_depth, block, checkpointing) != (64, True, "bottleneck", False):
        raise ValueError("width, depth, block, checkpointing: set them on your encoder=, build_model's are for its own")
    enc = dict(width=width, depth=depth, norm_kind=norm_kind, checkpointing=checkpointing)
    if arch == "mfe" and encoder is None:  # its encoder's options (with your encoder=, they are refused)
        enc.update({k: options.pop(k) for k in ("attention_heads", "window") if k in options})
    ours = ((lambda: ResFormerEncoder(dims, in_channels, **enc)) if arch == "mfe" else
            (lambda: ResNetEncoder(dims, in_channels, block=block, **enc)))
    try:
        return NETWORKS[arch](tasks, in_channels, dims, norm_kind, ours if encoder is None else encoder, **options)
    except UnknownOption as e:  # build_model's own options are valid too
        raise UnknownOption(f"build_model: {e}" + ", and width, depth, block, checkpointing" * (encoder is None) +
                            ", attention_heads, window" * (arch == "mfe" and encoder is None)) from None
