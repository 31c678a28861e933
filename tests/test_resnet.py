"""ResNet.ipynb's pieces, loaded from the notebook itself: the network has the parameter count the
notebook asserts at every depth of the paper, the plain twin differs only by its shortcuts, and
Cutout paints one square of the promised size and colour without touching the data set."""
import random

import pytest
import torch

import utils
from tools import notebook_code

RESNET = notebook_code.definitions("ResNet.ipynb")


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_each_depth_has_the_asserted_parameter_count_with_or_without_shortcuts(depth):
    residual = RESNET["ResNet"](depth=depth, num_classes=10)
    plain = RESNET["ResNet"](depth=depth, num_classes=10, residual=False)
    assert utils.count_parameters(residual) == utils.count_parameters(plain) == RESNET["PARAMETERS"][depth]
    assert sum(isinstance(m, torch.nn.Conv2d | torch.nn.Linear) for m in residual.modules()) == depth


def test_resnet_maps_a_batch_to_class_scores_and_rejects_a_depth_that_is_not_6n_plus_2():
    net = RESNET["ResNet"](depth=20, num_classes=10).eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n"):
        RESNET["ResNet"](depth=21, num_classes=10)


def cutout_views(size: int, count: int) -> list[torch.Tensor]:
    """`count` views of a constant image through Cutout alone (no crop, so no flip shows)."""
    image = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    cutout = RESNET["CropFlipCutout"](size, utils.CIFAR10_MEAN, padding=0)
    random.seed(0)
    views = [cutout(image) for _ in range(count)]
    assert image.eq(7).all(), "Cutout painted the data set's own image"
    return views


def test_cutout_paints_one_square_of_its_size_in_the_mean_colour_clipped_at_the_border():
    mean_colour = torch.tensor([round(255 * m) for m in utils.CIFAR10_MEAN], dtype=torch.uint8)
    painted_areas = []
    for view in cutout_views(12, 500):
        painted = view.ne(7).any(0)                                  # (32, 32): pixels Cutout changed
        rows, cols = painted.any(1).nonzero().flatten(), painted.any(0).nonzero().flatten()
        assert painted.sum() == len(rows) * len(cols)                # one axis-aligned rectangle
        assert rows.diff().eq(1).all() and cols.diff().eq(1).all()
        assert torch.equal(view[:, painted].T.unique(dim=0), mean_colour[None])
        painted_areas.append(painted.sum().item())
    assert max(painted_areas) == 12 * 12                             # a whole square inside the image
    assert min(painted_areas) >= 6 * 6                               # the centre is always inside
    assert min(painted_areas) < 12 * 12                              # near the border it is clipped


def test_cutout_keeps_the_crop_and_flip_of_its_parent():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cutout = RESNET["CropFlipCutout"](0, utils.CIFAR10_MEAN, padding=4)   # a square of side 0 paints nothing
    for seed in range(20):
        random.seed(seed)
        expected = utils.RandomCropFlip(padding=4)(image)
        random.seed(seed)
        assert torch.equal(cutout(image), expected)
