"""--bce_unknown_as_negative in a run: the co-occurrence graph counts unknowns as absent too."""

import dataclasses

import numpy as np

from imcl_tf import label_graph as graph_lib
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.split_reading import read_split_labels
from imcl_tf.training.trainer import _Trainer
from test_train_common import write_dataset


def test_the_graph_counts_unknown_entries_as_absent(tmp_path):
    data_dir = write_dataset(str(tmp_path / "data"), num_train=32, num_val=8, known_ratio=0.5)
    config = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "run"), method="imcl",
                         train_steps=1, batch_size=8, dictionary_per_class=2,
                         label_graph="cooccurrence", bce_unknown_as_negative=True, verbose=0)
    rows, _ = read_split_labels(data_dir, "train")
    graphs = {}
    for flag in (True, False):
        trainer = _Trainer(dataclasses.replace(config, bce_unknown_as_negative=flag))
        trainer._build()
        assert trainer.model.method.bce_unknown_as_negative == flag
        graphs[flag] = trainer.model.method.label_graph.matrix.numpy()
    absent = np.where(rows == 0, -1.0, rows)
    np.testing.assert_allclose(graphs[True], graph_lib.normalize_graph(
        graph_lib.cooccurrence_graph(absent)), rtol=1e-6)
    np.testing.assert_allclose(graphs[False], graph_lib.normalize_graph(
        graph_lib.cooccurrence_graph(rows)), rtol=1e-6)
    assert not np.allclose(graphs[True], graphs[False])
