"""tfrecords_tools.extract_features: a features dataset with the backbone's features and the labels."""

import io

import numpy as np
import pytest

from imcl_tf import data, models
from tfrecords_tools import extract_features, fashion_scenes as fs, partial


@pytest.fixture(scope="module")
def scenes_and_weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    scenes = str(root / "scenes")
    fs.build(scenes, num_examples={"train": 7, "test": 3}, seed=2, num_shards=2,
             image_size=32, label_space="item_tint_position", stream=io.StringIO())
    weights = str(root / "cnn.weights.h5")
    backbone = models.build_backbone("small_cnn", (32, 32, 3))
    backbone.save_weights(weights)
    return scenes, weights


def test_features_are_the_backbone_features_and_labels_are_kept(tmp_path, scenes_and_weights):
    scenes, weights = scenes_and_weights
    out = str(tmp_path / "features")
    info = extract_features.extract(scenes, out, backbone_weights=weights, batch_size=4,
                                    stream=io.StringIO())
    assert info.mode == "features" and info.embedding_dim == 128
    source = data.load_dataset_info(scenes)
    assert info.class_names == source.class_names
    assert {s: i.num_examples for s, i in info.splits.items()} == {"train": 7, "test": 3}
    model = models.IMCLModel(num_classes=80, input_shape_=(32, 32, 3), backbone="small_cnn",
                             backbone_weights=weights, method="logistic")
    for split in ("train", "test"):
        assert len(info.splits[split].shards) == len(source.splits[split].shards)
        images, labels, ids = data.load_split_arrays(scenes, split, string_ids=True)
        features, feature_labels, feature_ids = data.load_split_arrays(out, split,
                                                                       string_ids=True)
        np.testing.assert_array_equal(feature_ids, ids)  # same records, same order
        np.testing.assert_array_equal(feature_labels, labels)
        expected = model.extract_features(images, training=False).numpy()
        np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    data.verify_dataset(out)
    assert info.provenance["flags"]["backbone_weights"] == weights


def test_partial_labels_survive(tmp_path, scenes_and_weights):
    scenes, weights = scenes_and_weights
    masked = str(tmp_path / "masked")
    partial.simulate(scenes, masked, protocol="uniform", known_ratio=0.5, seed=0)
    out = str(tmp_path / "features")
    extract_features.extract(masked, out, backbone_weights=weights, splits=["train"],
                             stream=io.StringIO())
    np.testing.assert_array_equal(partial.read_label_rows(out, "train"),
                                  partial.read_label_rows(masked, "train"))
    assert list(data.load_dataset_info(out).splits) == ["train"]


def test_bad_inputs_are_clear_errors(tmp_path, scenes_and_weights):
    scenes, weights = scenes_and_weights
    with pytest.raises(data.DataError, match="no such file"):
        extract_features.extract(scenes, str(tmp_path / "o"), backbone_weights="missing.h5")
    with pytest.raises(data.DataError, match="must differ"):
        extract_features.extract(scenes, scenes, backbone_weights=weights)
    with pytest.raises(data.DataError, match="split 'val' is not in this dataset"):
        extract_features.extract(scenes, str(tmp_path / "o"), backbone_weights=weights,
                                 splits=["val"])
    features = str(tmp_path / "f")
    extract_features.extract(scenes, features, backbone_weights=weights, splits=["test"],
                             stream=io.StringIO())
    with pytest.raises(data.DataError, match="needs images"):
        extract_features.extract(features, str(tmp_path / "o"), backbone_weights=weights)
