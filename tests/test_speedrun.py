"""Speedrun.ipynb's pieces, loaded from the notebook itself and checked against what they promise:
whitening decorrelates patches, flips alternate, shifts stay within their range, Lookahead
resumes exactly, and the BatchNorm shifts get their own step size."""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

from tools import notebook_code

SPEEDRUN = notebook_code.definitions("Speedrun.ipynb")


def uint8_images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)


def test_whitening_makes_the_patch_features_uncorrelated_with_unit_variance():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64, 3, 33, 33, generator=generator)
    images = noise[..., 1:, 1:] + noise[..., :-1, :-1] + 0.5 * noise[:, [1, 2, 0], 1:, 1:]   # correlated pixels
    conv = torch.nn.Conv2d(3, 24, kernel_size=2)
    SPEEDRUN["whiten_from_data"](conv, images)
    with torch.no_grad():
        features = conv(images).permute(0, 2, 3, 1).reshape(-1, 24)          # one row per 2x2 patch
    features = features - features.mean(0)
    covariance = features[:, :12].T @ features[:, :12] / len(features)
    assert torch.allclose(covariance, torch.eye(12), atol=0.02)
    assert torch.allclose(features[:, 12:], -features[:, :12], atol=1e-5)   # the negated copies
    assert not conv.weight.requires_grad and conv.bias.requires_grad


def loader_over(images: torch.Tensor, **options):
    dataset = types.SimpleNamespace(images=images, labels=torch.arange(len(images)))
    return SPEEDRUN["BatchAugmentLoader"](dataset, 4, "cpu", torch.nn.Identity(), seed=0, **options)


def epoch_views(loader, epoch: int) -> torch.Tensor:
    """Every image as the loader served it in `epoch`, put back in data-set order."""
    loader.set_epoch(epoch)
    views = torch.empty_like(loader.images)
    for batch, labels in loader:
        views[labels] = batch
    return views


def test_alternating_flips_show_each_image_the_other_way_round_in_the_next_epoch():
    images = uint8_images(10)
    loader = loader_over(images, translate=0, alternate_flips=True)
    first, second, third = (epoch_views(loader, epoch) for epoch in (1, 2, 3))
    assert torch.equal(second, first.flip(3)) and torch.equal(third, first)
    mirrored = [torch.equal(view, image.flip(2)) for view, image in zip(first, images)]
    assert 0 < sum(mirrored) < len(images)                       # a random orientation to begin with


def test_random_flips_do_not_alternate():
    images = uint8_images(32)
    loader = loader_over(images, translate=0, alternate_flips=False)
    first, second = epoch_views(loader, 1), epoch_views(loader, 2)
    assert not torch.equal(second, first.flip(3))
    mirrored = [torch.tensor([torch.equal(view, image.flip(2)) for view, image in zip(views, images)])
                for views in (first, second)]
    assert all(0 < m.sum() < len(images) for m in mirrored)       # a random orientation in every epoch
    assert (mirrored[0] == mirrored[1]).any()                     # not every image turned round


@pytest.mark.parametrize("pixels", [0, 1, 2])
def test_each_image_is_shifted_by_at_most_the_given_pixels_with_reflected_borders(pixels):
    images = uint8_images(16).float()
    shifted = SPEEDRUN["shift_batch"](images, pixels, torch.Generator().manual_seed(1))
    padded = F.pad(images, (2,) * 4, mode="reflect")
    offsets = []
    for image, padded_image, result in zip(images, padded, shifted):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(result, padded_image[:, 2 + dy:34 + dy, 2 + dx:34 + dx])]
        assert matches and max(max(abs(dy), abs(dx)) for dy, dx in matches) <= pixels
        offsets.append(matches[0])
    assert (len(set(offsets)) > 1) == (pixels > 0)                # each image draws its own offset


SGD_SETTINGS = dict(lr=0.5, momentum=0.85, weight_decay=1e-3)


def twin_models_and_data(steps: int):
    """Two Linear(6, 3) models with the same initial weights, and `steps` seeded batches."""
    torch.manual_seed(0)
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(steps)]
    model, reference = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    reference.load_state_dict(model.state_dict())
    return model, reference, data


def lookahead_run(model, optimizer, steps: int, data) -> None:
    for images, labels in data[:steps]:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


def test_lookahead_keeps_its_slow_weights_in_the_optimizer_state_and_resumes_exactly():
    model, resumed, data = twin_models_and_data(12)
    make = lambda model: SPEEDRUN["LookaheadSGD"](model.parameters(), **SGD_SETTINGS, lookahead_every=3, total_steps=12)
    optimizer = make(model)
    lookahead_run(model, optimizer, 6, data)
    for weight in model.parameters():
        assert torch.equal(optimizer.state[weight]["slow"], weight)   # step 6: weights reset to the slow copy
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    lookahead_run(model, optimizer, 12, data[6:] * 2)

    resumed_optimizer = make(resumed)
    resumed.load_state_dict(saved[0])
    resumed_optimizer.load_state_dict(saved[1])
    lookahead_run(resumed, resumed_optimizer, 12, data[6:] * 2)
    for weight, resumed_weight in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(weight, resumed_weight)


def test_lookahead_matches_a_hand_written_slow_copy():
    """Every 3 steps: slow <- keep * slow + (1 - keep) * weights, weights <- slow, with
    keep = 0.95**3 * (step / total_steps)**3; the slow copy starts as the weights at its first update."""
    model, reference, data = twin_models_and_data(9)
    lookahead_run(model, SPEEDRUN["LookaheadSGD"](model.parameters(), **SGD_SETTINGS, lookahead_every=3, total_steps=9),
                  9, data)

    sgd = torch.optim.SGD(reference.parameters(), **SGD_SETTINGS, nesterov=True)
    slow = None
    for step in range(1, 10):
        lookahead_run(reference, sgd, 1, data[step - 1:])
        if step % 3 == 0:
            keep = 0.95 ** 3 * (step / 9) ** 3
            with torch.no_grad():
                slow = slow or [weight.clone() for weight in reference.parameters()]
                for weight, slow_weight in zip(reference.parameters(), slow):
                    slow_weight.mul_(keep).add_(weight, alpha=1 - keep)
                    weight.copy_(slow_weight)
    for weight, reference_weight in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(weight, reference_weight)


def test_lookahead_off_is_plain_nesterov_sgd():
    model, reference, data = twin_models_and_data(5)
    lookahead_run(model, SPEEDRUN["LookaheadSGD"](model.parameters(), **SGD_SETTINGS, lookahead_every=0, total_steps=5),
                  5, data)
    lookahead_run(reference, torch.optim.SGD(reference.parameters(), **SGD_SETTINGS, nesterov=True), 5, data)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def assert_each_trainable_parameter_in_one_group(net, optimizer):
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) and set(grouped) == {id(p) for p in net.parameters() if p.requires_grad}


def test_batchnorm_shifts_take_larger_steps_with_the_same_decay_per_step():
    net = SPEEDRUN["SpeedNet"]((8, 16, 16), num_classes=10)
    optimizer, _ = SPEEDRUN["make_optimizer"](net, 2, 10, 5)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights, shifts = optimizer.param_groups
    assert {id(p) for p in shifts["params"]} == {id(m.bias) for m in norms}
    assert all(not m.weight.requires_grad for m in norms)
    assert_each_trainable_parameter_in_one_group(net, optimizer)
    assert SPEEDRUN["BIAS_LR_SCALE"] == 64
    assert shifts["lr"] == pytest.approx(64 * weights["lr"])
    assert shifts["lr"] * shifts["weight_decay"] == pytest.approx(weights["lr"] * weights["weight_decay"])


def test_without_shift_only_norm_the_batchnorm_scales_learn_at_the_common_step_size():
    net = SPEEDRUN["SpeedNet"]((8, 16, 16), num_classes=10, shift_only_norm=False)
    assert all(m.weight.requires_grad for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    optimizer, _ = SPEEDRUN["make_optimizer"](net, 2, 10, 5)
    weights, shifts = optimizer.param_groups
    assert_each_trainable_parameter_in_one_group(net, optimizer)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(m.weight) for m in norms} <= {id(p) for p in weights["params"]}
    assert shifts["lr"] == pytest.approx(weights["lr"])


def test_airbench_groups_add_nothing_and_start_their_convolutions_at_identity():
    residual, plain = (SPEEDRUN["ConvGroup"](4, 6, residual=flag) for flag in (True, False))
    for conv in (plain.conv1, plain.conv2):
        identity = torch.zeros_like(conv.weight[:conv.in_channels])
        torch.nn.init.dirac_(identity)
        assert torch.equal(conv.weight[:conv.in_channels], identity)
    plain.load_state_dict(residual.state_dict())          # the same weights: only the add differs
    x = torch.randn(2, 4, 8, 8)
    first = F.gelu(residual.bn1(residual.pool(residual.conv1(x))))
    torch.testing.assert_close(residual(x), first + plain(x))


def norm_stats(net):
    return [s for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for s in (m.running_mean, m.running_var)]


def test_lookahead_can_average_the_batchnorm_statistics_and_keeps_them_for_a_resume():
    torch.manual_seed(0)
    net = SPEEDRUN["SpeedNet"]((8, 16, 16), num_classes=10)
    plain_net = copy.deepcopy(net)
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(6)]
    optimizer, scheduler = SPEEDRUN["make_optimizer"](net, 1, 6, 3, average_norm_stats=True)
    plain_optimizer, _ = SPEEDRUN["make_optimizer"](plain_net, 1, 6, 3)
    assert len(optimizer.param_groups) == 3 and len(plain_optimizer.param_groups) == 2
    lookahead_run(net, optimizer, 6, data)
    lookahead_run(plain_net, plain_optimizer, 6, data)
    for stats in norm_stats(net):                          # step 6: the statistics reset to their slow copy
        assert torch.equal(optimizer.state[stats]["slow"], stats)
    assert not all(torch.equal(a, b) for a, b in zip(norm_stats(net), norm_stats(plain_net)))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), plain_net.parameters()))   # weights: unchanged
    assert len(optimizer.state_dict()["state"]) > len(plain_optimizer.state_dict()["state"])


def test_the_step_size_and_decay_can_be_set_for_another_batch_size():
    net = SPEEDRUN["SpeedNet"]((8, 16, 16), num_classes=10)
    base, _ = SPEEDRUN["make_optimizer"](net, 2, 10, 5)
    doubled, _ = SPEEDRUN["make_optimizer"](net, 2, 10, 5, peak_lr=2 * SPEEDRUN["PEAK_LR"], decay=2 * SPEEDRUN["DECAY"])
    for group, base_group in zip(doubled.param_groups, base.param_groups):
        assert group["max_lr"] == pytest.approx(2 * base_group["max_lr"])
        assert group["max_lr"] * group["weight_decay"] == pytest.approx(2 * base_group["max_lr"] * base_group["weight_decay"])
