"""tfrecords_tools.fashion_pretrain: single-item rendering and a weights file the trainer loads."""

import json

import numpy as np
import pytest

from imcl_tf import data, models
from tfrecords_tools import fashion_pretrain, fashion_scenes as fs


def test_render_items_labels_match_what_was_drawn(monkeypatch):
    images, labels = fs.load_fashion_mnist(fs.DEFAULT_FASHION_MNIST_DIR, "train")
    boxes_seen, tints_seen = [], []
    paste = fs._paste_item

    def recording_paste(canvas, item, rng, boxes, tint=None):
        paste(canvas, item, rng, boxes, tint=tint)
        boxes_seen.append(boxes[-1])
        tints_seen.append(tint)

    monkeypatch.setattr(fs, "_paste_item", recording_paste)
    indices = np.arange(fs.PRETRAIN_SOURCE.start, fs.PRETRAIN_SOURCE.start + 40)
    rendered, targets = fashion_pretrain.render_items(images, labels, indices,
                                                      np.random.default_rng(0))
    assert rendered.shape == (40, 64, 64, 3) and rendered.dtype == np.uint8
    np.testing.assert_array_equal(targets["item"], labels[indices])
    halves = [int(left + side / 2 >= 32) for _, left, side in boxes_seen]
    np.testing.assert_array_equal(targets["half"], halves)
    for tint, rgb in zip(targets["tint"], tints_seen):
        assert np.abs(rgb - np.asarray(fs.TINT_RGB[tint])).max() <= fs.TINT_JITTER
    assert set(targets["tint"]) == set(range(len(fs.TINT_NAMES)))


@pytest.mark.slow
def test_pretrained_weights_load_into_the_training_model(tmp_path):
    output = str(tmp_path / "small_cnn.weights.h5")
    report = fashion_pretrain.pretrain(output, steps=3, batch_size=8, num_items=32,
                                       stream=open(tmp_path / "log", "w"))
    saved = json.loads(open(output + ".json").read())
    assert saved == report
    assert report["train_items"] == [40000, 40032] and report["held_out_items"] == [49000, 50000]
    assert all(0.0 <= v <= 1.0 for v in report["held_out_accuracy"].values())
    # The pretraining range is one that scenes built with reserve_pretrain_items never use.
    for source in fs.split_sources(reserve_pretrain_items=True).values():
        assert source.file != "train" or source.stop <= 40000 or source.start >= 50000

    x = np.random.default_rng(1).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    backbone = models.build_backbone("small_cnn", (64, 64, 3), weights=output)
    model = models.IMCLModel(num_classes=5, input_shape_=(64, 64, 3), backbone="small_cnn",
                             backbone_weights=output, method="logistic")
    expected = backbone(x / 255.0, training=False).numpy()
    np.testing.assert_allclose(model.extract_features(x).numpy(), expected, rtol=1e-5, atol=1e-6)
    fresh = models.IMCLModel(num_classes=5, input_shape_=(64, 64, 3), backbone="small_cnn",
                             method="logistic")
    assert not np.allclose(fresh.extract_features(x).numpy(), expected, atol=1e-3)


def test_output_must_be_a_keras_weights_file(tmp_path):
    with pytest.raises(data.DataError, match="must end in '.weights.h5'"):
        fashion_pretrain.pretrain(str(tmp_path / "model.h5"), steps=1)
