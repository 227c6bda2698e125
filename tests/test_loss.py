"""Task-aligned assignment on hand-made cases, and the loss terms at known points."""

import math

import pytest
import torch

from detector.model.assigner import TaskAlignedAssigner
from detector.model.boxes import distance_to_xyxy, make_anchors, xyxy_to_distance
from detector.model.loss import DetectionLoss, distribution_focal_loss, pad_targets

STRIDES = (8, 16, 32)
REG_MAX = 16


def anchors_64px():
    """84 anchors of a 64x64 input: 8x8 at stride 8, 4x4 at 16, 2x2 at 32."""
    return make_anchors([(8, 8), (4, 4), (2, 2)], STRIDES, device=torch.device("cpu"))


def index_of(points, x, y, first=0):
    """Index of the anchor centred at (x, y), searching from `first` (the start of a level)."""
    hits = ((points[first:] - torch.tensor([x, y])).abs().sum(dim=1) == 0).nonzero()
    return first + int(hits[0])


def test_box_distance_round_trip():
    points = torch.tensor([[12.0, 20.0], [4.0, 4.0]])
    boxes = torch.tensor([[2.0, 5.0, 30.0, 41.0], [0.0, 1.0, 9.0, 6.0]])
    assert torch.equal(distance_to_xyxy(xyxy_to_distance(boxes, points), points), boxes)
    points, strides = anchors_64px()
    assert points.shape == (84, 2) and strides[:64].eq(8).all() and strides[-4:].eq(32).all()
    assert points[0].tolist() == [4.0, 4.0] and points[64].tolist() == [8.0, 8.0]


def test_assigner_picks_the_top_k_aligned_anchors_inside_the_box():
    points, _ = anchors_64px()
    gt_box = torch.tensor([0.0, 0.0, 24.0, 24.0])  # holds stride-8 centres 4, 12, 20 and (8, 8) at 16
    boxes = gt_box.expand(1, 84, 4).clone()  # every anchor predicts the box exactly: IoU 1 everywhere
    scores = torch.full((1, 84, 2), 0.1)
    best, second, third = index_of(points, 12, 12), index_of(points, 4, 20), index_of(points, 8, 8, first=64)
    scores[0, best, 0], scores[0, second, 0], scores[0, third, 0] = 0.9, 0.8, 0.7
    outside = index_of(points, 44, 44)
    scores[0, outside, 0] = 1.0  # the best score of all, but its centre lies outside the box
    scores[0, index_of(points, 20, 20), 1] = 0.95  # a high score for the wrong class does not count

    assigned = TaskAlignedAssigner(top_k=3)(scores, boxes, points, torch.tensor([[0]]), gt_box.view(1, 1, 4),
                                            torch.tensor([[True]]))

    assert assigned.foreground[0].nonzero().flatten().tolist() == sorted([best, second, third])
    # Soft targets: sqrt(score) * IoU^6 normalised so the best anchor gets the box's best IoU (1).
    expected = {best: 1.0, second: math.sqrt(0.8 / 0.9), third: math.sqrt(0.7 / 0.9)}
    for anchor, value in expected.items():
        assert assigned.scores[0, anchor, 0].item() == pytest.approx(value, rel=1e-5)
        assert torch.equal(assigned.boxes_xyxy[0, anchor], gt_box)
    assert assigned.scores[0, :, 1].eq(0).all()


def test_an_anchor_claimed_by_two_boxes_goes_to_the_one_it_overlaps_most():
    points, _ = anchors_64px()
    anchor = index_of(points, 12, 12)
    big, small = torch.tensor([0.0, 0.0, 40.0, 40.0]), torch.tensor([8.0, 8.0, 16.0, 16.0])
    boxes = torch.zeros(1, 84, 4)
    boxes[0, anchor] = torch.tensor([7.0, 7.0, 17.0, 17.0])  # close to the small box, poor for the big one
    scores = torch.full((1, 84, 1), 0.5)
    gt_boxes = torch.stack([big, small])[None]
    assigned = TaskAlignedAssigner(top_k=1)(scores, boxes, points, torch.zeros(1, 2, dtype=torch.long), gt_boxes,
                                            torch.ones(1, 2, dtype=torch.bool))
    assert assigned.foreground[0, anchor] and torch.equal(assigned.boxes_xyxy[0, anchor], small)


def test_padding_slots_and_images_without_boxes_get_no_anchors():
    points, _ = anchors_64px()
    gt_classes, gt_boxes, valid = pad_targets(torch.tensor([[1.0, 0, 0, 0, 30, 30]]), batch_size=2)
    assert gt_boxes.shape == (2, 1, 4) and valid.tolist() == [[False], [True]]
    assigned = TaskAlignedAssigner()(torch.full((2, 84, 1), 0.5), torch.zeros(2, 84, 4), points, gt_classes,
                                     gt_boxes, valid)
    assert not assigned.foreground[0].any() and assigned.foreground[1].sum() == 10


def test_pad_targets_keeps_every_box_of_unsorted_rows():
    rows = torch.tensor([[2.0, 1, 0, 0, 5, 5], [0, 3, 1, 1, 6, 6], [2, 0, 2, 2, 7, 7], [0, 2, 3, 3, 8, 8]])
    classes, boxes, valid = pad_targets(rows, batch_size=3)
    assert valid.sum(dim=1).tolist() == [2, 0, 2]
    assert classes[0, :2].tolist() == [3, 2] and classes[2, :2].tolist() == [1, 0]
    assert boxes[2, 1].tolist() == [2, 2, 7, 7]


def perfect_outputs(num_classes=2, bin_index=2, class_logit=-50.0):
    """Head outputs of a 64x64 input in which every anchor predicts distance `bin_index` strides on each
    side with certainty (one-hot logits), and every class logit is `class_logit`."""
    outputs = []
    for size in (8, 4, 2):
        out = torch.full((1, 4 * REG_MAX + num_classes, size, size), class_logit)
        out[:, :4 * REG_MAX] = -50.0
        for side in range(4):
            out[:, side * REG_MAX + bin_index] = 50.0
        outputs.append(out)
    return outputs


def test_box_and_dfl_terms_are_zero_for_a_perfect_prediction():
    # The stride-8 anchor at (12, 12) predicts 2 strides (16 px) on each side: exactly this box.
    targets = torch.tensor([[0.0, 1, -4, -4, 28, 28]])
    criterion = DetectionLoss(num_classes=2, strides=STRIDES, reg_max=REG_MAX)
    criterion.assigner.top_k = 1  # only the best-aligned anchor, the perfect one, is a positive
    _, items = criterion(perfect_outputs(), targets, batch_size=1)
    assert items["loss_box"].item() == pytest.approx(0.0, abs=1e-6)
    assert items["loss_dfl"].item() == pytest.approx(0.0, abs=1e-6)
    assert items["loss_cls"].item() > 0.1  # the class logits are wrong, and that is all that is wrong

    shifted = torch.tensor([[0.0, 1, -2, -4, 30, 28]])  # 2 px off: both box terms see it
    _, items = criterion(perfect_outputs(), shifted, batch_size=1)
    assert items["loss_box"].item() > 1e-3 and items["loss_dfl"].item() > 1e-3


def test_dfl_is_smallest_at_the_target_and_splits_between_neighbouring_bins():
    target = torch.tensor([[2.25, 0.0, 5.0, 14.0]])
    logits = torch.full((1, 4, REG_MAX), -30.0)
    for side, value in enumerate(target[0].tolist()):
        left = int(value)
        logits[0, side, left] = math.log(1 - (value - left))
        if value - left > 0:
            logits[0, side, left + 1] = math.log(value - left)
    # Cross-entropy towards (0.75, 0.25) is smallest at exactly that distribution: its entropy.
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / 4
    assert distribution_focal_loss(logits, target).item() == pytest.approx(entropy, rel=1e-4)
    worse = logits.clone()
    worse[0, 0, [2, 3]] = worse[0, 0, [3, 2]]  # mass 0.25 at the nearer bin, 0.75 at the farther
    assert distribution_focal_loss(worse, target).item() > entropy + 0.05


def test_images_without_boxes_give_a_finite_loss_and_no_box_loss():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 4 * REG_MAX + 3, s, s, requires_grad=True) for s in (8, 4, 2)]
    criterion = DetectionLoss(num_classes=3, strides=STRIDES, reg_max=REG_MAX)
    loss, items = criterion(outputs, torch.zeros(0, 6), batch_size=2)
    assert torch.isfinite(loss) and items["loss_box"] == 0 and items["loss_dfl"] == 0
    loss.backward()
    assert all(torch.isfinite(o.grad).all() for o in outputs)
    # Only the class logits are pushed (towards background); the distance logits get no gradient.
    assert outputs[0].grad[:, :4 * REG_MAX].abs().sum() == 0 and outputs[0].grad[:, 4 * REG_MAX:].abs().sum() > 0


def test_loss_is_batch_mean_times_batch_size():
    # Two identical images with identical boxes: the loss is twice that of one image, the items the same.
    # (Predictions good enough that the soft target scores sum above 1, where the normaliser is a mean.)
    one = perfect_outputs(class_logit=0.0)
    two = [torch.cat([o, o]) for o in one]
    box = [1.0, -4, -4, 28, 28]
    criterion = DetectionLoss(num_classes=2, strides=STRIDES, reg_max=REG_MAX)
    loss_one, items_one = criterion(one, torch.tensor([[0.0, *box]]), batch_size=1)
    loss_two, items_two = criterion(two, torch.tensor([[0.0, *box], [1.0, *box]]), batch_size=2)
    assert loss_two.item() == pytest.approx(2 * loss_one.item(), rel=1e-5)
    for key in items_one:
        assert items_two[key].item() == pytest.approx(items_one[key].item(), rel=1e-5)


def test_channels_last_model_and_inputs_give_the_loss_and_gradients_of_contiguous_ones():
    """Training runs NHWC (model and inputs) by default; flatten_outputs reads NHWC head outputs as views."""
    from detector.model.network import Detector

    torch.manual_seed(0)
    model = Detector(num_classes=3, depth=0.33, width=0.125, max_channels=256).train()
    nhwc = Detector(num_classes=3, depth=0.33, width=0.125, max_channels=256).train()
    nhwc.load_state_dict(model.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    images = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0.0, 1, 4, 6, 40, 30], [1.0, 2, 20, 20, 60, 50], [1.0, 0, 2, 30, 20, 62]])
    criterion = DetectionLoss(num_classes=3, strides=STRIDES, reg_max=REG_MAX)
    losses = []
    for net, batch in ((model, images), (nhwc, images.contiguous(memory_format=torch.channels_last))):
        outputs = net(batch)
        losses.append(criterion(outputs, targets, batch_size=2)[0])
        losses[-1].backward()
    assert nhwc.head.cls[0][-1].weight.is_contiguous(memory_format=torch.channels_last)
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
    # The convolutions sum in another order: equal up to float rounding, relative to each gradient's scale.
    for (name, a), b in zip(model.named_parameters(), nhwc.parameters(), strict=True):
        assert (b.grad - a.grad).abs().max() <= 1e-3 * a.grad.abs().max(), name
