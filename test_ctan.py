"""Tests for ctan.py, data.py and train.py (CPU, tiny shapes; `python -m pytest -q`)."""
import pytest
import torch

import ctan

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


def tiny_model(arch, tasks, dims=2, in_channels=2, **options):
    torch.manual_seed(0)
    return ctan.build_model(arch, tasks, in_channels, dims, **{**TINY, **options})


def tiny_input(dims, in_channels=2, batch=2, size=32):
    torch.manual_seed(1)
    return torch.randn(batch, in_channels, *[size] * dims)


@pytest.mark.parametrize("mix", TASK_MIXES)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("arch", ctan.ARCHS)
def test_shapes_and_gradients_reach_every_parameter(arch, dims, mix):
    tasks = TASK_MIXES[mix]
    # 64 so that the bottleneck has 2 x 2 tokens: with a single key, attention ignores its query
    model, x = tiny_model(arch, tasks, dims), tiny_input(dims, size=64)
    out = model(x)
    assert set(out) == set(tasks)
    for name, (kind, n) in tasks.items():
        expected = (2, n, *x.shape[2:]) if kind == "pixel" else (2, n)
        assert tuple(out[name].shape) == expected, name
    sum(o.square().mean() for o in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{arch}: no finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"{arch}: zero gradient for {name}"


def grads(model, x, task):
    """Gradient of one task's output w.r.t. every parameter (None where the output does not depend on it)."""
    out = model(x)[task].square().mean()
    params = dict(model.named_parameters())
    g = torch.autograd.grad(out, list(params.values()), allow_unused=True)
    return {n: (gi is not None and gi.abs().sum().item() > 0) for n, gi in zip(params, g)}


def reaches(g, prefix):
    return any(v for n, v in g.items() if n.startswith(prefix))


TWO = {"dose": ("pixel", 1), "diagnosis": ("image", 3)}


@pytest.mark.parametrize("dims", [2, 3])
def test_stl_tasks_are_independent(dims):
    model = tiny_model("stl", TWO, dims)
    g = grads(model, tiny_input(dims), "dose")
    assert reaches(g, "encoders.dose.") and not reaches(g, "encoders.diagnosis.")
    assert not reaches(g, "heads.diagnosis.")


@pytest.mark.parametrize("arch", ["hps", "mtan", "mfe"])
def test_both_tasks_reach_the_shared_encoder(arch):
    model = tiny_model(arch, TWO)
    for task in TWO:
        g = grads(model, tiny_input(2), task)
        assert all(g[n] for n in g if n.startswith("encoder.stem.")), task
        assert reaches(g, "encoder.stages.3."), task


def task_branch(index):
    """Parameter-name prefixes of one task's MTAN/CTAN branch (attention masks and transitions)."""
    return tuple(f"{part}.{s}.{index}." for part in ("attention", "transition") for s in range(4))


@pytest.mark.parametrize("dims", [2, 3])
def test_ctan_cross_task_attention_carries_information_between_tasks(dims):
    x = tiny_input(dims)
    g = grads(tiny_model("ctan", TWO, dims), x, "dose")
    assert any(reaches(g, p) for p in task_branch(1)), "dose does not depend on the diagnosis branch"
    assert reaches(g, "cross.1.kv.1."), "diagnosis keys/values do not reach dose"
    # Switching cross-task attention off removes the dependence (and then CTAN is MTAN).
    for arch, options in [("ctan", {"cross_stages": ()}), ("mtan", {})]:
        g = grads(tiny_model(arch, TWO, dims, **options), x, "dose")
        assert not any(reaches(g, p) for p in task_branch(1)), arch
        assert reaches(g, task_branch(0)[0])


def test_ctan_without_cross_attention_is_mtan():
    x = tiny_input(2)
    a, b = tiny_model("mtan", TWO).eval(), tiny_model("ctan", TWO, cross_stages=()).eval()
    b.load_state_dict(a.state_dict())
    for name, y in a(x).items():
        torch.testing.assert_close(b(x)[name], y)


def test_cross_attention_only_at_chosen_stages():
    model = tiny_model("ctan", TWO, cross_stages=(4,))
    assert list(model.cross) == ["4"]
    g = grads(model, tiny_input(2), "dose")
    # Only the bottleneck exchanges: the diagnosis branch reaches dose through its stage-4 mask alone.
    assert reaches(g, "attention.3.1.")


def test_mtan_masks_lie_in_unit_interval_and_multiply_shared_features():
    model = tiny_model("mtan", TWO).eval()
    seen = []
    for s in range(4):
        for t in range(2):
            att = model.attention[s][t]
            att.register_forward_hook(lambda m, inp, out: seen.append((m.mask(
                inp[0] if inp[2] is None else torch.cat([inp[0], inp[2]], 1)), inp[1], out)))
    model(tiny_input(2))
    assert len(seen) == 8
    for mask, shared, out in seen:
        assert mask.min() > 0 and mask.max() < 1
        torch.testing.assert_close(out, mask * shared)


def test_cross_task_attention_pools_keys_to_bounded_tokens():
    att = ctan.CrossTaskAttention(channels=8, n_tasks=2, heads=2, max_tokens=64)
    assert att.pool_factor((32, 32)) == 4 and att.pool_factor((8, 8)) == 1
    assert att.pool_factor((16, 16, 16)) == 4
    feats = [torch.randn(1, 8, 32, 32), torch.randn(1, 8, 32, 32)]
    assert all(o.shape == f.shape for o, f in zip(att(feats), feats))


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
    model = tiny_model("mfe", TWO)
    head = model.heads["diagnosis"]
    assert head.levels == (-2, -1) and head.mlp[0].out_features == 32
    assert [b[0].dilation[0] for b in model.dfe[0].branches] == [1, 6, 12, 18]
    assert all(type(b).__name__ == "BasicBlock" for stage in model.encoder.stages for b in stage)


@pytest.mark.parametrize("call, message", [
    (lambda: ctan.build_model("unet", TWO, 1), "valid: stl, hps"),
    (lambda: ctan.build_model("ctan", {"a": ("voxel", 1)}, 1), "kind in"),
    (lambda: ctan.build_model("ctan", TWO, 1, dims=4), "dims must be 2 or 3"),
    (lambda: ctan.build_model("ctan", {}, 1), "tasks is empty"),
    (lambda: ctan.build_model("ctan", {"a": ("pixel", 1)}, 1, **TINY), "at least two tasks"),
    (lambda: ctan.build_model("mtan", TWO, 1, width=4, depth=(1, 1, 1, 1)), "depth >= 2"),
    (lambda: ctan.build_model("ctan", TWO, 1, cross_stages=(5,), **TINY), "cross_stages"),
    (lambda: tiny_model("hps", TWO, in_channels=1)(torch.zeros(1, 1, 40, 40)), "multiple of 32"),
    (lambda: tiny_model("hps", TWO, in_channels=1)(torch.zeros(1, 3, 32, 32)), "expected input of shape"),
    (lambda: tiny_model("hps", TWO, in_channels=1)(torch.zeros(1, 1, 32, 32, 32)), "2D model"),
])
def test_bad_arguments_raise_value_error_naming_the_allowed_values(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_checkpointing_gives_the_same_gradients():
    x = tiny_input(2)
    result = []
    for flag in (False, True):
        model = tiny_model("ctan", TWO, checkpointing=flag)
        sum(o.square().mean() for o in model(x).values()).backward()
        result.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*result):
        torch.testing.assert_close(a, b)
