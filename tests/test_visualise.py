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


def test_show_feature_maps_draws_every_channel_on_one_shared_scale():
    maps = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7).view(6, 1, 1)
    fig = utils.show_feature_maps(maps, n=6, ncols=3)
    images = shown_images(fig)
    assert len(images) == 6
    assert all(image.get_clim() == pytest.approx((maps.min().item(), maps.max().item())) for image in images)
    plt.close(fig)


def test_show_feature_maps_rejects_a_batch():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        utils.show_feature_maps(torch.zeros(2, 3, 4, 4))


# ---- predictions and training curves --------------------------------------------------------

class AlwaysFirst(torch.nn.Module):
    """Predicts class 0 for every image."""
    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        logits = torch.zeros(len(x), 10)
        logits[:, 0] = 1
        return logits


@pytest.fixture
def sorted_loader():
    """40 images sorted by class, 4 per class, as a test set is."""
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10).repeat_interleave(4)
    dataset = utils.UInt8ImageDataset(images, labels, [f"c{k}" for k in range(10)])
    return utils.make_loader(dataset, 16, "cpu", shuffle=False, transform=utils.BatchTransform())


def titles_and_colours(fig):
    return [(ax.get_title(), ax.title.get_color()) for ax in fig.axes if ax.images]


def test_plot_sample_predictions_draws_a_seeded_random_sample(sorted_loader, tmp_path):
    classes = sorted_loader.dataset.classes
    fig, accuracy = utils.plot_sample_predictions(AlwaysFirst(), sorted_loader, classes, n=12, ncols=4,
                                                  save_path=tmp_path / "grid.png")
    shown = titles_and_colours(fig)
    assert len(shown) == 12 and (tmp_path / "grid.png").stat().st_size > 0
    truths = [title.split("\n")[1].strip("()") for title, _ in shown]
    assert len(set(truths)) > 3                                 # not the first 12 (3 classes) of a sorted set
    for (title, colour), truth in zip(shown, truths):
        assert title.startswith("c0\n")                         # "predicted\n(true)"
        assert colour == ("green" if truth == "c0" else "red")
    assert accuracy == pytest.approx(truths.count("c0") / 12)
    again, _ = utils.plot_sample_predictions(AlwaysFirst(), sorted_loader, classes, n=12, ncols=4)
    other, _ = utils.plot_sample_predictions(AlwaysFirst(), sorted_loader, classes, n=12, ncols=4, seed=1)
    assert titles_and_colours(again) == shown and titles_and_colours(other) != shown
    plt.close("all")


def test_plot_history_draws_train_and_validation_and_marks_the_best_epoch(tmp_path):
    history = utils.History(epoch=[1, 2, 3], train_loss=[2.0, 1.5, 1.0], train_acc=[0.2, 0.4, 0.6],
                            val_loss=[2.1, 1.7, 1.8], val_acc=[0.3, 0.5, 0.4], lr=[0.1, 0.1, 0.01],
                            seconds=[1.0, 1.0, 1.0])
    fig = utils.plot_history(history, save_path=tmp_path / "plots" / "history.png")
    ax_loss, ax_acc, ax_lr = fig.axes
    lines = {line.get_label(): line for line in ax_acc.get_lines()}
    assert list(lines["validation"].get_ydata()) == pytest.approx([30, 50, 40])
    assert list(lines["train"].get_ydata()) == pytest.approx([20, 40, 60])
    assert list(lines["best (by validation)"].get_xdata()) == [2, 2]
    loss_lines = {line.get_label(): list(line.get_ydata()) for line in ax_loss.get_lines()}
    assert loss_lines == {"train": [2.0, 1.5, 1.0], "validation": [2.1, 1.7, 1.8]}
    (lr_line,) = ax_lr.get_lines()
    assert list(lr_line.get_ydata()) == [0.1, 0.1, 0.01] and ax_lr.get_yscale() == "linear"   # a ratio of 10
    assert (tmp_path / "plots" / "history.png").stat().st_size > 0
    plt.close(fig)


def test_plot_history_shows_a_learning_rate_spanning_more_than_tenfold_on_a_log_scale():
    history = utils.History(epoch=[1, 2, 3], train_loss=[1.0] * 3, train_acc=[0.5] * 3, val_loss=[1.0] * 3,
                            val_acc=[0.5] * 3, lr=[0.1, 0.01, 0.001], seconds=[1.0] * 3)
    ax_lr = utils.plot_history(history).axes[2]
    assert list(ax_lr.get_lines()[0].get_ydata()) == [0.1, 0.01, 0.001] and ax_lr.get_yscale() == "log"
    plt.close("all")


def test_imshow_undoes_the_normalisation():
    image = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    normalised = utils.BatchTransform(utils.CIFAR10_MEAN, utils.CIFAR10_STD)(image[None])[0]
    ax = utils.imshow(normalised, utils.CIFAR10_MEAN, utils.CIFAR10_STD, ax=plt.figure().gca())
    shown = torch.as_tensor(ax.images[0].get_array().data)
    assert torch.allclose(shown.float(), image.permute(1, 2, 0).float() / 255, atol=1e-6)
    plt.close("all")


@pytest.mark.parametrize("num_epochs", [3, 25, 90])
def test_plot_history_axis_spans_the_epochs_with_whole_epoch_ticks(num_epochs):
    epochs = list(range(1, num_epochs + 1))
    history = utils.History(epoch=epochs, train_loss=[1.0] * num_epochs, train_acc=[0.5] * num_epochs,
                            val_loss=[1.0] * num_epochs, val_acc=[0.5] * num_epochs, lr=[0.1] * num_epochs,
                            seconds=[1.0] * num_epochs)
    fig = utils.plot_history(history)
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        margin = 0.05 * (num_epochs - 1) + 0.1      # matplotlib's own margin around the data
        assert 1 - margin <= low <= 1 and num_epochs <= high <= num_epochs + margin
        shown = [tick for tick in ax.get_xticks() if low <= tick <= high]
        assert len(shown) >= 3 and all(float(tick).is_integer() for tick in shown)
    plt.close(fig)
