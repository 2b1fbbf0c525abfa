import json
import math

import pytest
import torch

from dataset.labels import IGNORE_INDEX, NUM_CLASSES
from engine.metrics import (ConfusionMatrix, markdown_table, scores_from_confusion, scores_from_json,
                           scores_to_json)


def test_confusion_matrix_and_miou_hand_computed():
    # 3 classes; rows = ground truth, columns = prediction.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE_INDEX, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    confusion = ConfusionMatrix(num_classes=3)
    confusion.update(target, prediction)
    expected = torch.tensor([[1, 1, 0],   # class 0: one right, one predicted as 1
                             [0, 2, 1],   # class 1: two right, one predicted as 2
                             [1, 0, 1]])  # class 2: one right, one predicted as 0 (ignored pixel skipped)
    assert torch.equal(confusion.matrix, expected)
    scores = confusion.scores()
    # IoU = TP / (GT + P - TP): class 0: 1/(2+2-1)=1/3, class 1: 2/(3+3-2)=1/2, class 2: 1/(2+2-1)=1/3
    assert scores["iou"] == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert scores["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 7)
    assert scores["num_pixels"] == 7


def test_absent_class_is_nan_and_left_out_of_the_mean():
    confusion = ConfusionMatrix(num_classes=3)
    confusion.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]))
    scores = confusion.scores()
    assert math.isnan(scores["iou"][2])
    assert scores["miou"] == pytest.approx(1.0)


def test_class_only_predicted_counts_as_zero_iou():
    confusion = ConfusionMatrix(num_classes=3)
    confusion.update(torch.tensor([0, 0]), torch.tensor([0, 2]))
    scores = confusion.scores()
    assert scores["iou"][2] == 0.0
    assert scores["miou"] == pytest.approx((0.5 + 0.0) / 2)


def test_accumulates_over_the_split_not_mean_of_images():
    # Image A: 1 pixel of class 1, predicted right. Image B: 9 pixels of class 1, all wrong (as 0).
    confusion = ConfusionMatrix(num_classes=2)
    confusion.update(torch.tensor([1]), torch.tensor([1]))
    confusion.update(torch.full((9,), 1), torch.zeros(9, dtype=torch.long))
    scores = confusion.scores()
    assert scores["iou"][1] == pytest.approx(1 / 10)  # a per-image mean would give (1 + 0) / 2
    assert scores["pixel_accuracy"] == pytest.approx(0.1)


def test_matches_bruteforce_on_random_data():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 20, (4, 17, 23), generator=generator)
    target[target == 19] = IGNORE_INDEX
    prediction = torch.randint(0, 19, (4, 17, 23), generator=generator)
    confusion = ConfusionMatrix(num_classes=19)
    confusion.update(target, prediction)
    brute = torch.zeros(19, 19, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), prediction.flatten().tolist()):
        if t != IGNORE_INDEX:
            brute[t, p] += 1
    assert torch.equal(confusion.matrix, brute)
    assert scores_from_confusion(brute)["miou"] == confusion.scores()["miou"]


def test_markdown_table_has_report_columns_and_row():
    confusion = ConfusionMatrix()
    confusion.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    table = markdown_table([("demo", confusion.scores())])
    header, _, row = table.splitlines()
    assert header.split("|")[2].strip() == "road" and header.split("|")[-4].strip() == "bicycle"
    assert "| demo | 100.0 | 100.0 | n/a |" in row


def test_scores_survive_the_json_round_trip_with_absent_classes_as_nan():
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    confusion[0, 0], confusion[0, 1], confusion[1, 1] = 6, 2, 4  # classes 2.. never occur: IoU NaN
    scores = scores_from_confusion(confusion)
    back = scores_from_json(json.loads(json.dumps(scores_to_json(scores))))
    assert back["iou"][:2] == pytest.approx([6 / 8, 4 / 6]) and all(math.isnan(v) for v in back["iou"][2:])
    assert back["miou"] == pytest.approx(scores["miou"]) and back["pixel_accuracy"] == pytest.approx(10 / 12)
