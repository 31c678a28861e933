"""Tests of the plotting helpers that show what a network learned."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

import utils


def shown_images(fig):
    return [ax.images[0] for ax in fig.axes if ax.images]


def test_show_filters_scales_each_filter_to_the_unit_range():
    weights = torch.randn(5, 3, 7, 7) * torch.arange(1, 6).view(5, 1, 1, 1) + 3  # different ranges
    fig = utils.show_filters(weights, ncols=4, titles=list("abcde"))
    images = shown_images(fig)
    assert len(images) == 5
    for image, w in zip(images, weights):
        array = torch.as_tensor(image.get_array().data)
        assert array.shape == (7, 7, 3)
        assert array.min() == pytest.approx(0) and array.max() == pytest.approx(1)
        expected = (w - w.min()) / (w.max() - w.min())
        assert torch.allclose(array.float(), expected.permute(1, 2, 0), atol=1e-6)
    assert [ax.get_title() for ax in fig.axes if ax.images] == list("abcde")
    plt.close(fig)


def test_show_filters_shows_other_channel_counts_in_grey_and_constant_filters_mid_grey():
    weights = torch.stack([torch.randn(4, 5, 5), torch.ones(4, 5, 5)])
    fig = utils.show_filters(weights)
    first, constant = shown_images(fig)
    assert first.get_array().shape == (5, 5)
    assert (constant.get_array() == 0.5).all()
    plt.close(fig)


def test_show_feature_maps_shows_the_most_active_channels_first():
    maps = torch.zeros(6, 4, 4)
    for channel, level in ((4, 3.0), (1, 2.0), (5, 1.0)):
        maps[channel] = level
    fig = utils.show_feature_maps(maps, n=3, ncols=2)
    assert [ax.get_title() for ax in fig.axes if ax.images] == ["#4", "#1", "#5"]
    plt.close(fig)


def test_show_feature_maps_rejects_a_batch():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        utils.show_feature_maps(torch.zeros(2, 3, 4, 4))
