"""Tests for ctan.py, data.py and train.py (CPU, tiny shapes): `python -m pytest -q test_ctan.py`.

The real-data tests read ../shared/data/openkbp (20 OpenKBP patients) and ../shared/data/ham10000 ($OPENKBP_SAMPLE,
$HAM10000_SAMPLE) and are skipped where they are absent."""
import ast
import csv
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import ctan
import data
import train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions: one thread is faster, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ============================================================================================
# ctan.py: the networks
# ============================================================================================
TINY = dict(width=4, depth=(2, 2, 2, 2))
TASK_MIXES = {
    "pixel+pixel": {"dose": ("pixel", 1), "structures": ("pixel", 3)},
    "pixel+image": {"segmentation": ("pixel", 1), "diagnosis": ("image", 7)},
    "image+image": {"covid": ("image", 2), "severe": ("image", 2)},
    "three": {"dose": ("pixel", 1), "structures": ("pixel", 2), "grade": ("image", 3)},
}
# 2D: 64 x 64, batch 2, four stages (the bottleneck keeps 2 x 2 tokens: with a single key, attention ignores its
# query). 3D volumes are slow on a CPU: 32^3, batch 1, two stages (down to 4^3, so batch norm has 64 values).
SIZES = {2: (2, (64, 64)), 3: (1, (32, 32, 32))}


def tiny_model(arch, tasks, dims=2, in_channels=2, **options):
    torch.manual_seed(0)
    return ctan.build_model(arch, tasks, in_channels, dims, **{**TINY, **options})


def tiny_input(dims, in_channels=2, batch=2, size=32):
    torch.manual_seed(1)
    return torch.randn(batch, in_channels, *[size] * dims)


def sized_input(dims, in_channels=2):
    torch.manual_seed(1)
    batch, size = SIZES[dims]
    return torch.randn(batch, in_channels, *size)


def two_stages(arch):
    """Options for a two-stage encoder (and CTAN's cross-task attention at both stages)."""
    return {"depth": (2, 2), **({"cross_stages": (1, 2)} if arch == "ctan" else {})}


def fewest_stages(arch):
    """The smallest encoder that runs every code path: two stages for MTAN and CTAN (transitions), else one."""
    return two_stages(arch) if arch in ("mtan", "ctan") else {"depth": (2,)}


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def sized_model(arch, tasks, dims, in_channels=2, **options):
    """tiny_model with two stages in 3D."""
    return tiny_model(arch, tasks, dims, in_channels, **{**(two_stages(arch) if dims == 3 else {}), **options})


# Each arch once in 2D and once in 3D; every task mix and both MTAN/CTAN transitions appear.
CASES = [("stl", 2, "pixel+pixel", {}), ("hps", 2, "three", {}), ("mtan", 2, "pixel+image", {}),
         ("ctan", 2, "three", {}), ("ctan", 2, "pixel+pixel", {"transition": "conv"}), ("mfe", 2, "image+image", {}),
         ("stl", 3, "image+image", {}), ("hps", 3, "pixel+pixel", {}), ("mtan", 3, "three", {"transition": "conv"}),
         ("ctan", 3, "pixel+image", {}), ("mfe", 3, "pixel+image", {})]


def test_cases_cover_every_arch_in_both_dims_and_every_task_mix():
    assert {(arch, dims) for arch, dims, _, _ in CASES} == {(a, d) for a in ctan.ARCHS for d in (2, 3)}
    assert {mix for _, _, mix, _ in CASES} == set(TASK_MIXES)
    assert {(arch, options.get("transition")) for arch, _, _, options in CASES} >= {(a, t) for a in ("mtan", "ctan")
                                                                                 for t in (None, "conv")}


@pytest.mark.parametrize("arch, dims, mix, options", CASES, ids=[f"{a}-{d}d-{m}-{o}" for a, d, m, o in CASES])
def test_shapes_and_gradients_reach_every_parameter(arch, dims, mix, options):
    tasks = TASK_MIXES[mix]
    model, x = sized_model(arch, tasks, dims, **options), sized_input(dims)
    out = model(x)
    assert set(out) == set(tasks)
    for name, (kind, n) in tasks.items():
        expected = (x.shape[0], n, *x.shape[2:]) if kind == "pixel" else (x.shape[0], n)
        assert tuple(out[name].shape) == expected, name
    sum(o.square().mean() for o in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{arch}: no finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"{arch}: zero gradient for {name}"


@pytest.mark.parametrize("dims", [2, 3])
def test_official_mtan_transition_is_one_shared_block_then_max_pool_and_conv_is_per_task(dims):
    """transition="block" (the default, official MTAN): per stage one Bottleneck shared by the tasks, stride 1 with
    a 1x1 projection shortcut, then a 2x max-pool; "conv" (ours): a strided 1x1 conv-norm-ReLU per task."""
    with torch.device("meta"):
        light, block = (ctan.build_model("ctan", TWO, 1, dims, transition=t, **TINY) for t in ("conv", "block"))
    assert ctan.build_model("mtan", TWO, 1, dims, **TINY).transitions.keys() == block.transitions.keys()
    assert list(block.transitions) == ["2", "3", "4"]  # g^s feeds stage s
    for s, g in block.transitions.items():
        assert type(g) is ctan.Bottleneck and g.body[3].stride == (1,) * dims
        assert g.shortcut[0].kernel_size == g.shortcut[0].stride == (1,) * dims
        assert g.shortcut[0].in_channels == block.encoder.channels[int(s) - 1]
    step = light.transitions["2"]["diagnosis"]
    assert isinstance(step[0], (torch.nn.Conv2d, torch.nn.Conv3d)) and step[0].kernel_size == (1,) * dims
    assert step[0].stride == (2,) * dims and count_parameters(light) < count_parameters(block)
    # the shared block sees each task's a^(s-1) on its own (batch statistics per task), then a 2x max-pool
    model, seen = tiny_model("mtan", TWO).train(), []
    model.transitions["3"].register_forward_hook(lambda m, inp, out: seen.append((inp[0].shape, out.shape)))
    model(tiny_input(2, size=64))
    assert seen == [((2, 32, 8, 8), (2, 64, 8, 8))] * 2  # then pooled to stage 3's 4 x 4


def grads(model, x, task):
    """Gradient of one task's output w.r.t. every parameter (0 where the output does not depend on it); the
    cross-task attention's stacked weights (T, ...) split per task as NAME[t]."""
    out = model(x)[task].square().mean()
    params = dict(model.named_parameters())
    g = torch.autograd.grad(out, list(params.values()), allow_unused=True)
    g = {n: torch.zeros_like(p) if gi is None else gi for (n, p), gi in zip(params.items(), g)}
    g.update({f"{n}[{t}]": gi[t] for n, gi in list(g.items()) if n.startswith("cross.") for t in range(len(gi))})
    return {n: gi.abs().sum().item() > 0 for n, gi in g.items()}


def reaches(g, prefix):
    return any(v for n, v in g.items() if n.startswith(prefix))


TWO = {"dose": ("pixel", 1), "diagnosis": ("image", 3)}


def test_stl_tasks_are_independent():
    model = tiny_model("stl", TWO)
    g = grads(model, tiny_input(2), "dose")
    assert reaches(g, "encoders.dose.") and not reaches(g, "encoders.diagnosis.")
    assert reaches(g, "heads.dose.") and not reaches(g, "heads.diagnosis.")


@pytest.mark.parametrize("arch", ["hps", "mtan", "mfe"])
def test_both_tasks_reach_the_shared_encoder(arch):
    model = tiny_model(arch, TWO)
    for task in TWO:
        g = grads(model, tiny_input(2), task)
        assert all(g[n] for n in g if n.startswith("encoder.stem.")), task
        assert reaches(g, "encoder.stages.3."), task


def task_branch(task):
    """Parameter-name prefixes of one task's own MTAN/CTAN branch: its masks at stages 1-4."""
    return tuple(f"masks.{s}.{task}." for s in range(1, 5))


@pytest.mark.parametrize("transition", ["block", "conv"])
def test_ctan_cross_task_attention_carries_information_between_tasks(transition):
    x = tiny_input(2, size=64)  # 2 x 2 tokens at stage 4: with one key, attention would ignore its query
    g = grads(tiny_model("ctan", TWO, transition=transition), x, "dose")
    assert all(reaches(g, p) for p in task_branch("diagnosis")), "dose does not depend on the diagnosis branch"
    assert reaches(g, "cross.4.w_kv[1]") and reaches(g, "cross.4.w_q[0]"), "diagnosis keys do not reach dose"
    assert not reaches(g, "cross.4.w_q[1]") and not reaches(g, "cross.4.w_kv[0]")  # the last stage: one way
    # Switching cross-task attention off removes the dependence (and then CTAN is MTAN).
    for arch, options in [("ctan", {"cross_stages": ()}), ("mtan", {})]:
        g = grads(tiny_model(arch, TWO, transition=transition, **options), x, "dose")
        assert not any(reaches(g, p) for p in task_branch("diagnosis")), arch
        assert all(reaches(g, p) for p in task_branch("dose"))


@pytest.mark.parametrize("transition", ["block", "conv"])
def test_ctan_without_cross_attention_is_mtan(transition):
    x = tiny_input(2)
    a = tiny_model("mtan", TWO, transition=transition).eval()
    rng = torch.get_rng_state()
    b = tiny_model("ctan", TWO, cross_stages=(), transition=transition).eval()  # the same seed: the same weights
    assert torch.equal(torch.get_rng_state(), rng)  # and the same draws after them (data order, dropout)
    for name, y in a(x).items():
        torch.testing.assert_close(b(x)[name], y)


def test_cross_attention_only_at_chosen_stages():
    model = tiny_model("ctan", TWO, cross_stages=(4,))
    assert list(model.cross) == ["4"]
    g = grads(model, tiny_input(2), "dose")
    # Only the bottleneck exchanges: the diagnosis branch reaches dose through its stage-4 mask alone.
    assert reaches(g, "masks.4.diagnosis.") and reaches(g, "cross.4.w_kv[1]")


def test_mtan_masks_lie_in_unit_interval_and_multiply_shared_features():
    """m_t^s reads p_b^s (the input of the stage's last block) and multiplies p^s (that block's output)."""
    model = tiny_model("mtan", TWO).eval()
    seen, blocks = [], {}
    for s in "1234":
        last_block = model.encoder.stages[int(s) - 1][-1]
        last_block.register_forward_hook(lambda m, inp, out, s=s: blocks.update({s: (inp[0], out)}))
        for t in TWO:
            model.masks[s][t].register_forward_hook(lambda m, inp, out, s=s: seen.append((s, inp[:2], torch.sigmoid(
                m.mask(inp[0] if inp[2] is None else torch.cat([inp[0], inp[2]], 1))), out)))
    model(tiny_input(2))
    layers = model.masks["2"]["dose"].mask  # sigmoid(norm(conv1x1(ReLU(norm(conv1x1(.))))))
    assert [type(m).__name__ for m in layers] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    assert {layers[i].kernel_size for i in (0, 3)} == {(1, 1)}
    assert len(seen) == 8
    for s, (p_b, p), mask, out in seen:
        assert (p_b is blocks[s][0], p is blocks[s][1]) == (True, True), f"stage {s}"
        assert mask.min() > 0 and mask.max() < 1
        torch.testing.assert_close(out, mask * p)


@pytest.mark.parametrize("arch", ["mtan", "ctan"])
def test_task_features_flow_into_the_next_mask_the_skips_and_the_heads(arch):
    """Each task's a_t^s (CTAN: after the exchange) feeds its head ([stem, a_t^1 .. a_t^n]) and, through the shared
    transition g^(s+1) and a 2x max-pool, the next stage's mask; CTAN exchanges after every stage by default."""
    model, x = tiny_model(arch, TWO).eval(), tiny_input(2)
    assert list(model.cross) == ([] if arch == "mtan" else ["1", "2", "3", "4"])
    final, into_g, out_g, g_prev, heads, stem = {}, {}, {}, {}, {}, []
    model.encoder.stem.register_forward_hook(lambda m, inp, out: stem.append(out))
    for s in "1234":
        if arch == "ctan":
            model.cross[s].register_forward_hook(lambda m, inp, out, s=s: final.update(zip([(s, t) for t in TWO], out)))
        for t in TWO:
            if arch == "mtan":
                model.masks[s][t].register_forward_hook(lambda m, inp, out, s=s, t=t: final.update({(s, t): out}))
            model.masks[s][t].register_forward_hook(lambda m, inp, out, s=s, t=t: g_prev.update({(s, t): inp[2]}))
        if s != "1":  # g^s runs once per task, in task order
            model.transitions[s].register_forward_hook(lambda m, inp, out, s=s: into_g.setdefault(s, []).append(inp[0]))
            model.transitions[s].register_forward_hook(lambda m, inp, out, s=s: out_g.setdefault(s, []).append(out))
    for t in TWO:
        model.heads[t].register_forward_pre_hook(lambda m, inp, t=t: heads.update({t: inp[0]}))
    model(x)
    for t_index, t in enumerate(TWO):
        assert heads[t][0] is stem[0] and all(heads[t][int(s)] is final[s, t] for s in "1234")
        for s in "234":
            assert into_g[s][t_index] is final[str(int(s) - 1), t]
            torch.testing.assert_close(g_prev[s, t], torch.nn.functional.max_pool2d(out_g[s][t_index], 2),
                                       rtol=0, atol=0)


def test_ctan_with_the_gate_at_zero_is_mtan():
    """gamma_t = gate_init at the start; at 0 cross-task attention adds nothing, and CTAN (whose other weights draw
    as MTAN's, the attention last) gives MTAN's outputs bit for bit."""
    assert torch.equal(ctan.CrossTaskAttention(8, 3, gate_init=0.3).gate, torch.full((3, 1, 1), 0.3))
    x = tiny_input(2)
    mtan, ctan0 = tiny_model("mtan", TWO).eval(), tiny_model("ctan", TWO, gate_init=0.0).eval()
    for name, out in mtan(x).items():
        assert torch.equal(ctan0(x)[name], out), name
    assert not torch.equal(tiny_model("ctan", TWO).eval()(x)["dose"], mtan(x)["dose"])


def test_cross_attention_parameters_are_the_stacked_projections_and_the_gate():
    """W_q^t, b_q^t, W_kv^t (no bias), W_o^t, b_o^t, gamma_t per task, stacked over the T tasks; LN has no affine."""
    att = ctan.CrossTaskAttention(64, 3)  # D = 16, one head
    shapes = {n: tuple(p.shape) for n, p in att.named_parameters()}
    assert shapes == {"w_q": (3, 64, 16), "b_q": (3, 1, 16), "w_kv": (3, 64, 32), "w_o": (3, 16, 64),
                      "b_o": (3, 1, 64), "gate": (3, 1, 1)}
    assert not list(att.buffers()) and not list(att.children())


def reference_cross_attention(att, feats, factor):
    """CrossTaskAttention written out plainly: per task, pool, normalise, project, attend, upsample, add."""
    F = torch.nn.functional
    pool = lambda f: (F.avg_pool2d if f.dim() == 4 else F.avg_pool3d)(f, factor, ceil_mode=True) if factor > 1 else f
    tok = lambda t, f: F.layer_norm(f.flatten(2).transpose(1, 2), f.shape[1:2])
    linear = lambda w, b, t, x: x @ w[t] + (0 if b is None else b[t])
    heads = lambda x: x.unflatten(2, (att.attention_heads, -1)).transpose(1, 2)
    out = []
    for t, f in enumerate(feats):
        fq = pool(f)
        kv = torch.cat([linear(att.w_kv, None, s, tok(s, pool(g))) for s, g in enumerate(feats) if s != t], 1)
        k, v = kv.chunk(2, -1)
        a = F.scaled_dot_product_attention(heads(linear(att.w_q, att.b_q, t, tok(t, fq))), heads(k), heads(v))
        a = linear(att.w_o, att.b_o, t, a.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(fq.shape)
        up = torch.nn.functional.interpolate(a, scale_factor=factor, mode="nearest")
        out.append(f + att.gate[t] * up[(..., *map(slice, f.shape[2:]))])  # each block gets its own token's update
    return out


def test_cross_task_attention_gives_every_head_at_least_min_head_dim_values():
    """D = channels // reduction in up to attention_heads heads of >= min_head_dim values (width 16's stages: 1, 2,
    4, 4 heads); where even one head would get fewer, one head takes all of D."""
    for channels, heads, inner in ((64, 1, 16), (128, 2, 32), (256, 4, 64), (512, 4, 128), (8, 1, 2)):
        att = ctan.CrossTaskAttention(channels, 2)
        assert (att.attention_heads, att.inner) == (heads, inner)
    att = ctan.CrossTaskAttention(100, 2, attention_heads=3, min_head_dim=8)  # D = 25 rounded down to 3 heads of 8
    assert (att.attention_heads, att.inner) == (3, 24)


def test_cross_task_attention_pools_each_axis_within_its_size():
    """An anisotropic 3D map (64 x 2 x 2, at most 8 tokens) pools the long axis by 8 and the short ones by 2."""
    att = ctan.CrossTaskAttention(16, 2, max_tokens=8)
    assert att.pool_factor((64, 2, 2)) == (8, 2, 2)
    a = [torch.randn(1, 16, 64, 2, 2) for _ in range(2)]
    assert [o.shape for o in att(a)] == [x.shape for x in a]


@pytest.mark.parametrize("shape, factor", [((2, 8, 32, 32), 4), ((2, 8, 8, 8), 1), ((1, 8, 10, 40), 4),
                                           ((1, 8, 8, 8, 16), 4)])
def test_cross_task_attention_pools_to_bounded_tokens_and_matches_the_plain_formula(shape, factor):
    """Every task's tokens (queries, keys, values) are pooled by powers of 2 to at most max_tokens; the computation
    equals the plain per-task formula, in 2D and 3D (including 10 x 40 pooled to 3 x 10, which does not divide the
    map: the update of the last block, 2 rows, is that of the token pooled from those 2 rows)."""
    torch.manual_seed(0)
    att = ctan.CrossTaskAttention(channels=8, n_tasks=3, attention_heads=2, min_head_dim=1, max_tokens=64,
                                  gate_init=0.5)
    assert att.attention_heads == 2  # two heads of 1 value: the formula is checked with more than one head
    assert att.pool_factor(shape[2:]) == (factor,) * (len(shape) - 2) and att.pool_factor((16, 16, 16)) == (4, 4, 4)
    assert ctan.CrossTaskAttention(8, 2, max_tokens=None).pool_factor((64, 64, 64)) == (1, 1, 1)  # None: no limit
    feats = [torch.randn(shape) for _ in range(3)]
    out = att(feats)
    assert all(o.shape == f.shape for o, f in zip(out, feats))
    for a, b in zip(out, reference_cross_attention(att, feats, factor)):
        torch.testing.assert_close(a, b)
    if shape[2] % factor == 0:  # the update is constant over each pooled block
        block = (out[0] - feats[0])[(..., *[slice(0, factor)] * (len(shape) - 2))]
        assert torch.allclose(block, block[(..., *[slice(0, 1)] * (len(shape) - 2))].expand_as(block), atol=1e-6)


def test_window_partition_round_trips():
    for shape, window in [((2, 3, 8, 12), [4, 4]), ((1, 2, 4, 8, 6), [2, 4, 3])]:
        x = torch.randn(shape)
        tokens, grid = ctan.window_partition(x, window)
        assert tokens.shape == (x.shape[0] * torch.tensor(grid).prod().item(), torch.tensor(window).prod().item(),
                                x.shape[1])
        torch.testing.assert_close(ctan.window_merge(tokens, grid, window, x.shape[0]), x)
    # the first window holds exactly the top-left block
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    tokens, _ = ctan.window_partition(x, [2, 2])
    assert tokens[0, :, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


def test_mfe_classifier_reads_last_two_stages_and_dfe_dilations():
    with torch.device("meta"):
        model = ctan.build_model("mfe", TWO, 1, **TINY)
    head = model.heads["diagnosis"]
    assert head.levels == (-2, -1) and head.mlp[0].out_features == 32
    assert head.mlp[0].in_features == sum(model.encoder.channels[-2:])
    assert [b[0].dilation[0] for b in model.dfe[0].branches] == [1, 6, 12, 18]
    assert all(type(b).__name__ == "BasicBlock" for stage in model.encoder.stages for b in stage)


def test_mfe_refined_skips_go_to_every_decoder_and_raw_maps_to_the_image_heads():
    model, x, seen = tiny_model("mfe", TASK_MIXES["three"], **two_stages("mfe")).eval(), tiny_input(2), {}
    model.encoder.register_forward_hook(lambda m, inp, out: seen.update(encoder=out))
    for name in TASK_MIXES["three"]:
        model.heads[name].register_forward_pre_hook(lambda m, inp, name=name: seen.update({name: inp[0]}))
    model(x)
    maps, refined = seen["encoder"], [dfe(f) for dfe, f in zip(model.dfe, seen["encoder"])]
    assert all(a is b for a, b in zip(seen["grade"], maps)) and len(seen["grade"]) == len(maps)
    assert seen["dose"] is seen["structures"] and seen["dose"][-1] is maps[-1]  # the deepest map is not refined
    assert all(torch.equal(a, b) for a, b in zip(seen["dose"], refined)) and len(refined) == len(maps) - 1


def test_window_attention_stays_within_its_window():
    """A ResFormer branch attends within windows of `window` voxels per side (build_model passes `window` on): a
    change in one window leaves every other window's output as it was."""
    assert ctan.build_model("mfe", TWO, 1, window=4, **TINY).encoder.branches[0].window == 4
    branch = ctan.WindowTransformer(2, 8, 8, 1, heads=2, window=4).eval()
    x = torch.randn(1, 8, 8, 8)
    y = x.clone()
    y[..., 1, 2] += 1.0  # in the top-left window
    a, b = branch(x), branch(y)
    assert not torch.equal(a[..., :4, :4], b[..., :4, :4])
    a[..., :4, :4], b[..., :4, :4] = 0, 0
    assert torch.equal(a, b)


def test_resnet_blocks_as_torchvision():
    """A 7x7 stride-2 stem; a bottleneck strides in its 3x3 convolution (v1.5) and ends with a ReLU after the sum."""
    with torch.device("meta"):
        encoder = ctan.ResNetEncoder(2, 1, width=4, depth=(2, 2))
    assert (encoder.stem[0].kernel_size, encoder.stem[0].stride) == ((7, 7), (2, 2))
    block = encoder.stages[1][0]  # the first block of stage 2 halves the size
    assert [c.stride for c in block.body if isinstance(c, torch.nn.Conv2d)] == [(1, 1), (2, 2), (1, 1)]
    assert [c.kernel_size for c in block.body if isinstance(c, torch.nn.Conv2d)] == [(1, 1), (3, 3), (1, 1)]
    block = ctan.Bottleneck(2, 8, 8).eval()
    assert block(torch.randn(2, 8, 4, 4) * 10).min() == 0  # ReLU(body + shortcut)


@pytest.mark.parametrize("call, message", [
    (lambda: ctan.build_model("unet", TWO, 1), "arch must be one of stl, hps"),
    (lambda: ctan.build_model("hps", {"a": ("voxel", 1)}, 1), "kind in"),
    (lambda: ctan.build_model("hps", {"a": ("pixel", 0)}, 1), "n_out >= 1"),
    (lambda: ctan.build_model("ctan", TWO, 1, dims=4), "dims must be 2 or 3"),
    (lambda: ctan.build_model("hps", TWO, 1, dims=2.0), "dims must be 2 or 3, got 2.0$"),
    (lambda: ctan.ResNetEncoder(True, 1), "dims must be 2 or 3, got True$"),
    (lambda: ctan.build_model("stl", {}, 1), "kind in"),
    (lambda: ctan.build_model("ctan", {"a": ("pixel", 1)}, 1, **TINY), "at least two tasks"),
    (lambda: ctan.build_model("mtan", TWO, 1, width=4, depth=(1, 1, 1, 1)), "depth .* stages of >= 2 blocks"),
    (lambda: ctan.build_model("ctan", TWO, 1, cross_stages=(5,), **TINY), "cross_stages"),
    (lambda: ctan.build_model("mtan", TWO, 1, transition="bottleneck", **TINY), "'block' .* or 'conv'"),
    (lambda: ctan.build_model("hps", TWO, 1, block="wide", **TINY), r"block must be one of \('bottleneck', 'basic'\)"),
    (lambda: ctan.ResNetEncoder(2, 1, block="wide"), r"block must be one of \('bottleneck', 'basic'\), got 'wide'"),
    (lambda: ctan.build_model("mfe", TWO, 1, block="res", **TINY), r"one of \('bottleneck', 'basic'\) \(mfe: basic\)"),
    (lambda: ctan.build_model("ctan", TWO, 1, encoder=lambda: ctan.ResFormerEncoder(2, 1, 8, (2, 2))),
     r"encoder must be one without branches \(MTAN skips them\), got ResFormerEncoder$"),
    (lambda: ctan.build_model("hps", TWO, 1, norm_kind="layer", **TINY), "'batch', 'group', 'instance'"),
    (lambda: ctan.build_model("ctan", TWO, 1, max_tokens=0, **TINY), "max_tokens must be an integer >= 1 or None"),
    (lambda: ctan.build_model("ctan", TWO, 1, attention_heads=0, **TINY), "attention_heads must be an integer >= 1"),
    (lambda: ctan.build_model("ctan", TWO, 1, reduction=0, **TINY), "reduction must be an integer >= 1"),
    (lambda: ctan.build_model("ctan", TWO, 1, min_head_dim=2.0, **TINY), "min_head_dim must be an integer >= 1"),
    (lambda: ctan.build_model("ctan", TWO, 1, gate_init=float("nan"), **TINY), "gate_init must be a finite number"),
    (lambda: ctan.build_model("ctan", TWO, 1, cross_stages=(0,), **TINY), "cross_stages must be stage numbers"),
    (lambda: ctan.build_model("ctan", TWO, 1, cross_stages=4, **TINY), "cross_stages must be stage numbers"),
    (lambda: ctan.build_model("ctan", TWO, 1, cross_stages=(), attention_heads="4", **TINY), "attention_heads must"),
    (lambda: ctan.build_model("hps", TWO, 1, width=0), "width must be an integer >= 1"),
    (lambda: ctan.build_model("hps", TWO, 1, depth=(2, 0)), "depth must be blocks per stage"),
    (lambda: ctan.build_model("hps", TWO, 1, classifier_levels=(9,), **TINY), "classifier_levels must be indices"),
    (lambda: ctan.build_model("mfe", TWO, 1, attention_heads=3, **TINY), "attention_heads must be .* divides"),
    (lambda: ctan.build_model("hps", {"a": {"kind": "pixel", "n_out": 1}}, 1), r"tasks\['a'\] must be \(kind, n_out\)"),
    (lambda: ctan.build_model("hps", {"type": ("image", 2)}, 1), r"task names must be .* \(such as 'type'"),
    (lambda: ctan.Weighting("equal", {"a": "pixel"}), r"tasks must be \{name: \(kind, n_out\)\}"),
    (lambda: ctan.Weighting("equal", ["a", "b"]), r"tasks must be \{name: \(kind, n_out\)"),
    (lambda: ctan.Weighting("mfe", {"seg": ("segmentation", 2)}), r"\}, mfe: \('pixel', 'image'\)"),
    (lambda: ctan.build_model("hps", {"training": ("image", 2)}, 1), r"task names must be .* 'training'"),
    (lambda: ctan.build_model("hps", TWO, 1, depth=2, encoder=OwnEncoder()), "width, depth, block, checkpointing"),
    (lambda: ctan.ResNetEncoder(5, 1), "dims must be 2 or 3"),
    (lambda: ctan.build_model("hps", TWO, 1, width=8, encoder=OwnEncoder()), "width, depth, block, checkpointing"),
    (lambda: ctan.GuidedModel(tiny_model("hps", TWO, in_channels=1), None), "inferior must be an STL model.*got HPS$"),
    (lambda: ctan.GuidedModel(tiny_model("stl", TWO, in_channels=1), None, tiny_model("stl", TWO, in_channels=2)),
     r"heads must be None \(d\) or superior.heads \(c\), got STL$"),
    (lambda: ctan.ResNetEncoder(2, "1"), "in_channels must be an integer >= 1"),
    (lambda: ctan.ResNetEncoder(2, 1, checkpointing="no"), "checkpointing must be True or False"),
    (lambda: ctan.Weighting("dwa", TWO).end_epoch({"dose": 1.0}), r"mean_losses must be \{task: loss\} for \['dose'"),
    (lambda: ctan.Weighting("equal", TWO)({"dose": 1.0}), r"losses must be \{task: loss\} .*, got \{'dose': 1.0\}$"),
    (lambda: ctan.Weighting("equal", TWO)(torch.tensor(1.0)), r"losses must be \{task: loss\} .*, got Tensor .* \(\)$"),
    (lambda: ctan.build_model("hps", TWO, 1, depth=np.array([2, 2])), r"depth must be blocks per stage"),
    (lambda: ctan.build_model("hps", {"a": ("pixel", "3")}, 1), "n_out >= 1"),
    (lambda: ctan.build_model("hps", {"a": ("pixel", 2.5)}, 1), "n_out >= 1"),
    (lambda: ctan.build_model("hps", TWO, 0), "in_channels must be an integer >= 1"),
    (lambda: ctan.build_model("hps", TWO, 1, encoder=42), "encoder must be a module or a function"),
    (lambda: ctan.build_model("hps", TWO, 1, encoder=ctan.ResNetEncoder), "e.g. lambda: ResNetEncoder"),
    (lambda: ctan.build_model("ctan", TWO, 1, cross_stages=(s for s in (1, 2)), **TINY), "cross_stages must be"),
    (lambda: ctan.build_model("hps", TWO, 1, encoder=OwnEncoder(channels=[8, 8, 8]))(torch.zeros(1, 1, 32, 32)),
     r"encoder: its maps' channels must be its channels, \[8, 8, 8\], for every task, got \[\[8, 8, 16\], \[8, 8, 16"),
    (lambda: ctan.Weighting("uncertainity", TWO), "method must be one of .*'uncertainty'"),
    (lambda: ctan.GuidanceNetwork(2, [4], dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
    (lambda: ctan.CrossTaskAttention(16, 3)([torch.ones(2, 16, 8, 8)] * 2), r"a must be 3 maps \(B, 16, \*S\), one"),
    (lambda: ctan.CrossTaskAttention(16, 2)([torch.ones(2, 32, 8, 8)] * 2), r"a must be 2 maps \(B, 16, \*S\)"),
    (lambda: ctan.CrossTaskAttention(16, 2)([torch.ones(2, 16, 8, 8), torch.ones(2, 16, 4, 4)]), "one shape"),
    (lambda: ctan.CrossTaskAttention(16, 2)({"a": torch.ones(2, 16, 8, 8), "b": torch.ones(2, 16, 8)}), "a must be 2"),
    (lambda: ctan.GuidanceNetwork(2, 8), "channels must be the encoder's channel counts, e.g. model.channels, got 8$"),
    (lambda: ctan.GuidanceObjective(tiny_model("hps", TWO, in_channels=1), tiny_model("hps", TWO, in_channels=2),
                                    ctan.GuidanceNetwork(2, [4])), "inferior must be an STL model.*got HPS$"),
    (lambda: ctan.Weighting("uncertainty", TWO)({"dose": 1.0, "diagnosis": 2.0}),  # the model would get no gradient
     r"each a tensor of one value \(a float has no gradient\), got \{'dose': 1.0"),
    (lambda: ctan.Weighting("equal", TWO)({"dose": torch.ones(2, 4), "diagnosis": torch.ones(())}), "of one value"),
    (lambda: ctan.Weighting("dwa", TWO).end_epoch({"dose": [0.5, 0.4], "diagnosis": 1.0}), "for .*, one number each"),
    (lambda: ctan.Weighting("dwa", TWO).end_epoch({"dose": None, "diagnosis": 1.0}), "for .*, one number each"),
    (lambda: ctan.build_model("hps", TWO, 1, encoder=ctan.ResNetEncoder(3, 1, 8, (2, 2))),
     r"encoder's \(dims, in_channels\) must be the model's \(2, 1\), got \(3, 1\)$"),
    (lambda: ctan.build_model("stl", TWO, 1, encoder=lambda: ctan.ResNetEncoder(2, 3, 8, (2, 2))), r"got \(2, 3\)$"),
    (lambda: tiny_model("hps", TWO, in_channels=1)([torch.ones(2, 1, 32, 32, device="cpu"), torch.ones(2)]),  # a batch
     r"x must be a float tensor \(B, 1, H, W\) for a 2D model, got list$"),
    (lambda: tiny_model("hps", TWO, in_channels=1)(torch.zeros(1, 1, 40, 40)), "multiple of 32"),
    (lambda: tiny_model("hps", TWO, in_channels=1)(torch.zeros(1, 3, 32, 32)), r"a float tensor \(B, 1, H, W\)"),
    (lambda: tiny_model("hps", TWO, in_channels=1)(torch.zeros(1, 1, 32, 32, dtype=torch.uint8)), "Tensor torch.uint8"),
    (lambda: tiny_model("hps", TWO, in_channels=1)(np.zeros((1, 1, 32, 32))), r"got ndarray float64 \(1, 1, 32, 32\)$"),
    (lambda: tiny_model("stl", TWO, dims=3, in_channels=1)(torch.zeros(1, 1, 32, 32)), r"\(B, 1, D, H, W\) for a 3D"),
    (lambda: tiny_model("hps", TWO, in_channels=1)(torch.zeros(1, 1, 32, 32, 32)), "2D model"),
])
def test_bad_arguments_raise_value_error_naming_the_allowed_values(call, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        call()


def test_networks_can_be_built_directly_with_default_encoders():
    """An engineer copying ctan.py can call the classes themselves: the same as build_model's defaults."""
    with torch.device("meta"):
        for arch, cls in ctan.NETWORKS.items():
            direct, factory = cls(TWO, 1), ctan.build_model(arch, TWO, 1)
            assert count_parameters(direct) == count_parameters(factory) > 20e6, arch
            assert type(direct.encoders["dose"] if arch == "stl" else direct.encoder) is type(
                factory.encoders["dose"] if arch == "stl" else factory.encoder)


def test_readme_parameter_counts_are_the_networks():
    """README "Networks (default widths)": every count, to 0.1 M, of each dataset's task set (on meta: no weights)."""
    readme = (Path(__file__).resolve().parent / "README.md").read_text()
    rows = readme.split("### Networks (default widths)")[1].split("## ")[0].strip().splitlines()
    table = {r.split("|")[1].strip(" `"): r.split("|")[2:5] for r in rows if r.startswith("| `")}
    assert list(table) == list(ctan.ARCHS)
    for column, (name, dims) in enumerate((("openkbp", 2), ("ham10000", 2), ("stoic", 3))):
        tasks = data.task_spec(name, len(data.OPENKBP_ROIS) if name == "openkbp" else 0)
        for arch, cells in table.items():
            with torch.device("meta"):
                model = ctan.build_model(arch, tasks, data.in_channels(name), dims)
            assert f"{count_parameters(model) / 1e6:.1f} M" == cells[column].strip(), (arch, name)


def test_unknown_keywords_list_the_valid_options():
    with torch.device("meta"):
        with pytest.raises(TypeError, match="CTAN: unknown option 'width'; valid: dims, norm_kind, encoder, .*"
                                            "transition, cross_stages, attention_heads"):
            ctan.CTAN(TWO, 1, 2, width=8)
        with pytest.raises(TypeError, match="MTAN: unknown option 'attention_heads'; valid: .*transition") as e:
            ctan.MTAN(TWO, 1, attention_heads=2)
        assert "cross_stages" not in str(e.value) and "in_channels" not in str(e.value)  # only keyword options
        with pytest.raises(TypeError, match="unknown option 'widht'.*and width, depth, block, checkpointing"):
            ctan.build_model("ctan", TWO, 1, widht=8)


class OwnEncoder(torch.nn.Module):
    """An encoder of one's own, written to the protocol: [stem, stage 1, stage 2], each stage halving the size."""

    def __init__(self, with_block=True, channels=(8, 8, 16)):
        super().__init__()
        conv = lambda cin, cout, stride: torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 3, stride, 1),
                                                             torch.nn.BatchNorm2d(cout), torch.nn.ReLU())
        self.stem, self.pool, self.channels = conv(1, 8, 2), torch.nn.Identity(), list(channels)
        self.stages = torch.nn.ModuleList([torch.nn.Sequential(conv(8, 8, 2), conv(8, 8, 1)),
                                           torch.nn.Sequential(conv(8, 16, 2), conv(16, 16, 1))])
        if with_block:
            self.block = ctan.BasicBlock

    def forward(self, x):
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1] if len(feats) > 1 else self.pool(feats[0])))
        return feats


def test_an_error_inside_your_encoder_factory_is_reported_as_yours():
    def factory():
        raise TypeError("bug inside my encoder")
    with pytest.raises(TypeError, match="bug inside my encoder"):
        ctan.build_model("hps", TWO, 1, encoder=factory)


def test_own_encoder_by_protocol_module_or_factory():
    x = torch.randn(2, 1, 32, 32)
    for arch in ("hps", "mtan", "ctan", "stl", "mfe"):
        encoder = OwnEncoder if arch == "stl" else OwnEncoder()  # STL builds one per task: a factory
        model = ctan.build_model(arch, TWO, 1, encoder=encoder)
        out = model(x)
        assert out["dose"].shape == (2, 1, 32, 32) and out["diagnosis"].shape == (2, 3), arch
    assert isinstance(ctan.build_model("ctan", TWO, 1, encoder=OwnEncoder).transitions["2"], ctan.BasicBlock)
    with pytest.raises(ValueError, match="with channels, stem, pool, stages, block .* OwnEncoder lacks block"):
        ctan.CTAN(TWO, 1, encoder=OwnEncoder(with_block=False))
    ctan.CTAN(TWO, 1, encoder=OwnEncoder(with_block=False), transition="conv")(x)  # "conv" needs no block class
    with pytest.raises(ValueError, match="Linear lacks channels, stem, pool, stages, block"):
        ctan.MTAN(TWO, 1, encoder=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="stl builds one per task"):
        ctan.STL(TWO, 1, encoder=OwnEncoder())
    with pytest.raises(TypeError, match="unknown option 'window'; valid: .*dilations$"):  # on your encoder=
        ctan.build_model("mfe", TWO, 1, encoder=OwnEncoder(), window=4)
    with pytest.raises(TypeError, match="unknown option 'windows'.* checkpointing, attention_heads, window$"):
        ctan.build_model("mfe", TWO, 1, windows=4)
    shared = OwnEncoder()
    with pytest.raises(ValueError, match="stl builds one per task"):  # a factory returning one module: HPS in disguise
        ctan.STL(TWO, 1, encoder=lambda: shared)
    for arch in ("mtan", "ctan"):  # a wrong .channels: named before a mask's convolution fails on it
        with pytest.raises(ValueError, match=r"channels\[2\] = 32, got \[16, 4, 4\] -> \[16, 4, 4\]$"):
            ctan.build_model(arch, TWO, 1, encoder=OwnEncoder(channels=(8, 8, 32)))(x)
    last_strides = OwnEncoder()  # the protocol but for one thing: stage 2's last block halves the size and widens
    last_strides.stages[1] = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.Conv2d(8, 16, 3, 2, 1))
    ctan.build_model("hps", TWO, 1, encoder=last_strides)(x)  # fine where no mask reads the next-to-last block
    with pytest.raises(ValueError, match=r"stage 2's last block to keep its input's \(C, \*S\).* \[8, 8, 8\] -> "):
        ctan.build_model("ctan", TWO, 1, encoder=last_strides, transition="conv")(x)
    not_sequential = OwnEncoder()
    not_sequential.stages[0] = torch.nn.Conv2d(8, 8, 3, 2, 1)
    with pytest.raises(ValueError, match=r"got \[0, 2\] blocks \(0: not an nn.Sequential\)"):
        ctan.build_model("mtan", TWO, 1, encoder=not_sequential)
    with pytest.raises(TypeError, match="unknown option 'heads'; valid: .*gate_init$"):  # not build_model's width...
        ctan.build_model("ctan", TWO, 1, encoder=OwnEncoder(), heads=2)  # ...which are refused with encoder=


def test_heads_follow_the_model_dtype():
    """The heads cast to their own dtype: a float64 model (gradient checks) and a bf16 model run; under autocast the
    outputs stay fp32 (test_pixel_heads_output_conv_runs_in_fp32_under_autocast)."""
    for dtype in (torch.float64, torch.bfloat16):
        model = tiny_model("ctan", TWO, in_channels=1).to(dtype)
        out = model(torch.randn(2, 1, 64, 64, dtype=dtype))
        assert all(o.dtype == dtype for o in out.values()), dtype


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_cross_attention_copies_no_full_map_on_cpu():
    """Pooling and upsampling touch each task's full map once each way: no copy of it in the forward or backward pass
    (on a CPU, avg_pool's backward copied the map twice when the tokens' gradient came channels last, upsample's
    forward when its input did not)."""
    attention = ctan.CrossTaskAttention(64, 2, max_tokens=64)  # 16 x 16 -> 8 x 8 tokens
    a = [torch.randn(2, 64, 16, 16, requires_grad=True) for _ in range(2)]
    with torch.profiler.profile(record_shapes=True) as prof:
        torch.autograd.backward(attention(a), [torch.ones_like(a_t) for a_t in a])
    copies = [(e.name, e.input_shapes) for e in prof.events() if e.name in ("aten::copy_", "aten::clone") and
              any(math.prod(shape) >= 2 * 64 * 16 * 16 for shape in e.input_shapes if shape)]  # a map, any shape
    assert not copies, copies


def test_ctan_dispatches_at_most_1_2_times_the_ops_of_mtan_per_training_step():
    """Ops dispatched by a training step as train.py takes it on a CPU (forward, loss, backward, AdamW): the
    cross-task attention runs every task at once, so it adds a fixed number of ops per stage, not one set per task."""
    counts = {}
    for arch in ("mtan", "ctan"):
        model = tiny_model(arch, TASK_MIXES["pixel+pixel"], in_channels=1, width=8)
        optimizer, x = torch.optim.AdamW(model.parameters()), torch.randn(2, 1, 128, 128)  # pooled at stage 1
        with CountOps() as ops:
            sum(o.square().mean() for o in model(x).values()).backward()
            optimizer.step()
        counts[arch] = ops.count
    assert counts["ctan"] <= 1.2 * counts["mtan"], counts


def test_readme_usage_runs_from_a_copy_of_ctan_py_alone(tmp_path, monkeypatch):
    """README's example, run on a copy of ctan.py (in this process: a new one pays a minute of kernel warm-up on a
    busy 2-core machine), which imports the standard library and torch, nothing of this repository."""
    here = Path(__file__).resolve().parent
    code = (here / "README.md").read_text().split("## Use ctan.py in your code")[1].split("```python\n")[1]
    shutil.copy(here / "ctan.py", tmp_path)
    tree = ast.parse((tmp_path / "ctan.py").read_text())
    imported = {(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name).split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert imported <= set(sys.stdlib_module_names) | {"torch"}, imported
    spec = importlib.util.spec_from_file_location("ctan", tmp_path / "ctan.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    monkeypatch.setitem(sys.modules, "ctan", copy)
    namespace = {}
    exec(compile(code.split("```")[0], "README.md", "exec"), namespace)
    assert namespace["ctan"] is copy and sorted(namespace["out"]) == ["diagnosis", "dose"]
    assert torch.isfinite(namespace["loss"]) and namespace["weighting"].log_vars.grad is not None


def test_checkpointing_gives_the_same_gradients():
    """With checkpointing the forward pass keeps fewer tensors for the backward pass (the encoder's are recomputed
    there), and the gradients stay the same."""
    x = tiny_input(2)
    result, saved = [], [0, 0]

    def keep(t):  # counts the tensors the forward pass keeps
        saved[flag] += 1
        return t
    for flag in (False, True):
        model = tiny_model("ctan", TWO, checkpointing=flag, **two_stages("ctan"))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = sum(o.square().mean() for o in model(x).values())
        loss.backward()
        result.append([p.grad.clone() for p in model.parameters()])
    assert saved[1] < 0.8 * saved[0], saved
    for a, b in zip(*result):
        torch.testing.assert_close(a, b)


def guided_model(dims=2):
    inferior = ctan.build_model("stl", {"dose": ("pixel", 1)}, 1, dims, width=4, depth=(1, 1))
    return ctan.GuidedModel(inferior, ctan.GuidanceNetwork(dims, inferior.encoders["dose"].channels),
                            inferior.heads)


@pytest.mark.xdist_group("dynamo")  # one worker pays for dynamo's start
@pytest.mark.parametrize("arch", [*ctan.ARCHS, "guided"])
def test_every_network_compiles_to_one_graph_without_breaks(arch):
    """torch.compile sees each network whole: one graph, no graph breaks (traced only, no compiler run; tracing
    costs about a second per stage, so the fewest stages that run every code path)."""
    torch._dynamo.reset()
    model = guided_model() if arch == "guided" else tiny_model(arch, TWO, in_channels=1, **fewest_stages(arch))
    explained = torch._dynamo.explain(model)(torch.randn(2, 1, 64, 64))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_pixel_heads_output_conv_runs_in_fp32_under_autocast():
    model, x = tiny_model("hps", TASK_MIXES["three"]), tiny_input(2)
    inputs = {}
    for name in ("dose", "structures"):
        model.heads[name].out.register_forward_hook(lambda m, inp, out, name=name: inputs.update({name: inp[0]}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["grade"].dtype == torch.float32  # the classifier's logits too: bf16 would tie AUC scores
    for name in ("dose", "structures"):
        head = model.heads[name].out
        assert out[name].dtype == inputs[name].dtype == torch.float32
        torch.testing.assert_close(out[name], torch.nn.functional.conv2d(inputs[name], head.weight, head.bias),
                                   rtol=0, atol=0)


def test_image_heads_average_pool_then_run_the_mlp_in_fp32_under_autocast():
    model, x = tiny_model("hps", TASK_MIXES["three"]).eval(), tiny_input(2, size=64)  # eval: no dropout; 2 x 2 maps
    seen = []
    model.heads["grade"].mlp[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    model.encoder.register_forward_hook(lambda m, inp, out: seen.append(out[-1]))  # the deepest map
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)["grade"]
    deepest, pooled = seen
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, deepest.float().mean((2, 3)), rtol=0.01, atol=0.01)  # averaged in bf16
    torch.testing.assert_close(out, model.heads["grade"].mlp(pooled), rtol=0, atol=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_and_bf16_autocast_forward_backward_of_every_arch(dims):
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = sized_input(dims).to(memory_format=memory_format)
    for arch in ctan.ARCHS if dims == 2 else ("ctan",):  # a CPU has no fast bf16 conv3d: 5 s an arch
        model = sized_model(arch, TASK_MIXES["pixel+image"], dims).to(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out["segmentation"].dtype == torch.float32 and out["segmentation"].shape[2:] == x.shape[2:]
        sum(o.float().square().mean() for o in out.values()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()), arch


# ============================================================================================
# data.py: synthetic files, converters, errors
# ============================================================================================
HERE = Path(__file__).resolve().parent
REAL_OPENKBP = Path(os.environ.get("OPENKBP_SAMPLE", HERE.parent / "shared" / "data" / "openkbp"))
REAL_HAM = Path(os.environ.get("HAM10000_SAMPLE", HERE.parent / "shared" / "data" / "ham10000"))
TINY_DATA = {"openkbp": dict(n=4, size=32), "prostate": dict(n=4, size=32), "ham10000": dict(n=12, size=32),
        "stoic": dict(n=5, size=32)}


@pytest.fixture(scope="module")
def synth_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return {name: data.synth(name, root / f"{name}.h5", seed=1, **kw) for name, kw in TINY_DATA.items()}


def _copy(src, dst):
    shutil.copy(src, dst)
    return dst


# ----------------------------------------------------------------------------- synth -> open_dataset
@pytest.mark.parametrize("name,dims", [("openkbp", 2), ("openkbp", 3), ("prostate", 2), ("prostate", 3),
                                       ("ham10000", 2), ("stoic", 3)])
def test_synth_items_follow_the_spec(synth_files, name, dims):
    path = synth_files[name]
    with h5py.File(path) as f:
        assert f.attrs["dataset"] == name and bool(f.attrs["synthetic"]) is True
        tasks = {t: tuple(v) for t, v in json.loads(f.attrs["tasks"]).items()}
        assert tasks == data.task_spec(name, len(data.SPECS[name].rois))
    size = TINY_DATA[name]["size"]
    total = 0
    for split in data.SPLITS:
        ds = data.open_dataset(path, split, dims=dims)
        total += ds.num_cases
        assert ds.dataset == name and ds.synthetic is True and ds.tasks == data.task_spec(name, len(ds.roi_names))
        assert isinstance(ds.digest, str) and len(ds.digest) == 64
        assert ds.roi_names == list(data.SPECS[name].rois)
        assert ds.in_channels == (3 if name == "ham10000" else 1)
        spatial = (size,) * (2 if dims == 2 else 3)
        assert len(ds) == ds.num_cases * (size if name in data.PLANNING and dims == 2 else 1)
        item = ds[len(ds) - 1]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (ds.in_channels,) + spatial
        assert all(s % 32 == 0 for s in item["image"].shape[1:])
        assert torch.isfinite(item["image"]).all()
        for task, (kind, n_out) in ds.tasks.items():
            if kind == "pixel":
                want = torch.float32 if task == "dose" else torch.bool  # masks travel as bool
                assert item[task].dtype == want and item[task].shape == (n_out,) + spatial
            else:
                assert item[task].dtype == torch.int64 and item[task].shape == () and 0 <= item[task] < n_out
        if name in data.PLANNING:
            assert item["possible_dose_mask"].shape == (1,) + spatial and item["possible_dose_mask"].dtype == torch.bool
            assert item["image"].min() >= -1.0 and item["image"].max() <= 1.5  # HU clipped and scaled
        assert item["case"] == ds.num_cases - 1
        assert item["slice"] == (size - 1 if name in data.PLANNING and dims == 2 else -1)
        raw = ds.case(ds.num_cases - 1)
        assert raw["id"] == item["id"] and isinstance(raw["id"], str)
        if name in data.PLANNING:
            assert raw["dose"].dtype == np.float32 and raw["dose"].shape == (size,) * 3
            assert raw["structures"].dtype == bool and raw["structures"].shape == (len(ds.roi_names),) + (size,) * 3
            assert raw["possible_dose_mask"].dtype == bool and raw["voxel_dimensions"].shape == (3,)
            if dims == 2:
                np.testing.assert_array_equal(item["dose"][0].numpy(), raw["dose"][size - 1])  # z first
        elif name == "ham10000":
            assert raw["segmentation"].dtype == bool and isinstance(raw["diagnosis"], int)
        else:
            assert isinstance(raw["covid"], int) and isinstance(raw["severe"], int)
    assert total == TINY_DATA[name]["n"]


def test_dims_that_do_not_apply_are_refused(synth_files):
    with pytest.raises(ValueError, match="per scan"):
        data.open_dataset(synth_files["stoic"], "train", dims=2)
    with pytest.raises(ValueError, match="2D"):
        data.open_dataset(synth_files["ham10000"], "train", dims=3)
    with pytest.raises(data.DataError, match="unknown split"):
        data.open_dataset(synth_files["ham10000"], "training")


def test_augmentation_is_label_consistent(synth_files):
    torch.manual_seed(0)
    plain = data.open_dataset(synth_files["openkbp"], "train", dims=3)
    aug = data.open_dataset(synth_files["openkbp"], "train", dims=3, augment=True)
    a, shifted = plain[0], []
    shifts = [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)]
    for _ in range(10):
        b = aug[0]
        match = [s for s in shifts if torch.equal(data._shift(a["image"], s, -1.0), b["image"])]
        assert match, "augmented CT is not a small shift of the original"
        for key in ("dose", "structures", "possible_dose_mask"):
            assert torch.equal(data._shift(a[key], match[0], 0.0), b[key])
        shifted.append((0, 0, 0) not in match)
    assert any(shifted)  # not all draws leave the CT in place
    ham = data.open_dataset(synth_files["ham10000"], "train")
    ham_aug = data.open_dataset(synth_files["ham10000"], "train", augment=True)
    seen = set()
    for _ in range(20):
        a, b = ham[0], ham_aug[0]
        flip = lambda x, f: x.flip(f) if f else x
        flips = [f for f in ((), (-1,), (-2,), (-1, -2)) if torch.equal(flip(a["image"], f), b["image"])]
        assert flips and torch.equal(flip(a["segmentation"], flips[0]), b["segmentation"])
        seen.add(flips[0])
    assert len(seen) > 1


# ----------------------------------------------------------------------------- OpenKBP CSV fixtures
def write_sparse_csv(path, flat, values=True):
    """Format of open-kbp's provided-data: header ',data', rows 'index,value' / 'index,' of non-zero voxels."""
    index = np.flatnonzero(flat)
    rows = ([f"{i},{v!r}" for i, v in zip(index, flat[index].astype(float).tolist())] if values
            else [f"{i}," for i in index])
    Path(path).write_text(",data\n" + "".join(r + "\n" for r in rows))


def write_openkbp_patient(folder, case, rois):
    folder.mkdir(parents=True)
    write_sparse_csv(folder / "ct.csv", (case["image"].astype(np.float64) + 1024).ravel())
    write_sparse_csv(folder / "dose.csv", case["dose_text"].ravel())
    write_sparse_csv(folder / "possible_dose_mask.csv", case["possible_dose_mask"].ravel(), values=False)
    np.savetxt(folder / "voxel_dimensions.csv", case["voxel_dimensions"])
    for roi, mask in zip(rois, case["structures"]):
        if mask.any():
            write_sparse_csv(folder / f"{roi}.csv", mask.ravel(), values=False)


def make_openkbp_raw(root, rois, shape, counts=(2, 1, 1), seed=0):
    """Random sparse patients in the split folders; returns {patient id: case arrays}."""
    rng = np.random.default_rng(seed)
    cases = {}
    for (split, sub), n in zip(data.OPENKBP_SPLITS.items(), counts):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            pid = f"pt_{len(cases) * 7 + 2}"  # pt_2, pt_9, pt_16...: natural, not lexical, order
            body = rng.random(shape) < 0.1
            ct = np.where(body, rng.integers(-1000, 3000, shape), -1024).astype(np.int16)
            dose = np.where(body, np.round(rng.uniform(0, 80, shape), 3), 0.0)
            structures = rng.random((len(rois),) + shape) < 0.02
            structures[rng.integers(len(rois))] = False  # one ROI not contoured: no file
            case = {"image": ct, "dose_text": dose, "dose": dose.astype(np.float32), "structures": structures,
                    "possible_dose_mask": body, "voxel_dimensions": rng.uniform(1, 5, 3), "split": split}
            write_openkbp_patient(root / sub / pid, case, rois)
            cases[pid] = case
    return cases


def raw_order(volume):
    """Stored (..., Z, D, H) -> the raw CSVs' (..., D, H, W) with W = z (inverse of data.axial_first)."""
    return np.moveaxis(volume, -3, -1)


def check_converted(out, cases, name, rois):
    with h5py.File(out) as f:
        assert f.attrs["dataset"] == name and bool(f.attrs["synthetic"]) is False
        assert json.loads(f.attrs["roi_names"]) == list(rois)
    for split in data.SPLITS:
        ds = data.open_dataset(out, split, dims=3)
        expected = [pid for pid, c in cases.items() if c["split"] == split]
        assert [ds.case(i)["id"] for i in range(ds.num_cases)] == expected
        for i, pid in enumerate(expected):
            got, want = ds.case(i), cases[pid]
            np.testing.assert_array_equal(raw_order(got["image"]), want["image"])
            assert got["image"].dtype == np.int16
            np.testing.assert_array_equal(raw_order(got["dose"]), want["dose"])
            np.testing.assert_array_equal(raw_order(got["structures"]), want["structures"])
            np.testing.assert_array_equal(raw_order(got["possible_dose_mask"]), want["possible_dose_mask"])
            np.testing.assert_array_equal(got["voxel_dimensions"], want["voxel_dimensions"][[2, 0, 1]])


def test_openkbp_round_trip_exact(tmp_path):
    shape = (32, 64, 96)  # three different sides, so any mixed-up axis fails
    cases = make_openkbp_raw(tmp_path / "raw", data.OPENKBP_ROIS, shape)
    log = io.StringIO()
    out = data.convert("openkbp", tmp_path / "raw", tmp_path / "o.h5", shape=shape, log=log)
    check_converted(out, cases, "openkbp", data.OPENKBP_ROIS)
    assert "4/4" in log.getvalue() and "ETA" in log.getvalue()
    item = data.open_dataset(out, "train", dims=2)[5]
    assert item["image"].shape == (1, 32, 64) and item["structures"].shape == (10, 32, 64) and item["slice"] == 5
    first = cases[item["id"]]  # a 2D item is one axial slice: the raw volume at z = W index 5
    np.testing.assert_array_equal(item["dose"][0].numpy(), first["dose"][..., 5])
    np.testing.assert_array_equal(item["structures"].numpy(), first["structures"][..., 5])


def test_prostate_round_trip_with_own_rois(tmp_path):
    rois = ("Bladder", "Rectum", "PTV")
    cases = make_openkbp_raw(tmp_path / "raw", rois, (32, 32, 32), seed=3)
    (tmp_path / "raw" / "train-pats" / "pt_2" / "Prostate.csv").write_text(",data\n")  # not in --rois
    rc = data.main(["convert", "prostate", str(tmp_path / "raw"), "--out", str(tmp_path / "p.h5"),
                    "--rois", ",".join(rois), "--shape", "32"])
    assert rc == 0
    check_converted(tmp_path / "p.h5", cases, "prostate", rois)
    assert data.open_dataset(tmp_path / "p.h5", "val").tasks == {"dose": ("pixel", 1), "structures": ("pixel", 3)}
    wrong = r"no patient has a file of the ROIs Urethra, Penis \(ROI files there: Bladder, PTV, Prostate, Rectum\)"
    with pytest.raises(data.DataError, match=wrong):  # else every structure mask of the file would be empty
        data.convert("prostate", tmp_path / "raw", tmp_path / "q.h5", shape=32, rois=("Urethra", "Penis"))
    assert not (tmp_path / "q.h5").exists()


def _read_csv_independently(path, size, values=True):
    """Dense array from an OpenKBP CSV with the csv module (not data.py's reader)."""
    flat = np.zeros(size, np.float64 if values else bool)
    with open(path, newline="") as fh:
        rows = csv.reader(fh)
        assert next(rows) == ["", "data"]
        for row in rows:
            flat[int(row[0])] = float(row[1]) if values else True
    return flat


@pytest.mark.skipif(not REAL_OPENKBP.is_dir(), reason="real OpenKBP sample not present (../shared/data/openkbp)")
def test_real_openkbp_matches_the_csv_files(tmp_path):
    # one real patient (symlinked) keeps the test short: the split folders are checked with the fixtures above
    for sub in data.OPENKBP_SPLITS.values():
        (tmp_path / "raw" / sub).mkdir(parents=True)
    folder = REAL_OPENKBP / "train-pats" / "pt_1"
    (tmp_path / "raw" / "train-pats" / "pt_1").symlink_to(folder)
    out = data.convert("openkbp", tmp_path / "raw", tmp_path / "real.h5", log=io.StringIO())
    ds, size = data.open_dataset(out, "train", dims=3), 128 ** 3
    assert ds.num_cases == 1 and ds.synthetic is False and data.open_dataset(out, "val").num_cases == 0
    got = ds.case(0)
    assert got["id"] == "pt_1" and got["image"].shape == (128, 128, 128)
    ct = _read_csv_independently(folder / "ct.csv", size)
    flat = lambda v: raw_order(v).ravel()  # the CSVs' flat index is C order over (D, H, W)
    np.testing.assert_array_equal(flat(got["image"]).astype(np.float64) + 1024, ct)
    want = _read_csv_independently(folder / "dose.csv", size).astype(np.float32)
    np.testing.assert_array_equal(flat(got["dose"]), want)
    np.testing.assert_array_equal(flat(got["possible_dose_mask"]),
                                  _read_csv_independently(folder / "possible_dose_mask.csv", size, values=False))
    with open(folder / "voxel_dimensions.csv") as fh:
        vox = [float(line) for line in fh if line.strip()]
        assert list(got["voxel_dimensions"]) == vox[2:] + vox[:2]
    for r, roi in enumerate(data.OPENKBP_ROIS):
        want = (_read_csv_independently(folder / f"{roi}.csv", size, values=False)
                if (folder / f"{roi}.csv").exists() else np.zeros(size, bool))
        np.testing.assert_array_equal(flat(got["structures"][r]), want, err_msg=roi)
    assert len(list((REAL_OPENKBP / "train-pats").iterdir())) == 12


# ----------------------------------------------------------------------------- HAM10000 fixtures
def make_ham_raw(root, rng):
    """Metadata CSV with shared lesion ids, JPGs in two parts (most 64x32, two 80x50), PNG masks 0/255."""
    parts = ("HAM10000_images_part1", "ham10000_images_part_2")  # ISIC and Kaggle spellings, both read
    for part in parts:
        (root / part).mkdir(parents=True)
    (root / data.HAM_MASK_DIR).mkdir()
    rows = []
    for k in range(14):
        image_id, lesion_id = f"ISIC_{24306 + k:07d}", f"HAM_{k // 2:07d}"  # two images per lesion
        w, h = (80, 50) if k in (3, 8) else (64, 32)
        part = root / parts[k % 2]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(part / f"{image_id}.jpg", quality=90)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: 3 * h // 4, w // 5: w // 2 + k] = 255
        Image.fromarray(mask).save(root / data.HAM_MASK_DIR / f"{image_id}_segmentation.png")
        rows.append({"lesion_id": lesion_id, "image_id": image_id, "dx": data.HAM_CLASSES[k % 7],
                     "dx_type": "histo", "age": "50.0", "sex": "male", "localization": "back"})
    with open(root / data.HAM_METADATA, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_ham10000_round_trip(tmp_path):
    rows = make_ham_raw(tmp_path / "raw", np.random.default_rng(0))
    out = data.convert("ham10000", tmp_path / "raw", tmp_path / "ham.h5", size="64x32", seed=5, log=io.StringIO())
    seen, lesions = {}, {}
    for split in data.SPLITS:
        ds = data.open_dataset(out, split)
        assert ds.num_cases > 0
        for i in range(ds.num_cases):
            got = ds.case(i)
            seen[got["id"]] = got
            lesions.setdefault(got["lesion_id"], set()).add(split)
    assert sorted(seen) == sorted(r["image_id"] for r in rows)
    assert all(len(splits) == 1 for splits in lesions.values())  # split by lesion
    for r in rows:
        got = seen[r["image_id"]]
        part = next((tmp_path / "raw").glob(f"*_images_part*/{r['image_id']}.jpg"))
        rgb = Image.open(part).convert("RGB")
        mask = Image.open(tmp_path / "raw" / data.HAM_MASK_DIR / f"{r['image_id']}_segmentation.png")
        assert tuple(got["original_size"]) == (rgb.height, rgb.width)
        if rgb.size != (64, 32):
            rgb = rgb.resize((64, 32), Image.Resampling.BILINEAR)
            mask = mask.resize((64, 32), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(got["image"], np.asarray(rgb))
        np.testing.assert_array_equal(got["segmentation"], np.asarray(mask) > 128)
        assert got["diagnosis"] == data.HAM_CLASSES.index(r["dx"])
    again = data.convert("ham10000", tmp_path / "raw", tmp_path / "ham2.h5", size="64x32", seed=5, log=io.StringIO())
    with h5py.File(out) as a, h5py.File(again) as b:  # the seeded split is reproducible, and so is the digest
        assert list(a["test/id"].asstr()[:]) == list(b["test/id"].asstr()[:])
        assert a.attrs["digest"] == b.attrs["digest"]
    other = data.convert("ham10000", tmp_path / "raw", tmp_path / "ham3.h5", size="64x32", seed=6, log=io.StringIO())
    assert data.open_dataset(other, "train").digest != data.open_dataset(out, "train").digest


@pytest.mark.skipif(not REAL_HAM.is_dir(), reason="real HAM10000 not present (../shared/data/ham10000)")
def test_real_ham10000_palette_masks_and_sizes(tmp_path):
    """Five real images (symlinked): JPEGs 200x150 but masks 600x450, two masks palette PNGs whose palette is
    inverted (index 0 white), one mask all lesion, one image in part 2. Lesion is where the mask's colour is white."""
    ids = ("ISIC_0024306", "ISIC_0024316", "ISIC_0024317", "ISIC_0026042", "ISIC_0034320")
    raw, files = tmp_path / "raw", {}
    (raw / data.HAM_MASK_DIR).mkdir(parents=True)
    for i in ids:
        jpg = next(REAL_HAM.glob(f"*_images_part*/{i}.jpg"))
        png = REAL_HAM / data.HAM_MASK_DIR / f"{i}_segmentation.png"
        (raw / jpg.parent.name).mkdir(exist_ok=True)
        for link, target in ((raw / jpg.parent.name / jpg.name, jpg), (raw / data.HAM_MASK_DIR / png.name, png)):
            link.symlink_to(target)
        files[i] = (Image.open(jpg), Image.open(png))
    with open(REAL_HAM / data.HAM_METADATA, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["image_id"] in ids]
    with open(raw / data.HAM_METADATA, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = data.convert("ham10000", raw, tmp_path / "ham.h5", size="96x64", log=io.StringIO())
    splits = [data.open_dataset(out, s) for s in data.SPLITS]
    cases = {c["id"]: c for ds in splits for c in map(ds.case, range(ds.num_cases))}
    assert sorted(cases) == sorted(ids) and {m.mode for _, m in files.values()} == {"L", "P"}
    for i, (rgb, mask) in files.items():
        got = cases[i]
        assert rgb.size == (200, 150) and mask.size == (600, 450) and tuple(got["original_size"]) == (150, 200)
        palette = np.array(mask.getpalette()).reshape(-1, 3)[:, 0] if mask.mode == "P" else np.arange(256)
        white = palette[np.asarray(mask)]  # the colour of each pixel, looked up without convert()
        assert set(np.unique(white)) <= {0, 255}
        want = np.asarray(Image.fromarray(white.astype(np.uint8)).resize((96, 64), Image.Resampling.BILINEAR)) > 128
        np.testing.assert_array_equal(got["segmentation"], want, err_msg=i)
        expected = np.asarray(rgb.convert("RGB").resize((96, 64), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(got["image"], expected)
        corners = got["segmentation"][[0, 0, -1, -1], [0, -1, 0, -1]]
        assert got["segmentation"][32, 48] and corners.all() == (i == "ISIC_0026042") and corners.any() == corners.all()
        assert abs(got["segmentation"].mean() - (white > 128).mean()) < 0.02, i


# ----------------------------------------------------------------------------- MetaImage / STOIC fixtures
def write_metaimage(path, array, spacing_zyx, compressed=True, data_file=None, dtype="<i2", element="MET_SHORT"):
    """A MetaImage as ITK/SimpleITK writes it: .mha with LOCAL data, or a header + separate data file."""
    raw = np.ascontiguousarray(array).astype(dtype).tobytes()
    if compressed:
        raw = zlib.compress(raw)
    z, y, x = array.shape
    lines = ["ObjectType = Image", "NDims = 3", "BinaryData = True",
             f"BinaryDataByteOrderMSB = {dtype.startswith('>')}", f"CompressedData = {compressed}"]
    lines += [f"CompressedDataSize = {len(raw)}"] if compressed else []
    lines += ["TransformMatrix = 1 0 0 0 1 0 0 0 1", "Offset = -170 -170 -300", "CenterOfRotation = 0 0 0",
              f"ElementSpacing = {spacing_zyx[2]} {spacing_zyx[1]} {spacing_zyx[0]}", f"DimSize = {x} {y} {z}",
              f"ElementType = {element}", f"ElementDataFile = {data_file or 'LOCAL'}"]
    header = ("\n".join(lines) + "\n").encode()
    if data_file:
        path.write_bytes(header)
        (path.parent / data_file).write_bytes(raw)
    else:
        path.write_bytes(header + raw)


def test_read_metaimage_formats(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1024, 3000, (5, 6, 7)).astype(np.int16)
    variants = {"a.mha": dict(), "b.mha": dict(compressed=False), "c.mhd": dict(data_file="c.zraw"),
                "d.mhd": dict(compressed=False, data_file="d.raw"), "e.mha": dict(dtype=">i2"),
                "f.mha": dict(dtype="<f4", element="MET_FLOAT")}
    for fname, kw in variants.items():
        write_metaimage(tmp_path / fname, vol, (2.5, 0.7, 0.7), **kw)
        got, spacing = data.read_metaimage(tmp_path / fname)
        np.testing.assert_array_equal(got, vol, err_msg=fname)
        assert got.shape == (5, 6, 7) and list(spacing) == [2.5, 0.7, 0.7]
    (tmp_path / "c.zraw").unlink()
    with pytest.raises(data.DataError, match="c.zraw is missing"):
        data.read_metaimage(tmp_path / "c.mhd")
    (tmp_path / "t.mha").write_bytes((tmp_path / "b.mha").read_bytes()[:-10])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_metaimage(tmp_path / "t.mha")


def make_stoic_raw(root, rng):
    (root / "data" / "mha").mkdir(parents=True)
    (root / "metadata").mkdir()
    cases = {}
    formats = [dict(), dict(data_file="{}.zraw"), dict(compressed=False), dict()]
    for k in range(12):
        pid = str(100 + k)
        shape = (20, 40, 30) if k == 5 else (32, 32, 32)
        vol = rng.integers(-1024, 1500, shape).astype(np.int16)
        kw = dict(formats[k % len(formats)])
        ext = ".mhd" if "data_file" in kw else ".mha"
        if "data_file" in kw:
            kw["data_file"] = kw["data_file"].format(pid)
        write_metaimage(root / "data" / "mha" / f"{pid}{ext}", vol, (5.0, 0.8, 0.8), **kw)
        cases[pid] = dict(image=vol, covid=k % 2, severe=int(k % 4 == 1))
    with open(root / "metadata" / "reference.csv", "w") as fh:
        fh.write("PatientID,probCOVID,probSevere\n")
        fh.writelines(f"{pid},{c['covid']},{c['severe']}\n" for pid, c in cases.items())
    return cases


def test_stoic_round_trip(tmp_path):
    cases = make_stoic_raw(tmp_path / "raw", np.random.default_rng(1))
    rc = data.main(["convert", "stoic", str(tmp_path / "raw"), "--out", str(tmp_path / "s.h5"), "--size", "32"])
    assert rc == 0
    seen = set()
    for split in data.SPLITS:
        ds = data.open_dataset(tmp_path / "s.h5", split, dims=3)
        for i in range(ds.num_cases):
            got = ds.case(i)
            want = cases[got["id"]]
            seen.add(got["id"])
            assert (got["covid"], got["severe"]) == (want["covid"], want["severe"])
            assert tuple(got["original_shape"]) == want["image"].shape
            assert list(got["original_voxel_dimensions"]) == [5.0, 0.8, 0.8]
            if want["image"].shape == (32, 32, 32):
                np.testing.assert_array_equal(got["image"], want["image"])
                assert list(got["voxel_dimensions"]) == [5.0, 0.8, 0.8]
            else:  # (20, 40, 30): area-averaged along the axis that shrinks, then trilinear, rounded to HU
                t = torch.tensor(want["image"], dtype=torch.float32)[None, None]
                t = torch.nn.functional.adaptive_avg_pool3d(t, (20, 32, 30))
                t = torch.nn.functional.interpolate(t, size=(32, 32, 32), mode="trilinear", align_corners=False)
                np.testing.assert_array_equal(got["image"], np.rint(t[0, 0].numpy()))
                np.testing.assert_allclose(got["voxel_dimensions"], np.array([5.0, 0.8, 0.8]) * [20, 40, 30] / 32)
    assert seen == set(cases)


# ----------------------------------------------------------------------------- bad input
def test_missing_file_names_the_command(tmp_path):
    with pytest.raises(data.DataError, match=r"openkbp.h5 not found.*python data.py synth openkbp"):
        data.open_dataset(tmp_path / "openkbp.h5", "train")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(data.DataError, match="not a readable HDF5 file"):
        data.open_dataset(tmp_path / "junk.h5", "train")


def test_missing_group_or_key(synth_files, tmp_path):
    path = _copy(synth_files["openkbp"], tmp_path / "a.h5")
    with h5py.File(path, "a") as f:
        del f["val"]
    with pytest.raises(data.DataError, match=r"val/image is missing \(groups train, val, test"):
        data.open_dataset(path, "train")
    path = _copy(synth_files["openkbp"], tmp_path / "b.h5")
    with h5py.File(path, "a") as f:
        del f["train/dose"]
    with pytest.raises(data.DataError, match="train/dose is missing.*python data.py synth openkbp"):
        data.open_dataset(path, "test")
    path = _copy(synth_files["stoic"], tmp_path / "c.h5")
    with h5py.File(path, "a") as f:
        del f.attrs["dataset"]
    with pytest.raises(data.DataError, match="'dataset' attribute is missing"):
        data.open_dataset(path, "test", dims=3)


def test_wrong_shape_or_dtype(synth_files, tmp_path):
    path = _copy(synth_files["openkbp"], tmp_path / "a.h5")
    with h5py.File(path, "a") as f:
        n = f["train/dose"].shape[0]
        del f["train/dose"]
        f["train/dose"] = np.zeros((n, 32, 32, 16), np.float32)
    with pytest.raises(data.DataError, match=r"train/dose has shape \(\d+, 32, 32, 16\), expected \(\d+, 32, 32, 32\)"):
        data.open_dataset(path, "train")
    path = _copy(synth_files["ham10000"], tmp_path / "b.h5")
    with h5py.File(path, "a") as f:
        image = f["val/image"][:]
        del f["val/image"]
        f["val/image"] = image.astype(np.float64)
    with pytest.raises(data.DataError, match="val/image has dtype float64, expected uint8"):
        data.open_dataset(path, "train")
    path = _copy(synth_files["stoic"], tmp_path / "c.h5")
    with h5py.File(path, "a") as f:
        for split in data.SPLITS:
            image = f[f"{split}/image"][:, :, :, :24]
            del f[f"{split}/image"]
            f[f"{split}/image"] = image
    with pytest.raises(data.DataError, match="not a multiple of 32"):
        data.open_dataset(path, "train", dims=3)


def test_nan_image_is_reported(synth_files, tmp_path):
    path = _copy(synth_files["openkbp"], tmp_path / "nan.h5")
    with h5py.File(path, "a") as f:
        f["train/dose"][1, 3, 4, 5] = np.nan
    ds = data.open_dataset(path, "train", dims=3)  # layout is fine; values are checked when read
    ds[0]
    with pytest.raises(data.DataError, match="NaN or inf in train/dose of case 1"):
        ds[1]
    with pytest.raises(data.DataError, match="NaN or inf"):
        data.describe(path)


def test_unknown_dataset_name(tmp_path, capsys):
    with pytest.raises(data.DataError, match="unknown dataset 'kbp': choose one of prostate, openkbp, ham10000, stoic"):
        data.synth("kbp", tmp_path / "x.h5")
    assert data.main(["convert", "isic", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'isic'") and len(err.strip().splitlines()) == 1


def test_raw_folder_missing_files(tmp_path):
    make_openkbp_raw(tmp_path / "kbp", data.OPENKBP_ROIS, (32, 32, 32))
    (tmp_path / "kbp" / "validation-pats" / "pt_16" / "dose.csv").unlink()
    with pytest.raises(data.DataError, match=r"pt_16 lacks dose.csv: every patient folder needs ct.csv"):
        data.convert("openkbp", tmp_path / "kbp", tmp_path / "o.h5", shape=32)
    shutil.rmtree(tmp_path / "kbp" / "test-pats")
    with pytest.raises(data.DataError, match="lacks test-pats/"):
        data.convert("openkbp", tmp_path / "kbp", tmp_path / "o.h5", shape=32)
    make_ham_raw(tmp_path / "ham", np.random.default_rng(0))
    (tmp_path / "ham" / data.HAM_METADATA).unlink()
    with pytest.raises(data.DataError, match="lacks HAM10000_metadata.csv"):
        data.convert("ham10000", tmp_path / "ham", tmp_path / "h.h5")
    shutil.rmtree(tmp_path / "ham" / "ham10000_images_part_2")  # names both spellings of the missing part
    (tmp_path / "ham" / data.HAM_METADATA).write_text("lesion_id,image_id,dx\nL1,ISIC_0024307,nv\nL2,ISIC_0024306,nv\n")
    with pytest.raises(data.DataError, match=r"1 files .* \(first: ISIC_0024307.jpg; images read from "
                       r"HAM10000_images_part1/\): unpack both image parts, HAM10000_images_part1/ and _part2/ "
                       r"\(Kaggle: ham10000_images_part_1/ and _part_2/\)"):
        data.convert("ham10000", tmp_path / "ham", tmp_path / "h.h5")
    make_stoic_raw(tmp_path / "stoic", np.random.default_rng(0))
    (tmp_path / "stoic" / "data" / "mha" / "103.mha").unlink()
    with pytest.raises(data.DataError, match=r"1 scans listed in reference.csv are missing \(first: 103.mha\)"):
        data.convert("stoic", tmp_path / "stoic", tmp_path / "s.h5", size=32)
    with pytest.raises(data.DataError, match="raw folder .* not found"):
        data.convert("stoic", tmp_path / "nowhere", tmp_path / "s.h5")


def test_failed_conversion_leaves_nothing_behind(tmp_path):
    make_openkbp_raw(tmp_path / "raw", data.OPENKBP_ROIS, (32, 32, 32))
    with open(tmp_path / "raw" / "test-pats" / "pt_23" / "dose.csv", "a") as fh:
        fh.write(f"{32 ** 3 + 5},1.0\n")  # out of range: fails on the last patient, mid-write
    out = tmp_path / "out" / "openkbp.h5"
    with pytest.raises(data.DataError, match="out of range for shape"):
        data.convert("openkbp", tmp_path / "raw", out, shape=32, log=io.StringIO())
    assert not (tmp_path / "out").exists()  # not even the folder it made
    out.parent.mkdir()
    out.write_bytes(b"previous")  # an existing output survives a failed conversion untouched
    argv = ["convert", "openkbp", str(tmp_path / "raw"), "--out", str(out), "--shape", "32", "--overwrite"]
    assert data.main(argv) == 2
    assert out.read_bytes() == b"previous" and sorted(p.name for p in out.parent.iterdir()) == ["openkbp.h5"]


def test_existing_output_is_refused_unless_overwrite(synth_files, tmp_path, capsys):
    path = _copy(synth_files["stoic"], tmp_path / "s.h5")
    before = path.read_bytes()
    with pytest.raises(data.DataError, match=f"{path} already exists: add --overwrite .* or choose another --out"):
        data.synth("stoic", path, n=4)
    assert data.main(["convert", "stoic", str(tmp_path / "nowhere"), "--out", str(path)]) == 2  # before the raw check
    assert "already exists" in capsys.readouterr().err and path.read_bytes() == before
    assert data.main(["synth", "stoic", "--n", "4", "--out", str(path), "--overwrite"]) == 0
    assert data.open_dataset(path, "train", dims=3).num_cases == 2
    for call in (lambda: data.convert("stoic", tmp_path / "nowhere", tmp_path / "new" / "s.h5"),
                 lambda: data.synth("stoic", tmp_path / "new" / "s.h5", size=40)):
        with pytest.raises(data.DataError):  # nothing is created before an error
            call()
        assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temporary file left


def test_digest_follows_content(synth_files, tmp_path, capsys):
    kw = TINY_DATA["openkbp"]
    same = data.synth("openkbp", tmp_path / "same.h5", seed=1, **kw)
    other = data.synth("openkbp", tmp_path / "other.h5", seed=2, **kw)
    digest = data.open_dataset(synth_files["openkbp"], "train").digest
    assert data.open_dataset(same, "test").digest == digest != data.open_dataset(other, "test").digest
    assert data.main(["info", str(same)]) == 0 and f"digest={digest}" in capsys.readouterr().out
    with h5py.File(same, "a") as f:  # a changed value, still a valid file: only the digest tells
        f["val/dose"][0, 1, 2, 3] += 1
    assert data.main(["info", str(same)]) == 2
    assert "does not match its digest" in capsys.readouterr().err


def test_damaged_chunk_names_file_and_dataset(synth_files, tmp_path, capsys):
    path = _copy(synth_files["openkbp"], tmp_path / "damaged.h5")
    with h5py.File(path) as f:
        chunk = f["train/image"].id.get_chunk_info(0)  # case 0, axial slice 0, gzip-compressed
    with open(path, "r+b") as fh:
        fh.seek(chunk.byte_offset + chunk.size // 2)
        fh.write(bytes(8))
    assert data.main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: train/image is damaged (case 0: " in err
    assert f"rebuild it with `python data.py synth openkbp --out {path}`" in err
    ds = data.open_dataset(path, "train", dims=2)
    for read in (lambda: ds[0], lambda: ds.case(0)):
        with pytest.raises(data.DataError, match=rf"{path}: train/image is damaged \(case 0: .+\): rebuild"):
            read()
    ds[1]  # another slice of the same case reads fine


def test_ctrl_c_stops_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import signal
    handlers, make_case, read_patient = [], data._synth_plan_case, data.read_openkbp_patient

    def interrupted(real):
        def case(*args):
            handlers.append(signal.getsignal(signal.SIGINT))
            if len(handlers) == 2:
                signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the writer stops after this case
            return real(*args)
        return case

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(data, "_synth_plan_case", interrupted(make_case))
    assert data.main(["synth", "openkbp", "--n", "4", "--size", "32", "--out", str(tmp_path / "o" / "x.h5")]) == 130
    assert capsys.readouterr().err == "interrupted: nothing written\n"
    assert len(handlers) == 2 and handlers[0] is not before and signal.getsignal(signal.SIGINT) is before
    make_openkbp_raw(tmp_path / "raw", data.OPENKBP_ROIS, (32, 32, 32))
    handlers.clear()
    monkeypatch.setattr(data, "read_openkbp_patient", interrupted(read_patient))
    assert data.main(["convert", "openkbp", str(tmp_path / "raw"), "--out", str(tmp_path / "o" / "x.h5"),
                      "--shape", "32"]) == 130
    assert "interrupted: nothing written" in capsys.readouterr().err and len(handlers) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no output, no temporary file, no folder


def test_undecodable_raw_files_are_named(tmp_path):
    make_ham_raw(tmp_path / "ham", np.random.default_rng(0))
    jpg = tmp_path / "ham" / "HAM10000_images_part1" / "ISIC_0024306.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-200])
    with pytest.raises(data.DataError, match=rf"^{jpg}: cannot decode the image \(image file is truncated"):
        data.convert("ham10000", tmp_path / "ham", tmp_path / "h.h5", size="64x32", log=io.StringIO())
    jpg.unlink()
    make_ham_raw(tmp_path / "ham2", np.random.default_rng(0))
    png = tmp_path / "ham2" / data.HAM_MASK_DIR / "ISIC_0024306_segmentation.png"
    png.write_bytes(png.read_bytes()[:60])
    with pytest.raises(data.DataError, match=rf"^{png}: cannot decode the image \("):
        data.convert("ham10000", tmp_path / "ham2", tmp_path / "h.h5", size="64x32", log=io.StringIO())
    assert not (tmp_path / "h.h5").exists()
    vol = np.zeros((4, 5, 6), np.int16)
    for spacing, key in (("0.7, 0.7, 1.25", "ElementSpacing is '0.7, 0.7, 1.25', expected 3 numbers"),
                         ("0.7 0.7", "ElementSpacing is '0.7 0.7', expected 3 numbers"),
                         (None, "DimSize is missing")):
        write_metaimage(tmp_path / "a.mha", vol, (1.25, 0.7, 0.7))
        text = (tmp_path / "a.mha").read_bytes()
        if spacing is None:
            text = text.replace(b"DimSize = 6 5 4\n", b"")
        else:
            text = text.replace(b"ElementSpacing = 0.7 0.7 1.25", f"ElementSpacing = {spacing}".encode())
        (tmp_path / "a.mha").write_bytes(text)
        with pytest.raises(data.DataError, match=rf"^{tmp_path / 'a.mha'}: MetaImage header key {key}"):
            data.read_metaimage(tmp_path / "a.mha")


# ----------------------------------------------------------------------------- CLI, loaders
def test_info_cli(synth_files, tmp_path, capsys):
    assert data.main(["info", str(synth_files["ham10000"])]) == 0
    out = capsys.readouterr().out
    for text in ("ham10000, synthetic=True", "train:", "val:", "test:", "image", "uint8", "balance diagnosis: akiec",
                 f"digest={data.open_dataset(synth_files['ham10000'], 'val').digest}"):
        assert text in out
    assert data.main(["info", str(tmp_path / "stoic.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "python data.py synth stoic" in err and len(err.strip().splitlines()) == 1


def test_synth_cli_writes_default_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert data.main(["synth", "stoic", "--n", "4"]) == 0
    assert (tmp_path / "data" / "stoic.h5").is_file() and "wrote data/stoic.h5" in capsys.readouterr().out
    assert data.main(["synth", "stoic", "--size", "40"]) == 2 and "multiple of 32" in capsys.readouterr().err


def worker_pids(items):
    """collate_fn run in a DataLoader worker: (its pid, the pid that opened its dataset's HDF5 handle)."""
    return os.getpid(), torch.utils.data.get_worker_info().dataset._pid


def test_dataloader_workers_open_their_own_handles(synth_files):
    ds = data.open_dataset(synth_files["openkbp"], "train", dims=2)
    assert ds._h5 is None  # nothing opened by the constructor
    first = ds[0]  # opens a handle in this process
    assert ds._h5 is not None and pickle.loads(pickle.dumps(ds))._h5 is None
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    batches = list(loader)
    assert sum(len(b["id"]) for b in batches) == len(ds)
    torch.testing.assert_close(batches[0]["image"][0], first["image"])
    torch.testing.assert_close(batches[-1]["dose"][-1], ds[len(ds) - 1]["dose"])
    pids = list(torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=worker_pids))
    assert all(worker == opener != os.getpid() for worker, opener in pids), pids  # not the parent's handle


# ----------------------------------------------------------------------------- learnability
def _auc(score, label):
    score, label = np.asarray(score, float), np.asarray(label, bool)
    pos, neg = score[label], score[~label]
    return ((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def test_synthetic_tasks_are_learnable(tmp_path):
    for name, ptv, rx in (("openkbp", "PTV70", 70), ("prostate", "PTV", 78)):
        ds = data.open_dataset(data.synth(name, tmp_path / f"{name}.h5", n=6, size=32), "train", dims=3)
        for i in range(ds.num_cases):
            c = ds.case(i)
            body, target = c["possible_dose_mask"], c["structures"][ds.roi_names.index(ptv)]
            assert c["dose"][target].min() >= rx - 1  # prescription inside the target
            distance = np.linalg.norm(np.indices(body.shape).T - np.argwhere(target).mean(0), axis=-1).T
            assert np.corrcoef(c["dose"][body], distance[body])[0, 1] < -0.5  # and falls off away from it
            tissue = c["image"][body & ~c["structures"].any(0)].astype(float)
            for r, roi in enumerate(ds.roi_names):  # every ROI is visible: its HU differs from tissue
                if c["structures"][r].any():
                    assert abs(np.median(c["image"][c["structures"][r]]) - np.median(tissue)) > 60, roi
    ham_file = data.synth("ham10000", tmp_path / "h.h5", n=120, size=32)
    ham = {s: data.open_dataset(ham_file, s) for s in ("train", "test")}
    feats = {s: [(ds.case(i)["image"][ds.case(i)["segmentation"]].mean(0), ds.case(i)["diagnosis"])
                 for i in range(ds.num_cases)] for s, ds in ham.items()}
    x, y = (np.array([f[k] for f in feats["train"]]) for k in (0, 1))
    centroids = np.array([x[y == c].mean(0) for c in range(7)])
    xt, yt = (np.array([f[k] for f in feats["test"]]) for k in (0, 1))
    pred = np.argmin(((xt[:, None] - centroids[None]) ** 2).sum(-1), 1)
    majority = np.bincount(yt).max() / len(yt)
    assert (pred == yt).mean() > majority + 0.2
    stoic = data.open_dataset(data.synth("stoic", tmp_path / "s.h5", n=40, size=32), "train", dims=3)
    cases = [stoic.case(i) for i in range(stoic.num_cases)]
    opacity = np.array([((c["image"] > -600) & (c["image"] < -100)).sum() for c in cases])
    covid = np.array([c["covid"] for c in cases])
    severe = np.array([c["severe"] for c in cases])
    assert 0.3 < covid.mean() < 0.8 and severe[covid == 1].any()
    assert _auc(opacity, covid) > 0.9
    assert _auc(opacity[covid == 1], severe[covid == 1]) > 0.8


# ============================================================================================
# train.py: metrics, losses, end-to-end runs
# ============================================================================================


# ------------------------------------------------------------------ metrics, by hand
def test_dice_by_hand():
    assert train.dice([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)  # 2*1 / (2+2)
    assert train.dice([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.8)  # 2*2 / (3+2)
    assert train.dice([0, 0], [0, 0]) == 1.0  # empty vs empty
    assert train.dice([1, 0], [0, 0]) == 0.0


def test_roi_dice_skips_rois_absent_from_reference():
    pred = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    ref = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    d = train.roi_dice(pred, ref)
    assert d[0] == pytest.approx(0.5) and np.isnan(d[1]) and np.isnan(d[2])


def test_isic_jaccard_by_hand():
    a = np.zeros((4, 4), bool)
    p1, r1 = a.copy(), a.copy()
    p1[0, :2] = True
    r1[0, 1:3] = True  # IoU 1/3 < 0.65 -> 0
    p2, r2 = a.copy(), a.copy()
    p2[1, :4] = True
    r2[1, :4] = True
    r2[2, 0] = True  # IoU 4/5 = 0.8 -> kept
    p3, r3 = a.copy(), a.copy()  # both empty -> 1
    assert train.isic_jaccard([p1, p2, p3], [r1, r2, r3]) == pytest.approx((0 + 0.8 + 1) / 3)


def test_balanced_accuracy_by_hand():
    # recalls: class 0 2/3, class 1 1/2, class 2 1/1
    assert train.balanced_accuracy([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 0, 2]) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_roc_auc_ties_count_half_and_matches_all_pairs():
    # pairs (pos, neg): 0.5>0.1 1, 0.5=0.5 1/2, 0.9>0.1 1, 0.9>0.5 1 -> 3.5 / 4
    assert train.roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert train.roc_auc([1, 1, 0, 0], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert train.roc_auc([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    y, score = rng.integers(0, 2, 300), rng.integers(0, 20, 300) / 20  # many ties
    assert train.roc_auc(y, score) == pytest.approx(_auc(score, y))


def test_roc_auc_refuses_nan_and_warns_on_one_class():
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or inf"):
            train.roc_auc([0, 1, 1], [0.1, bad, 0.3])
        with pytest.raises(ValueError, match="NaN or inf"):
            train.roc_auc_macro([0, 1], np.array([[0.5, 0.5], [bad, 0.2]]))
    with pytest.warns(UserWarning, match="one class only"):
        assert np.isnan(train.roc_auc([1, 1], [0.2, 0.3]))


def test_roc_auc_macro_by_hand():
    y = [0, 1, 2, 2]
    prob = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    assert train.roc_auc_macro(y, prob) == pytest.approx(1.0)
    prob[1, 2] = 0.5  # class 2: pos 0.7, 0.4 vs neg 0.1, 0.5 -> 3 of 4 pairs
    assert train.roc_auc_macro(y, prob) == pytest.approx((1 + 1 + 0.75) / 3)
    assert train.roc_auc_macro([0, 0, 2, 2], prob) == pytest.approx(0.75)  # absent class 1 left out


def test_delta_mtl_averages_within_each_task_first():
    stl = {"dose_score": 2.5, "dvh_score": 2.0, "dice": 0.75, "dice_Brainstem": 0.1}
    mtl = {"dose_score": 2.0, "dvh_score": 2.0, "dice": 0.8, "dice_Brainstem": 0.9}
    # dose task: mean(+0.2 (lower is better), 0) = 0.1; structures: (0.8 - 0.75) / 0.75; per-ROI keys ignored
    overall, per_task = train.delta_mtl(mtl, stl, {"dose": 0, "structures": 0})
    assert per_task == pytest.approx({"dose": 10.0, "structures": 100 / 15})
    assert overall == pytest.approx((10.0 + 100 / 15) / 2)  # a flat mean over 3 metrics would differ
    assert train.delta_mtl(stl, stl, ["dose", "structures"])[0] == 0.0
    assert train.delta_mtl({"auc_severe": 0.6}, {"auc_severe": 0.8}, ["severe"])[0] == pytest.approx(-25.0)
    overall, per_task = train.delta_mtl({"auc_severe": np.nan, "auc_covid": 0.9}, {"auc_severe": 0.8, "auc_covid": 0.6},
                                        ["covid", "severe"])
    assert per_task == {"covid": pytest.approx(50.0)} and overall == pytest.approx(50.0)


def test_openkbp_scores_by_hand():
    # voxels of 10 mm: volume 1000 mm^3 -> n = max(1, round(0.1)) = 1 voxel in 0.1 cc
    ref = np.zeros((3, 4), np.float64)
    ref[0] = [1, 2, 3, 4]  # OAR voxels
    ref[1, :] = [10, 20, 30, 40]
    ref[2, 0] = 50  # target voxels: rows 1 and (2, 0)
    mask = np.ones((3, 4), bool)
    oar = np.zeros((3, 4), bool)
    oar[0] = True
    ptv = np.zeros((3, 4), bool)
    ptv[1] = True
    ptv[2, 0] = True
    structures = np.stack([oar, np.zeros((3, 4), bool), ptv])
    rois = ["Brainstem", "Larynx", "PTV70"]
    vox = np.array([10.0, 10.0, 10.0])
    dvh = train.openkbp_dvh(ref, structures, vox, rois)
    assert set(dvh) == {("D_0.1_cc", "Brainstem"), ("mean", "Brainstem"), ("D_99", "PTV70"), ("D_95", "PTV70"),
                        ("D_1", "PTV70")}  # no entry for the absent Larynx
    assert dvh[("D_0.1_cc", "Brainstem")] == pytest.approx(3.25)  # percentile 100 - 1/4*100 = 75 of 1..4
    assert dvh[("mean", "Brainstem")] == pytest.approx(2.5)
    assert dvh[("D_99", "PTV70")] == pytest.approx(10.4)  # percentile 1 of 10..50: 10 + 0.04 * 10
    assert dvh[("D_95", "PTV70")] == pytest.approx(12.0)
    assert dvh[("D_1", "PTV70")] == pytest.approx(49.6)
    pred = 2 * ref  # every DVH number doubles, so |difference| = the reference number
    dose, dvh_score = train.openkbp_scores([pred], [ref], [mask], [structures], [vox], roi_names=rois)
    assert dose == pytest.approx(ref.sum() / 12)
    assert dvh_score == pytest.approx((3.25 + 2.5 + 10.4 + 12 + 49.6) / 5)
    mask2 = np.zeros((3, 4), bool)  # a second patient, smaller mask, perfect: the dose score is a mean per patient
    mask2[:2] = True
    dose, dvh_score = train.openkbp_scores([pred, ref], [ref, ref], [mask, mask2], [structures] * 2, [vox] * 2,
                                           roi_names=rois)
    assert dose == pytest.approx(ref.sum() / 12 / 2)
    assert dvh_score == pytest.approx((3.25 + 2.5 + 10.4 + 12 + 49.6) / 10)


# ------------------------------------------------------------------ metrics, real OpenKBP sample
def _read_patient(folder):
    """Rebuild one OpenKBP patient from its CSVs (sparse `flat_index,value` rows, C order into 128^3)."""
    def read(name, values):
        path = folder / f"{name}.csv"
        if not path.exists():
            return None
        rows = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1) if values else 0, ndmin=2 if values else 1)
        arr = np.zeros(128 ** 3, np.float64 if values else bool)
        if values:
            arr[rows[:, 0].astype(np.int64)] = rows[:, 1]
        else:
            arr[rows.astype(np.int64)] = True
        return arr.reshape(128, 128, 128)

    empty = np.zeros((128,) * 3, bool)
    structures = np.stack([m if m is not None else empty for m in (read(r, False) for r in data.OPENKBP_ROIS)])
    return {"dose": read("dose", True), "mask": read("possible_dose_mask", False), "structures": structures,
            "vox": np.loadtxt(folder / "voxel_dimensions.csv")}


@pytest.fixture(scope="module")
def openkbp_sample():
    folders = sorted(REAL_OPENKBP.glob("*-pats/pt_*"))[:8]
    if len(folders) == 0:
        pytest.skip(f"no OpenKBP sample in {REAL_OPENKBP}")
    return [_read_patient(f) for f in folders]


def _scores(pats, pred):
    return train.openkbp_scores(pred, [p["dose"] for p in pats], [p["mask"] for p in pats],
                                [p["structures"] for p in pats], [p["vox"] for p in pats])


def test_openkbp_real_identity_and_constant_shift(openkbp_sample):
    pats = openkbp_sample
    assert _scores(pats, [p["dose"] for p in pats]) == (0.0, 0.0)
    c = 1.5
    dose, _ = _scores(pats, [p["dose"] + c * p["mask"] for p in pats])  # shift inside the possible-dose mask
    assert dose == pytest.approx(c)
    dose, dvh = _scores(pats, [p["dose"] + c for p in pats])  # shift everywhere: every DVH number moves by c
    assert dose == pytest.approx(np.mean([c * 128 ** 3 / p["mask"].sum() for p in pats]))
    assert dvh == pytest.approx(c)


def test_openkbp_real_dvh_numbers(openkbp_sample):
    p = openkbp_sample[0]  # test-pats/pt_242 (sorted), voxels 4.688 x 4.688 x 2 mm
    brainstem = p["dose"][p["structures"][0]]
    n = max(1, round(100 / np.prod(p["vox"])))  # 100 / 43.95 -> 2 voxels in 0.1 cc
    d01 = np.percentile(brainstem, 100 - n / brainstem.size * 100)
    dvh = train.openkbp_dvh(p["dose"], p["structures"], p["vox"])
    assert dvh[("D_0.1_cc", "Brainstem")] == pytest.approx(d01)
    assert dvh[("D_1", "PTV70")] == pytest.approx(np.percentile(p["dose"][p["structures"][9]], 99))
    present = [r for r, m in zip(data.OPENKBP_ROIS, p["structures"]) if m.any()]
    assert {roi for _, roi in dvh} == set(present) and len(present) < 10  # absent ROIs: no entry
    dose, dvh_score = _scores([p], [np.zeros_like(p["dose"])])  # zero prediction: the reference numbers
    assert dose == pytest.approx(p["dose"].sum() / p["mask"].sum())
    assert dvh_score == pytest.approx(np.mean(np.abs(list(dvh.values()))))


# ------------------------------------------------------------------ losses and task weighting
def test_dose_l1_inside_mask_in_scaled_units():
    pred = torch.tensor([[[0.5, 0.25, 9.0]]])
    target = torch.tensor([[[40.0, 40.0, 0.0]]])  # Gy; / 80 -> 0.5, 0.5
    mask = torch.tensor([[[1.0, 1.0, 0.0]]])  # the third voxel is outside: ignored
    assert train.dose_l1(pred, target, mask).item() == pytest.approx((0 + 0.25) / 2)


def test_bce_dice_perfect_vs_wrong():
    target = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    good = train.bce_dice((target * 2 - 1) * 20, target).item()
    bad = train.bce_dice((1 - 2 * target) * 20, target).item()
    assert good < 1e-3 and bad > 10


def test_dwa_weights_by_hand():
    w = ctan.Weighting("dwa", {"a": ("pixel", 1), "b": ("image", 2)})
    assert w.weights() == {"a": 1.0, "b": 1.0}  # first two epochs: equal
    w.end_epoch({"a": 1.0, "b": 2.0})
    w.end_epoch({"a": 0.5, "b": 2.0})  # ratios 0.5 and 1.0, temperature 2
    ea, eb = np.exp(0.25), np.exp(0.5)
    got = w.weights()
    assert got["a"] == pytest.approx(2 * ea / (ea + eb)) and got["b"] == pytest.approx(2 * eb / (ea + eb))
    total = w({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
    assert total.item() == pytest.approx(got["a"] + 3 * got["b"], rel=1e-6)
    restored = ctan.Weighting("dwa", {"a": ("pixel", 1), "b": ("image", 2)})
    restored.load_state_dict(w.state_dict())  # the history travels in the checkpoint
    assert restored.weights() == got


def test_state_dicts_carry_the_task_order_that_ctan_and_uncertainty_stack_their_weights_by():
    swapped = dict(reversed(TWO.items()))
    model, weighting = tiny_model("ctan", TWO, in_channels=1).eval(), ctan.Weighting("uncertainty", TWO)
    with torch.no_grad():
        weighting.log_vars.copy_(torch.tensor([0.5, -1.0]))
    x, buffer = torch.randn(2, 1, 32, 32), io.BytesIO()
    torch.save({"model": model.state_dict(), "weighting": weighting.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as train.py reads its checkpoints
    same, same_w = tiny_model("ctan", TWO, in_channels=1).eval(), ctan.Weighting("uncertainty", TWO)
    same.load_state_dict(saved["model"])
    same_w.load_state_dict(saved["weighting"])
    assert all(torch.equal(same(x)[t], model(x)[t]) for t in TWO) and same_w.weights() == weighting.weights()
    order = r"state_dict tasks must be the model's \['diagnosis', 'dose'\], got \['dose', 'diagnosis'\]$"
    with pytest.raises(ValueError, match=order):  # the stacked attention weights would load scrambled
        tiny_model("ctan", swapped, in_channels=1).load_state_dict(saved["model"])
    with pytest.raises(ValueError, match=r"must be this weighting's \['diagnosis', 'dose'\]"):  # so would log_vars
        ctan.Weighting("uncertainty", swapped).load_state_dict(saved["weighting"])
    hps = tiny_model("hps", TWO, in_channels=1)
    tiny_model("hps", swapped, in_channels=1).load_state_dict(hps.state_dict())  # its heads load by name
    inferior = tiny_model("stl", {"dose": ("pixel", 1)}, in_channels=1)
    superior = tiny_model("stl", {"dose": ("pixel", 1)}, in_channels=2)
    for channels in (inferior.channels[:2], inferior.channels[1:]):  # G for 2 of the scales, for other channels
        objective = ctan.GuidanceObjective(inferior, superior, ctan.GuidanceNetwork(2, channels))
        guided = ctan.GuidedModel(inferior, ctan.GuidanceNetwork(2, channels))
        message = rf"G's input must be maps of {re.escape(str(channels))} channels .*, got \[4, 16, 32, 64, 128\]$"
        for call, x in ((objective, torch.randn(2, 2, 32, 32)), (guided, torch.randn(2, 1, 32, 32))):
            with pytest.raises(ValueError, match=message):  # refused in one line, not truncated or torch's conv error
                call(x)


def test_best_checkpoint_rule():
    nan = float("nan")
    assert train.better(0.7, None, "auc_covid") and train.better(0.7, nan, "auc_covid")
    assert train.better(1.0, 1.0, "auc_severe")  # a tie goes to the later epoch
    assert not train.better(0.9, 1.0, "auc_severe") and not train.better(nan, 0.5, "auc_severe")
    assert train.better(4.0, 5.0, "dose_score") and not train.better(5.0, 4.0, "dose_score")  # lower is better


def test_mfe_weighting_is_seg_plus_quarter_cls_and_the_default_for_mfe():
    w = ctan.Weighting("mfe", {"segmentation": ("pixel", 1), "diagnosis": ("image", 7)})
    assert w({"segmentation": torch.tensor(2.0), "diagnosis": torch.tensor(4.0)}).item() == pytest.approx(2 + 0.25 * 4)
    for arch, extra, want in (("mfe", [], "mfe"), ("mfe", ["--weighting", "dwa"], "dwa"), ("ctan", [], "equal")):
        args = train.parse_args(["--dataset", "ham10000", "--arch", arch, "--device", "cpu", *extra])
        assert train.resolve_config(args)["weighting"] == want


def test_equal_weighting_is_the_plain_sum():
    w = ctan.Weighting("equal", TWO)
    assert w({"dose": torch.tensor(2.0), "diagnosis": torch.tensor(3.0)}).item() == 5.0
    assert w.weights() == {"dose": 1.0, "diagnosis": 1.0} and not list(w.parameters())


def test_uncertainty_weighting_is_learnable():
    w = ctan.Weighting("uncertainty", {"a": ("pixel", 1), "b": ("image", 2)})
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(4.0)}
    assert w(losses).item() == pytest.approx(0.5 * 2 + 0.5 * 4)  # s = 0
    with torch.no_grad():
        w.log_vars[0] = np.log(2.0)  # exp(-s)/2 * 2 + s/2
    assert w(losses).item() == pytest.approx(0.25 * 2 + 0.5 * np.log(2.0) + 0.5 * 4)
    assert w.weights() == pytest.approx({"a": 0.25, "b": 0.5})  # w_t = exp(-l_t) / 2
    assert [n for n, _ in w.named_parameters()] == ["log_vars"]


# ------------------------------------------------------------------ config: one table, the device picks the GPU path
def test_defaults_when_cuda_is_available_match_the_readme(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    readme = (Path(__file__).resolve().parent / "README.md").read_text()
    rows = readme.split("<!-- gpu-defaults -->")[1].strip().splitlines()[2:]
    table = {cells[1].strip("` "): cells[2].strip("` ") for cells in (r.split("|") for r in rows) if len(cells) > 3}
    for dataset, dims in (("openkbp", 2), ("openkbp", 3), ("ham10000", 2), ("stoic", 3)):
        cfg = train.resolve_config(train.parse_args(["--dataset", dataset, "--arch", "ctan", "--dims", str(dims)]))
        assert cfg["device"] == "cuda" and cfg["precision"] == "bf16" and cfg["channels_last"] is True
        key = f"{dataset} {dims}D"
        assert table[key] == f"width {cfg['width']}, depth {','.join(map(str, cfg['depth']))}, batch " \
                             f"{cfg['batch_size']}, {cfg['epochs']} epochs, lr {cfg['lr']:g}", key
    cpu = train.resolve_config(train.parse_args(["--dataset", "openkbp", "--arch", "ctan", "--device", "cpu"]))
    assert (cpu["precision"], cpu["channels_last"], cpu["workers"]) == ("fp32", False, 0)


def test_ci_runs_the_readme_quick_start_in_order():
    """.ci/run is a new user's sequence: each line of README's Quick start (comments aside; the virtual
    environment made in a temporary folder there), in the same order."""
    strip = lambda text: [line.split("  #")[0].strip() for line in text.splitlines()]
    block = (HERE / "README.md").read_text().split("## Quick start")[1].split("```bash\n")[1].split("```")[0]
    readme = [line for line in strip(block) if line and not line.startswith("python3 -m venv")]
    ci = strip((HERE / ".ci" / "run").read_text())
    where = [ci.index(command) if command in ci else None for command in readme]
    assert len(readme) == 5 and None not in where and where == sorted(where), list(zip(readme, where))


def test_collectives_run_on_the_models_device(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: seen.append(t.device))
    run = SimpleNamespace(device=torch.device("meta"), world=2)
    train.all_reduce_mean(torch.zeros(3, device="meta"), run)
    assert seen == [torch.device("meta")]
    with pytest.raises(AssertionError):
        train.all_reduce_mean(torch.zeros(3), run)  # a CPU tensor for a model elsewhere: NCCL would crash


# ------------------------------------------------------------------ end to end (tiny synthetic data)
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Tiny synthetic files made by data.py: {name: path}."""
    folder = tmp_path_factory.mktemp("data")
    sizes = {"openkbp": dict(n=6, size=32), "ham10000": dict(n=120, size=32), "stoic": dict(n=12, size=32)}
    return {name: data.synth(name, folder / f"{name}.h5", seed=1, **kw) for name, kw in sizes.items()}


def _argv(synthetic, out, name="openkbp", arch="hps", *extra):
    return ["--dataset", name, "--arch", arch, "--data", str(synthetic[name]), "--out", str(out), "--device", "cpu",
            "--workers", "0", "--width", "4", "--depth", "2,2,2,2", "--batch-size", "4", "--max-steps-per-epoch", "2",
            "--epochs", "1", "--max-eval-cases", "1", *extra]


def _fails(argv, capsys, *expected, code=2):
    """train.main(argv) exits with `code` and one stderr line holding every `expected`."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code and "\n" not in err and all(x in err for x in expected), err
    return err


def test_class_weights_are_inverse_label_frequencies(synthetic):
    ds = data.open_dataset(synthetic["ham10000"], "train")
    labels = [ds.case(i)["diagnosis"] for i in range(ds.num_cases)]
    assert ds.labels("diagnosis").tolist() == labels  # read at once, without the images
    counts = np.bincount(labels, minlength=7)
    want = np.where(counts > 0, 1 / np.maximum(counts, 1), 0.0)
    got = train.class_weights_from(ds, {"segmentation": ("pixel", 1), "diagnosis": ("image", 7)}, "cpu")
    assert list(got) == ["diagnosis"] and np.allclose(got["diagnosis"].numpy(), want / want[want > 0].mean())


def test_class_weights_reach_the_training_loss(synthetic, tmp_path, monkeypatch):
    """--class-weights: each training step's diagnosis loss is the cross-entropy weighted by inverse frequency,
    sum_i w_(y_i) (-log p_i(y_i)) / sum_i w_(y_i), computed here by hand."""
    steps, real = [], train.task_losses

    def spy(outputs, batch, tasks, class_weights=None):
        losses = real(outputs, batch, tasks, class_weights)
        steps.append((outputs["diagnosis"].detach(), batch["diagnosis"], class_weights, losses))
        return losses
    monkeypatch.setattr(train, "task_losses", spy)
    train.main(_argv(synthetic, tmp_path / "w", "ham10000", "hps", "--class-weights"))
    w = train.class_weights_from(data.open_dataset(synthetic["ham10000"], "train"), {"diagnosis": ("image", 7)}, "cpu")
    assert len(steps) == 2  # --max-steps-per-epoch 2; evaluation does not call task_losses
    for logits, y, weights, losses in steps:
        torch.testing.assert_close(weights["diagnosis"], w["diagnosis"])
        nll, w_y = -logits.float().log_softmax(1)[torch.arange(len(y)), y], w["diagnosis"][y]
        torch.testing.assert_close(losses["diagnosis"].detach(), (w_y * nll).sum() / w_y.sum())


def test_resume_is_exact(synthetic, tmp_path, monkeypatch):
    """1 epoch + resume to 2 == 2 epochs straight: same weights (model and the learnable uncertainty
    weights), optimizer state, metrics; best.pt is written again if an interrupt came just before it."""
    monkeypatch.setattr(train, "better", lambda value, best, key: best is None)  # epoch 1 stays the best
    args = ["--arch", "ctan", "--epochs", "2", "--weighting", "uncertainty", "--seed", "5"]
    straight = train.main(_argv(synthetic, tmp_path / "a") + args)
    stopped = train.main(_argv(synthetic, tmp_path / "b") + args + ["--stop-after", "1"])
    assert stopped["stopped_after"] == 1 and torch.load(tmp_path / "b" / "last.pt")["epoch"] == 1
    (tmp_path / "b" / "best.pt").unlink()  # as if interrupted between last.pt and best.pt: --resume writes it again
    resumed = train.main(["--resume", "--out", str(tmp_path / "b"), "--dataset", "openkbp", "--arch", "ctan"])
    a, b = (torch.load(tmp_path / d / "last.pt") for d in "ab")  # weights_only: tensors and plain values
    assert a["epoch"] == b["epoch"] == 2 and b["config"]["width"] == 4  # the settings came from last.pt
    for part in ("model", "weighting"):
        assert a[part].keys() == b[part].keys()
        assert all(k == "_extra_state" or torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert a["weighting"]["_extra_state"] == b["weighting"]["_extra_state"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)  # NaN-safe equality
    assert same(straight["test"], resumed["test"]), (straight["test"], resumed["test"])
    lines = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["epoch"] for r in lines[1]] == [1, 2]
    for key in ("val", "weights", "losses", "lr"):
        assert same([r[key] for r in lines[0]], [r[key] for r in lines[1]]), key


def test_outputs_and_delta_mtl_against_the_matching_stl_run(synthetic, tmp_path, capsys):
    stl = train.main(_argv(synthetic, tmp_path / "openkbp-stl", "openkbp", "stl"))
    assert stl["delta_mtl"] is None and stl["data_digest"] == data.open_dataset(synthetic["openkbp"], "test").digest
    stl["test"]["dice"] = 0.5  # 2 steps leave the Dice at 0, where no relative change exists
    (tmp_path / "openkbp-stl" / "results.json").write_text(json.dumps(stl))
    capsys.readouterr()
    res = train.main(_argv(synthetic, tmp_path / "openkbp-hps", "openkbp", "hps", "--log-every", "0", "--epochs", "2",
                           "--stl", str(tmp_path / "openkbp-stl")))
    log = capsys.readouterr().out.strip().splitlines()
    assert "SYNTHETIC" in "\n".join(log) and '"width": 4' in log[0]  # loud synthetic warning, effective config
    assert any("epoch 1 step 1/2" in l and "samples/s" in l and "ETA" in l for l in log)  # progress in an epoch
    out = tmp_path / "openkbp-hps"
    assert log[-1] == f"results: {out / 'results.json'}"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "predictions",
                                                      "results.json"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["arch"] == "hps" and saved["dims"] == 2 and saved["split"] == "test"
    assert set(saved["test"]) >= {"dose_score", "dvh_score", "dice", "dice_Brainstem", "dice_PTV70"}
    want = train.delta_mtl(saved["test"], stl["test"], ["dose", "structures"])
    assert saved["delta_mtl"] == pytest.approx(want[0]) and saved["delta_mtl_per_task"] == pytest.approx(want[1])
    assert set(saved["delta_mtl_per_task"]) == {"dose", "structures"}
    assert [p.name for p in (out / "predictions").glob("*.png")] == ["syn_val_000.png"]  # first val case
    last = torch.load(out / "last.pt")
    assert {"model", "optimizer", "scheduler", "weighting", "epoch", "rng", "config", "best"} <= set(last)
    argv = _argv(synthetic, out, "openkbp", "hps", "--eval-only", str(out / "best.pt"))
    del argv[argv.index("--batch-size"):argv.index("--batch-size") + 2]
    again = train.main(argv)
    assert json.dumps(again["test"]) == json.dumps(res["test"]) and (out / "results_eval.json").exists()
    assert again["config"]["batch_size"] == 4  # the checkpoint's, not the table's (3D: not the 2D default)
    err = _fails(argv, capsys, "holds a run", "results_eval.json", "start over with --overwrite")
    assert "--resume" not in err  # which --eval-only does not take


def test_delta_mtl_only_against_a_matching_stl_run(synthetic, tmp_path, capsys):
    stl_dir = tmp_path / "openkbp-stl"
    good = train.main(_argv(synthetic, stl_dir, "openkbp", "stl"))
    other = data.synth("openkbp", tmp_path / "other.h5", n=6, size=32, seed=2)  # same kind, other content
    res = train.main(_argv(synthetic, tmp_path / "x", "openkbp", "hps", "--data", str(other), "--stl", str(stl_dir)))
    assert res["delta_mtl"] is None and "data_digest" in res["delta_mtl_note"]
    assert json.loads((tmp_path / "x" / "results.json").read_text())["delta_mtl_note"] == res["delta_mtl_note"]
    assert "no Delta_MTL" in capsys.readouterr().out
    cfg = dict(res["config"], data=str(synthetic["openkbp"]), stl=str(stl_dir / "results.json"))
    this = {k: good[k] for k in ("dataset", "synthetic", "data_digest", "dims", "split")}
    assert train.matching_stl(cfg, this)[0]["test"] == good["test"]  # the same data: comparable
    for key, value in (("dims", 3), ("synthetic", False), ("split", "val")):  # 2D vs 3D, synthetic vs real, ...
        stl, why = train.matching_stl(cfg, {**this, key: value})
        assert stl is None and key in why and "not comparable" in why
    hps = dict(cfg, stl=str(tmp_path / "x"))  # a run of another arch named as the baseline: refused
    assert train.matching_stl(hps, this) == (None, f"{tmp_path / 'x' / 'results.json'} is a run of 'hps', not of stl: "
                                                   "name an STL run with --stl")


def test_summary_tables_from_results_json(tmp_path, capsys):
    """--summary DIR: mean ± sample sd over seeds, Delta_MTL, CTAN and each arch against STL paired by seed (numbers
    by hand), missing seeds."""
    dose = {"stl": (20, 22, 21), "hps": (18, 20, 19), "ctan": (16, 19, 17)}  # per seed 0, 1, 2
    delta = {"hps": ((5, 4, 6), (6, 8, 10), (10, 12, 8)), "ctan": ((10, 8, 12), (14, 10, 18), (12, 12, 12))}
    for arch, scores in dose.items():  # delta: (Delta_MTL, Delta dose, Delta structures) per seed
        for s, score in enumerate(scores):
            res = {"dataset": "openkbp", "arch": arch, "data_digest": "d", "delta_mtl": None, "config": {"seed": s,
                   "arch": arch, "tasks": {"dose": ["pixel", 1], "structures": ["pixel", 10]}},
                   "test": {"dose_score": score, "dvh_score": 30.0 + s, "dice": 0.1 + 0.01 * s, "dice_Brainstem": 0.0}}
            if arch != "stl":
                overall, d_dose, d_structures = delta[arch][s]
                res.update(delta_mtl=overall, delta_mtl_per_task={"dose": d_dose, "structures": d_structures})
            (tmp_path / f"seed{s}" / f"kbp_full-{arch}").mkdir(parents=True)
            (tmp_path / f"seed{s}" / f"kbp_full-{arch}" / "results.json").write_text(json.dumps(res))
    assert train.main(["--summary", str(tmp_path)]) is None
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert [row.split(" | ")[0] for row in rows[:3]] == ["| `stl`", "| `hps`", "| `ctan`"]  # the README's order
    assert rows[2].startswith("| `ctan` | 3 | 17.33 ± 1.53 | 31.00 ± 1.00 | 0.1100 ± 0.0100 | +10.00 ± 2.00 % |")
    assert rows[2].endswith("| +14.00 ± 3.46 % | +12.00 ± 2.00 % |") and rows[0].endswith("|  |  |  |")
    # d(dose) = -4, -3, -4 vs stl: mean -11/3, sd sqrt(1/3), t = -11; d(Delta_MTL) vs stl (ctan's own) = 10, 14, 12:
    # t = 12 / (2 / sqrt(3)); vs hps = 5, 8, 2: t = 5 / (3 / sqrt(3)); vs hps without seed 2: 5, 8: t = 6.5 / 1.5
    assert "| `stl` | dose_score | 3 | -3.667 ± 0.577 | 3/3 | -11.00 | yes (t_0.975,2 = 4.303) |" in rows
    assert "| `stl` | Delta_MTL | 3 | +12.00 ± 2.00 % | 3/3 | +10.39 | yes (t_0.975,2 = 4.303) |" in rows
    assert "| `hps` | Delta_MTL | 3 | +5.00 ± 3.00 % | 3/3 | +2.89 | no (t_0.975,2 = 4.303) |" in rows
    assert "| `hps` | dice | 3 | +0.00 ± 0.00 | 0/3 |" in out  # a tie is not better
    against_stl = out.split("each arch against STL")[1]  # d = arch - stl: Delta_MTL is the arch's own, 5, 6, 10
    assert "| `hps` | Delta_MTL | 3 | +7.00 ± 2.65 % | 3/3 | +4.58 | yes (t_0.975,2 = 4.303) |" in against_stl
    assert "| `ctan` | dose_score | 3 | -3.667 ± 0.577 | 3/3 | -11.00 | yes (t_0.975,2 = 4.303) |" in against_stl
    shutil.rmtree(tmp_path / "seed2" / "kbp_full-hps")
    assert train.main(["--summary", str(tmp_path)]) is None
    out = capsys.readouterr().out
    assert "| `hps` | 2 (1 missing: seed 2) | 19.00 ± 1.41 |" in out
    assert "| `hps` | Delta_MTL | 2 | +6.50 ± 2.12 % | 2/2 | +4.33 | no (t_0.975,1 = 12.706) |" in out
    _fails(["--summary", str(tmp_path / "seed0" / "nothing")], capsys, "holds no results.json", "nothing")
    shutil.copytree(tmp_path / "seed0" / "kbp_full-ctan", tmp_path / "seed5" / "kbp_full-ctan")  # seed 0 twice
    _fails(["--summary", str(tmp_path)], capsys, "seed5/kbp_full-ctan/results.json: a second ctan run of seed 0")
    shutil.rmtree(tmp_path / "seed5")
    broken = tmp_path / "seed7" / "f-stl" / "results.json"  # e.g. cut short when a disk filled up
    broken.parent.mkdir(parents=True)
    broken.write_text('{"test": ')
    _fails(["--summary", str(tmp_path)], capsys, f"{broken} is not readable JSON")
    _fails([], capsys, "--dataset and --arch are required")


def test_nothing_is_silently_replaced(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    first = train.main(_argv(synthetic, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _fails(_argv(synthetic, out), capsys, str(out), "--resume", "--out", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    again = train.main(_argv(synthetic, out, "openkbp", "hps", "--overwrite"))
    assert json.dumps(again["test"]) == json.dumps(first["test"])  # started over: same seed, same numbers
    _fails(_argv(synthetic, tmp_path / "none", "openkbp", "hps", "--resume"), capsys, "no last.pt")
    assert not (tmp_path / "none").exists()
    # the default --out keeps runs on different data files apart
    argv = lambda path, dims: ["--dataset", "openkbp", "--arch", "ctan", "--data", path, "--dims", dims]
    outs = {train.resolve_config(train.parse_args(argv(p, d)))["out"] for p in ("a/x.h5", "b/y.h5") for d in "23"}
    assert len(outs) == 4


@pytest.mark.parametrize("option, value", [("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0"),
                                           ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "nan"), ("--width", "0"),
                                           ("--workers", "-1"), ("--depth", "2,2"), ("--steps", "0"),
                                           ("--max-steps-per-epoch", "0"), ("--weight-decay", "-1")])
def test_bad_values_are_refused_at_parse_time(synthetic, tmp_path, capsys, option, value):
    _fails(_argv(synthetic, tmp_path / "r") + [f"{option}={value}"], capsys, option, repr(value))
    assert not (tmp_path / "r").exists()


def test_user_errors_are_one_line(synthetic, tmp_path, capsys):
    cases = [
        (_argv(synthetic, tmp_path / "x") + ["--data", str(tmp_path / "missing.h5")], "data.py synth openkbp"),
        (_argv(synthetic, tmp_path / "x", "openkbp", "nope"), "ctan"),
        (_argv(synthetic, tmp_path / "x") + ["--dataset", "mnist"], "ham10000"),
        (_argv(synthetic, tmp_path / "x", "ham10000") + ["--data", str(synthetic["openkbp"])], "holds openkbp"),
        (_argv(synthetic, tmp_path / "x", "openkbp", "hps") + ["--transition", "conv"], "applies to mtan and ctan"),
        (_argv(synthetic, tmp_path / "x", "openkbp", "hps,ctan"), "for --bench"),
        (_argv(synthetic, tmp_path / "x", "openkbp", "ctan", "--stage", "b"), "--arch guidance only"),
        (_argv(synthetic, tmp_path / "x", "stoic", "hps", "--batch-size", "1"), "--batch-size 2"),  # 32^3: 1 voxel
        (_argv(synthetic, tmp_path / "x", "openkbp", "hps", "--stl", str(tmp_path / "stl")), "stl not found"),
        (_argv(synthetic, tmp_path / "x", "openkbp", "hps", "--class-weights"), "openkbp has no classification task"),
        (_argv(synthetic, tmp_path / "x", "openkbp", "hps", "--data", str(tmp_path)), "is a folder: --data takes"),
        (_argv(synthetic, tmp_path / "x", "openkbp", "hps", "--data", str(synthetic["stoic"])), "stoic.h5 holds stoic"),
        (_argv(synthetic, tmp_path / "x", "openkbp", "hps", "--bench", "--data", str(tmp_path / "typo.h5")),
         "typo.h5 is not a file: name an HDF5 file, or time random tensors: --data none"),
    ]
    (tmp_path / "file.txt").write_text("")
    for out in ("file.txt", "file.txt/run"):  # --out in a file: refused before training, not after epoch 1
        cases.append((_argv(synthetic, tmp_path / out), f"{tmp_path / 'file.txt'} is not a folder this user can write"))
    for argv, expected in cases:
        _fails(argv, capsys, "error: ", expected)
    assert not (tmp_path / "x").exists() and (tmp_path / "file.txt").read_text() == ""


def test_training_on_a_damaged_file_names_file_and_dataset(synthetic, tmp_path, capsys):
    path = _copy(synthetic["openkbp"], tmp_path / "damaged.h5")
    with h5py.File(path) as f:
        chunk = f["train/image"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(chunk.byte_offset + chunk.size // 2)
        fh.write(bytes(8))
    _fails(_argv(synthetic, tmp_path / "r", "openkbp", "hps", "--data", str(path)), capsys, str(path), "train/image",
           "damaged")


def test_an_out_this_user_cannot_write_is_refused_before_training(synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.os, "access", lambda path, mode: False)  # a read-only folder (root may write anywhere)
    _fails(_argv(synthetic, tmp_path / "ro" / "run"), capsys, f"{tmp_path} is not a folder this user can write to")
    assert not (tmp_path / "ro").exists()


def test_resume_on_a_changed_data_file_is_refused(synthetic, tmp_path, capsys):
    path, out = _copy(synthetic["openkbp"], tmp_path / "k.h5"), tmp_path / "r"
    train.main(_argv(synthetic, out, "openkbp", "hps", "--data", str(path), "--epochs", "2", "--stop-after", "1"))
    data.synth("openkbp", path, n=6, size=32, seed=2, overwrite=True)  # the same name, other content
    _fails(_argv(synthetic, out, "openkbp", "hps", "--data", str(path), "--epochs", "2", "--resume"), capsys,
           f"{path} changed since this run began")


def test_damaged_or_foreign_checkpoints_get_one_line(synthetic, tmp_path, capsys):
    out = tmp_path / "r"
    train.main(_argv(synthetic, out, "openkbp", "hps", "--epochs", "2", "--stop-after", "1"))
    good = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(good[: len(good) // 2])
    _fails(_argv(synthetic, out, "openkbp", "hps", "--resume"), capsys, str(out / "last.pt"), "truncated or damaged")
    _fails(_argv(synthetic, tmp_path / "e", "openkbp", "hps", "--eval-only", str(out / "last.pt")), capsys, "last.pt")
    other = torch.load(io.BytesIO(good), weights_only=True)
    other["model"].pop("heads.dose.out.bias")  # e.g. written by another version of the code
    torch.save(other, out / "last.pt")
    _fails(_argv(synthetic, out, "openkbp", "hps", "--epochs", "2", "--resume"), capsys, str(out / "last.pt"),
           "holds another model")
    other = torch.load(io.BytesIO(good), weights_only=True)
    del other["weighting"]["_extra_state"]["tasks"]  # the loss weighting's state of another version
    torch.save(other, out / "last.pt")
    _fails(_argv(synthetic, out, "openkbp", "hps", "--epochs", "2", "--resume"), capsys, str(out / "last.pt"),
           "state_dict tasks must be this weighting's")
    (tmp_path / "empty.pt").write_bytes(b"")  # torch's error has no message: one line all the same
    _fails(_argv(synthetic, tmp_path / "e", "openkbp", "hps", "--eval-only", str(tmp_path / "empty.pt")), capsys,
           "empty.pt is not a readable checkpoint", "truncated or damaged")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    _fails(_argv(synthetic, tmp_path / "e", "openkbp", "hps", "--eval-only", str(tmp_path / "foreign.pt")), capsys,
           "foreign.pt", "not a train.py checkpoint")


def test_ctrl_c_stops_with_one_line_and_says_what_was_saved(synthetic, tmp_path, capsys, monkeypatch):
    real = train.train_step
    calls = []

    def interrupted_at(n):
        def step(run, batch):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(run, batch)
        calls.clear()
        monkeypatch.setattr(train, "train_step", step)

    monkeypatch.setattr(train, "check_out", lambda cfg, log: (_ for _ in ()).throw(KeyboardInterrupt))
    _fails(_argv(synthetic, tmp_path / "a", "openkbp", "hps"), capsys, "nothing was saved", code=130)  # at start
    monkeypatch.undo()
    interrupted_at(2)  # in epoch 1: nothing to resume, no folder left behind
    _fails(_argv(synthetic, tmp_path / "a", "openkbp", "hps", "--epochs", "2"), capsys, "nothing was saved", code=130)
    assert not (tmp_path / "a").exists()
    interrupted_at(3)  # in epoch 2: last.pt holds epoch 1, and --resume continues from it
    _fails(_argv(synthetic, tmp_path / "b", "openkbp", "hps", "--epochs", "2"), capsys, "last.pt", "--resume", code=130)
    monkeypatch.setattr(train, "train_step", real)
    assert train.main(_argv(synthetic, tmp_path / "b", "openkbp", "hps", "--epochs", "2", "--resume"))["test_epoch"]
    monkeypatch.setattr(train, "bench", lambda cfg, log: (_ for _ in ()).throw(KeyboardInterrupt))
    _fails(_argv(synthetic, tmp_path / "b", "openkbp", "hps", "--bench"), capsys, "nothing was saved", code=130)
    assert (tmp_path / "b" / "last.pt").exists()  # a benchmark stopped in a run's folder names no last.pt, removes none


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(synthetic, tmp_path, capsys, monkeypatch):
    real = train.task_losses

    def poisoned(outputs, batch, tasks, class_weights=None):
        out = real(outputs, batch, tasks, class_weights)
        poisoned.calls += 1
        return {**out, "dose": out["dose"] * float("nan")} if poisoned.calls > 2 else out  # epoch 2 (2 steps/epoch)

    poisoned.calls = 0
    monkeypatch.setattr(train, "task_losses", poisoned)
    _fails(_argv(synthetic, tmp_path / "n", "openkbp", "hps", "--epochs", "2"), capsys, "non-finite loss at epoch 2")
    assert torch.load(tmp_path / "n" / "last.pt")["epoch"] == 1


def test_single_class_auc_is_nan_with_a_warning_in_the_results(synthetic, tmp_path, capsys, monkeypatch):
    real = train.EVALUATORS["stoic"]
    monkeypatch.setitem(train.EVALUATORS, "stoic", lambda *a: {**real(*a), "auc_covid": train.roc_auc([1, 1], [.1, .2],
                                                                                                         "auc_covid")})
    res = train.main(_argv(synthetic, tmp_path / "s", "stoic", "ctan", "--batch-size", "2"))
    assert np.isnan(res["test"]["auc_covid"]) and "auc_covid is NaN: the 2 cases hold one class only" in res["warnings"]
    assert "WARNING: test auc_covid is NaN" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "results.json").read_text())["warnings"] == res["warnings"]
    assert set(res["test"]) == {"auc_severe", "auc_covid"} and res["config"]["dims"] == 3


class Echo(torch.nn.Module):
    """A model that returns its input as every pixel-level output: predictions show where each slice went."""
    def forward(self, x):
        return {"dose": x, "structures": x.repeat(1, 10, *[1] * (x.dim() - 2))}


def test_predict_reads_inputs_per_item_and_targets_once_a_case(synthetic, monkeypatch):
    """2D: each slice's prediction goes back to its own axial slice of the case's volume (the first case only)."""
    ds = data.open_dataset(synthetic["openkbp"], "train")
    cfg = dict(train.resolve_config(train.parse_args(_argv(synthetic, "x"))), tasks=ds.tasks, roi_names=ds.roi_names)
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), model=Echo())
    reads, real = [], data._read
    spy = lambda path, array, case, at=None: reads.append((array.name, at)) or real(path, array, case, at)  # noqa: E731
    monkeypatch.setattr(data, "_read", spy)
    (raw, pred), = train.predict(run, ds, max_cases=1)  # the first case only
    assert raw["id"] == ds.ids[0] and ds.num_cases > 1 and pred["structures"].shape == (10, 32, 32, 32)
    ct = np.clip(raw["image"].astype(np.float32), data.HU_MIN, data.HU_MAX) / data.HU_SCALE  # as an item reads it
    np.testing.assert_array_equal(pred["dose"][0], ct)
    np.testing.assert_array_equal(pred["structures"][9], ct)
    assert {name for name, at in reads if at is not None} == {"/train/image"}  # one slice at a time
    assert sorted(name for name, at in reads if at is None) == sorted(f"/train/{k}" for k in data.schema("openkbp", ()))


@pytest.mark.parametrize("dims", [2, 3])
def test_rt_evaluation_of_a_perfect_prediction(synthetic, tmp_path, monkeypatch, dims):
    """The scoring of whole volumes, dose rescaled to Gy: the truth scores dose 0, DVH 0, Dice 1 (ROIs absent from a
    patient are not scored). `predict` is replaced by the truth; its reassembly of 2D slices is tested above."""
    argv = _argv(synthetic, tmp_path / "p", "openkbp", "hps", "--dims", str(dims))
    cfg = train.resolve_config(train.parse_args(argv))
    splits = train.open_splits(cfg)
    run = SimpleNamespace(cfg=cfg)

    def oracle(run, ds, max_cases=None):
        for i in range(ds.num_cases):
            raw = ds.case(i)
            yield raw, {"dose": raw["dose"][None] / train.DOSE_SCALE_GY, "structures": raw["structures"] * 2.0 - 1}

    monkeypatch.setattr(train, "predict", oracle)
    metrics, notes = train.evaluate(run, splits["test"], preview_dir=tmp_path / "png")
    assert metrics["dose_score"] < 1e-5 and metrics["dvh_score"] < 1e-5 and metrics["dice"] == 1 and not notes
    assert len(list((tmp_path / "png").glob("*.png"))) == splits["test"].num_cases


def test_ham10000_learns_beyond_chance(synthetic, tmp_path):
    """Within seconds: lesion Dice far above an empty mask (0) and balanced accuracy above chance (1/7)."""
    res = train.main(_argv(synthetic, tmp_path / "h", "ham10000", "hps", "--epochs", "6", "--max-steps-per-epoch",
                           "10", "--batch-size", "8", "--lr", "3e-3", "--width", "8", "--max-eval-cases", "10"))
    assert res["test"]["balanced_accuracy"] > 1 / 7 + 0.1 and res["test"]["dice"] > 0.5
    assert set(res["test"]) == {"dice", "isic_jaccard", "balanced_accuracy", "auc"}


def test_every_arch_trains_under_bf16_autocast_and_channels_last(synthetic, tmp_path, monkeypatch):
    """The GPU path's choices, run on a CPU: bf16 autocast and channels-last memory (input and weights) in every
    forward pass, every arch end to end (2D: a CPU has no fast bf16 conv3d; 3D is checked on the networks above)."""
    calls, real = [], train.build_model

    def build_model(*args, **kwargs):
        model = real(*args, **kwargs)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        conv = next(m for m in convs if m.in_channels > 1 and m.kernel_size[0] > 1)
        conv.register_forward_pre_hook(lambda m, inp: calls.append(  # a 3x3 conv of > 1 channel: formats differ
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
             inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous(),
             m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous())))
        return model
    monkeypatch.setattr(train, "build_model", build_model)
    for arch in ctan.ARCHS:
        calls.clear()
        res = train.main(_argv(synthetic, tmp_path / arch, "openkbp", arch, "--precision", "bf16", "--channels-last",
                               "--max-steps-per-epoch", "1"))
        assert res["config"]["precision"] == "bf16" and np.isfinite(res["test"]["dose_score"])
        assert len(calls) > 2 and set(calls) == {(True, torch.bfloat16, True, True)}, (arch, set(calls))



def test_forward_takes_a_compiled_model():
    """torch.compile's module refuses len(), so `forward` must not take its truth value (--compile once crashed)."""
    class Compiled(torch.nn.Module):  # like torch._dynamo's OptimizedModule
        def __len__(self):
            raise TypeError("Compiled does not support len()")

        def forward(self, x):
            return {"x": x}

    run = SimpleNamespace(device=torch.device("cpu"), cfg={"precision": "fp32"}, model=None)
    assert train.forward(run, {"image": torch.ones(3)}, Compiled())["x"].sum() == 3


def test_transition_option_reaches_the_model(synthetic, tmp_path):
    sizes = {}
    for transition in ("block", "conv"):
        cfg = train.resolve_config(train.parse_args(_argv(synthetic, tmp_path, "openkbp", "ctan", "--transition",
                                                          transition)))
        model = train.build_model(cfg, data.task_spec("openkbp", 10), 1)
        sizes[transition] = count_parameters(model)
        assert isinstance(model.transitions["2"], ctan.Bottleneck) == (transition == "block")
    assert sizes["conv"] < sizes["block"]


# ------------------------------------------------------------------ benchmark and multi-process training
def test_bench_times_several_archs_with_flops(synthetic, tmp_path, capsys):
    """--bench runs (a measurement: nothing about its times is asserted)."""
    argv = _argv(synthetic, tmp_path / "bench", "ham10000", "hps,ctan") + ["--bench", "--steps", "1", "--batch-size",
                                                                          "2", "--peak-tflops", "1", "--width", "16"]
    result = train.main(argv)
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert lines == result["results"] + [{"ratios_vs": "hps", "ratios": result["ratios"]}]
    hps, ctn = result["results"]
    assert hps["input"] == [2, 3, 32, 32] and hps["precision"] == "fp32"  # random tensors of the --data file's size
    assert ctn["gflop_per_step"] > hps["gflop_per_step"] > 0 and ctn["params"] > hps["params"]
    assert hps["mfu"] == pytest.approx(hps["tflops"], rel=1e-3, abs=1e-4)  # peak 1 TFLOP/s
    assert 0 < hps["estimated_memory_gib"] < ctn["estimated_memory_gib"]
    assert result["ratios"]["ctan"]["flops"] == pytest.approx(ctn["gflop_per_step"] / hps["gflop_per_step"], rel=1e-2)
    assert hps["hdf5"]["file"] == str(synthetic["ham10000"]) and 0 <= hps["hdf5"]["data_wait_fraction"] <= 1
    assert not (tmp_path / "bench").exists()  # a benchmark writes no run


def test_bench_with_compile_times_the_compiled_model(synthetic, tmp_path, monkeypatch):
    """torch.compile never compiles code first called under a dispatch mode such as FlopCounterMode: --bench counts
    FLOPs on the eager model and calls the compiled one outside any mode (it once timed eager steps as compiled)."""
    modes = []

    class Compiled(torch.nn.Module):  # stands in for torch.compile's module: records the mode of every call
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            modes.append(torch.utils._python_dispatch._get_current_dispatch_mode())
            return self.net(x)

    monkeypatch.setattr(torch, "compile", lambda net, **kw: Compiled(net))
    argv = _argv(synthetic, tmp_path / "b", "openkbp", "hps", "--bench", "--compile", "--steps", "1", "--data", "none")
    hps = train.main(argv + ["--batch-size", "2"])["results"][0]
    assert hps["compile"] is True and hps["gflop_per_step"] > 0 and modes and set(modes) == {None}
    assert hps["input"] == [2, 1, 128, 128] and "hdf5" not in hps  # no file: the real OpenKBP slice size


DDP_SPY = """
import json, os, sys, time
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train
seen, real_reduce, real_fit, real_step, state, cases = [], dist.all_reduce, train.fit, train.train_step, {}, []
dist.all_reduce = lambda t, *a, **k: (seen.append(str(t.device)), real_reduce(t, *a, **k))[1]
train.train_step = lambda run, batch: (cases.extend(batch["case"].tolist()), real_step(run, batch))[1]
def fit(run, log=print):
    best = real_fit(run, log)
    state.update(device=str(run.device), log_vars=run.weighting.log_vars.tolist())
    return best
train.fit = fit
train.main(sys.argv[3:])
state["left"] = time.time()  # after train.main's end: its barrier and the group's destruction
state.update(seen=seen, cases=cases)
json.dump(state, open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.json"), "w"))
"""


def test_torchrun_two_processes_gloo(synthetic, tmp_path):
    """DDP on CPU: two processes, each half of every epoch's batches; process 0 alone writes; every
    collective runs on the model's device; the learnable loss weights stay equal across ranks."""
    out, spy = tmp_path / "ddp", tmp_path / "spy.py"
    spy.write_text(DDP_SPY)
    argv = _argv(synthetic, out, "ham10000", "hps", "--weighting", "uncertainty", "--max-eval-cases", "8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(spy), str(HERE),
           str(tmp_path), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1 loss") == 1 and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["seen"] and set(r["seen"]) == {r["device"]} for r in ranks)
    assert ranks[0]["log_vars"] == ranks[1]["log_vars"] and ranks[0]["log_vars"] != [0.0, 0.0]
    assert ranks[1]["left"] >= (out / "results.json").stat().st_mtime  # process 1 leaves after 0's test, not alone
    # 84 training items, 4 per process and step, 2 processes: 10 steps, capped at 2 (--max-steps-per-epoch)
    assert "2 steps/epoch" in proc.stdout
    assert [len(set(r["cases"])) for r in ranks] == [8, 8] and not set(ranks[0]["cases"]) & set(ranks[1]["cases"])


# ============================================================================================
# train.py --arch guidance: deep multimodal guidance for dose
# ============================================================================================
GUIDANCE_TINY = ["--device", "cpu", "--workers", "0", "--width", "4", "--depth", "1,1,1,1", "--batch-size", "4",
                 "--max-steps-per-epoch", "2", "--max-eval-cases", "1"]


def _guidance_argv(path, out, *extra):
    return ["--dataset", "openkbp", "--arch", "guidance", "--data", str(path), "--out", str(out), *GUIDANCE_TINY,
            *extra]


@pytest.fixture(scope="module")
def kbp(tmp_path_factory):
    return data.synth("openkbp", tmp_path_factory.mktemp("gdata") / "openkbp.h5", n=4, size=32, seed=1)


@pytest.fixture(scope="module")
def done(kbp, tmp_path_factory):
    """The four stages, interrupted after the first epoch (--stop-after) and resumed: (out, results, log)."""
    out = tmp_path_factory.mktemp("guidance") / "run"
    lines = []
    stopped = train.run_training(train.parse_args(_guidance_argv(kbp, out, "--epochs", "2", "--stop-after", "1")),
                                 log=lines.append)
    assert stopped["stopped_after"] == 1 and not (out / "a_superior").exists()
    results = train.run_training(train.parse_args(_guidance_argv(kbp, out, "--resume")), log=lines.append)
    return out, results, lines


def _cfg(kbp, out, *extra):
    cfg = train.resolve_config(train.parse_args(_guidance_argv(kbp, out, *extra)))
    return dict(cfg, guidance_out=cfg["out"])


def _ck(out, entry):
    return torch.load(out / entry / "best.pt")["model"]


@pytest.mark.xdist_group("guidance")  # one worker builds `done` once
def test_stages_run_in_order_keep_their_runs_and_resume(done):
    out, results, lines = done
    for entry in ("a_inferior", "a_superior", "b_guidance", "d_combined"):
        assert {"best.pt", "last.pt", "metrics.jsonl", "results.json"} <= {p.name for p in (out / entry).iterdir()}
        assert torch.load(out / entry / "last.pt")["epoch"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["guidance"]) == ["a_inferior", "a_superior", "c_guided", "d_combined"]
    for metrics in saved["guidance"].values():
        assert set(metrics) == {"dose_score", "dvh_score"} and all(np.isfinite(v) for v in metrics.values())
    assert json.loads((out / "b_guidance" / "results.json").read_text())["test"]["guidance_mse"] > 0
    log = "\n".join(lines)
    order = [log.index(f"stage {s}") for s in ("a_inferior", "a_superior", "b_guidance", "c_guided", "d_combined")]
    assert order == sorted(order) and "resumed from" in log and "SYNTHETIC" in log
    assert lines[-1] == f"results: {out / 'results.json'}" and "c_guided" in lines[-2]
    assert _ck(out, "a_inferior")["encoders.dose.stem.0.weight"].shape[1] == 1
    assert _ck(out, "a_superior")["encoders.dose.stem.0.weight"].shape[1] == 1 + len(data.OPENKBP_ROIS)


@pytest.mark.xdist_group("guidance")  # one worker builds `done` once
def test_one_stage_reruns_from_the_kept_runs(done, kbp, tmp_path, capsys):
    out, results = shutil.copytree(done[0], tmp_path / "run"), done[1]  # the other tests read the original
    _fails(_guidance_argv(kbp, out, "--stage", "c"), capsys, "holds a run", "--overwrite")
    again = train.main(_guidance_argv(kbp, out, "--stage", "c", "--overwrite"))  # (c) is only evaluated
    assert json.dumps(again["guidance"]["c_guided"]) == json.dumps(results["guidance"]["c_guided"])
    assert list(again["guidance"]) == ["a_inferior", "a_superior", "c_guided"]  # (d) was made from the old (c)...
    assert not (out / "d_combined" / "best.pt").exists()  # ... so it went with it
    _fails(_guidance_argv(kbp, tmp_path / "empty", "--stage", "d"), capsys, "a_inferior/best.pt", "--stage a")


@pytest.mark.xdist_group("guidance")  # one worker builds `done` once
def test_frozen_stages_stay_bit_identical_and_only_new_parts_train(done, kbp):
    out, _, _ = done
    a, b, d = _ck(out, "a_inferior"), _ck(out, "b_guidance"), _ck(out, "d_combined")
    assert all(torch.equal(b[f"inferior.{k}"], v) and torch.equal(d[f"inferior.{k}"], v) for k, v in a.items())
    assert all(torch.equal(b[f"superior.{k}"], v) for k, v in _ck(out, "a_superior").items())  # incl. BN buffers
    assert all(torch.equal(d[k], v) for k, v in b.items() if k.startswith("guidance."))
    cfg = _cfg(kbp, out)
    for entry, trained in (("b_guidance", {"guidance"}), ("d_combined", {"heads"})):
        model = train.stage_model(cfg, entry, len(data.OPENKBP_ROIS)).train()
        assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == trained
        assert all(not m.training for name, part in model.named_children() if name not in trained
                   for m in part.modules())


@pytest.mark.parametrize("dims", [2, 3])
def test_guided_model_shapes(dims):
    size, cin_sup = 32, 1 + 3
    build = lambda cin: ctan.build_model("stl", train.DOSE_TASK, cin, dims=dims, width=4, depth=(1, 1, 1, 1))
    inferior, superior = build(1).eval(), build(cin_sup).eval()
    x = torch.randn(2, 1, *[size] * dims)
    feats = inferior.features(x)["dose"]
    g = ctan.GuidanceNetwork(dims, inferior.encoders["dose"].channels).eval()
    assert [t.shape for t in g(feats)] == [t.shape for t in feats]
    sup = superior.features(torch.randn(2, cin_sup, *[size] * dims))["dose"]
    assert [t.shape for t in sup] == [t.shape for t in feats]  # G's targets match its outputs
    with torch.no_grad():
        c = ctan.GuidedModel(inferior, g, superior.heads).eval()(x)["dose"]
        d = ctan.GuidedModel(inferior, g).eval()(x)["dose"]
    assert c.shape == d.shape == (2, 1, *[size] * dims)
    heads = build(cin_sup).heads  # (c) has nothing to train, also with heads that came in trainable
    assert not any(p.requires_grad for p in ctan.GuidedModel(inferior, g, heads).train().parameters())
    assert not heads.training
    with pytest.raises(ValueError, match="x must be a float tensor"):  # stage (b) reads [CT ; masks], checked
        ctan.GuidanceObjective(inferior, superior, g)(x)
    for tasks, width in [({"dose": ("pixel", 2)}, 4), (train.DOSE_TASK, 8)]:  # G's targets: the inferior's shapes
        other = ctan.build_model("stl", tasks, cin_sup, dims=dims, width=width, depth=(1, 1, 1, 1))
        with pytest.raises(ValueError, match="superior must be an STL model of the inferior's tasks .*, got STL$"):
            ctan.GuidanceObjective(inferior, other, g)


def test_guided_models_decode_what_the_method_says():
    """(b): G's MSE to the superior model's features, averaged over the scales, G reading the inferior model's features
    of the CT alone; (c): the superior heads decode G(f); (d): new heads decode [f ; G(f)]; in (d) the inferior model
    and G are frozen and in eval mode (no dropout), the heads alone train."""
    build = lambda cin: ctan.build_model("stl", train.DOSE_TASK, cin, dims=2, width=4, depth=(1, 1, 1, 1))
    torch.manual_seed(0)
    inferior, superior = build(1), build(3)
    g = ctan.GuidanceNetwork(2, inferior.encoders["dose"].channels)
    x = torch.randn(2, 3, 32, 32)  # [CT ; 2 ROI masks]
    objective = ctan.GuidanceObjective(inferior, superior, g).eval()
    f = inferior.eval().encoders["dose"](x[:, :1])
    target = superior.eval().encoders["dose"](x)
    want = sum((gf - t).square().flatten(1).mean(1) for gf, t in zip(g.eval()(f), target)) / len(f)
    torch.testing.assert_close(objective(x)["guidance"], want)
    for heads in (superior.heads, None):
        model, seen = ctan.GuidedModel(inferior, g, heads).train(), []
        model.heads["dose"].register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
        model(x[:, :1])
        with torch.no_grad():
            want = g.eval()(f) if heads is not None else [torch.cat(p, 1) for p in zip(f, g(f))]
        assert all(torch.equal(a, b) for a, b in zip(seen[0], want)) and len(seen[0]) == len(f)
        assert not any(m.training for m in [*inferior.modules(), *g.modules()])
        trained = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert trained == (set() if heads is not None else {"heads"})


class _NoMasks(torch.utils.data.Dataset):
    """A split whose items lose their ROI masks: removed, or replaced by NaN / random masks."""

    def __init__(self, ds, how):
        self.ds, self.how = ds, how

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = dict(self.ds[i])
        if self.how == "drop":
            del item["structures"]
        else:
            s = item["structures"]
            item["structures"] = torch.full(s.shape, float("nan")) if self.how == "nan" else torch.rand(s.shape) > .5
        return item

    def __getattr__(self, name):
        if name == "ds":
            raise AttributeError(name)
        return getattr(self.ds, name)


@pytest.mark.xdist_group("guidance")  # one worker builds `done` once
def test_guided_models_never_read_the_masks(done, kbp):
    out, results, _ = done
    cfg = _cfg(kbp, out)
    test_ds = data.open_dataset(kbp, "test")
    for entry in ("c_guided", "d_combined"):
        model = train.stage_model(dict(cfg, tasks=train.DOSE_TASK), entry, len(data.OPENKBP_ROIS))
        if entry == "d_combined":
            model.load_state_dict(_ck(out, entry))
        run = SimpleNamespace(cfg=dict(cfg, tasks=train.DOSE_TASK, roi_names=list(data.OPENKBP_ROIS)),
                              device=torch.device("cpu"), model=model)
        ref = np.concatenate([o["dose"] for _, o in train.predict(run, test_ds)])
        for how in ("drop", "nan", "random"):
            got = np.concatenate([o["dose"] for _, o in train.predict(run, _NoMasks(test_ds, how))])
            assert np.array_equal(ref, got), (entry, how)
        metrics, _ = train.evaluate(run, _NoMasks(test_ds, "drop"))  # the same test metrics as in results.json
        assert json.dumps(metrics) == json.dumps(results["guidance"][entry])
        with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):  # CT + masks is refused: CT only
            model(torch.zeros(1, 1 + len(data.OPENKBP_ROIS), 32, 32))


@pytest.mark.parametrize("name", ["ham10000", "stoic"])
def test_datasets_without_a_superior_modality_are_refused(name, tmp_path, capsys):
    _fails(["--dataset", name, "--arch", "guidance", "--out", str(tmp_path / "x")], capsys,
           "needs a superior modality (CT + ROI masks)", name)
