"""Datasets of imcl_tf: the TFRecord schema, dataset.json, writing, reading and verifying shards.

A dataset is a folder with `dataset.json` and sharded TFRecord files, one `tf.train.Example` per
image (docs/dataset-schema.md). The modules, one job each:

  errors        DataError, raised for bad input data
  schema        the TFRecord feature keys, make_example, label_row
  dataset_info  dataset.json: DatasetInfo, SplitInfo, load/save/replace_dataset_info (the commit
                point of a rebuild), check_shard_name, remove_stale_temporaries
  shards        writing a split's shards: shard_names, fresh_shard_names, SplitWriter
  decoding      reading one record: parse_example, decode_image, id_hash (and augmentation)
  pipeline      tf.data pipelines: make_dataset, load_split_arrays
  verify        verify_dataset and its statistics (SplitStats, DatasetReport)

Everything public is importable from `imcl_tf.data` itself, e.g. `from imcl_tf.data import
make_dataset`.
"""

from imcl_tf import lazy_exports

# Imported on first use (PEP 562): `data.DataError` and the flag definitions of the dataset tools
# need no TensorFlow (their --help answers at once); the other names import it.
_EXPORTS = {
    "imcl_tf.data.dataset_info": ("DatasetInfo", "SplitInfo", "check_shard_name",
                                  "load_dataset_info", "remove_stale_temporaries",
                                  "replace_dataset_info", "save_dataset_info", "utc_now"),
    "imcl_tf.data.decoding": ("decode_image", "id_hash", "parse_example"),
    "imcl_tf.data.errors": ("DataError",),
    "imcl_tf.data.pipeline": ("load_split_arrays", "make_dataset"),
    "imcl_tf.data.schema": ("DATASET_JSON", "EMBEDDING_KEY", "IMAGE_CLASS_KEY",
                            "IMAGE_ENCODED_KEY", "IMAGE_ID_KEY", "NEGATIVE_KEY", "POSITIVE_KEY",
                            "SCHEMA_VERSION", "label_row", "make_example"),
    "imcl_tf.data.shards": ("SplitWriter", "fresh_shard_names", "shard_names"),
    "imcl_tf.data.verify": ("DatasetReport", "SplitStats", "verify_dataset"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "DATASET_JSON", "EMBEDDING_KEY", "IMAGE_CLASS_KEY", "IMAGE_ENCODED_KEY", "IMAGE_ID_KEY",
    "NEGATIVE_KEY", "POSITIVE_KEY", "SCHEMA_VERSION",
    "DataError",
    "DatasetInfo", "SplitInfo", "check_shard_name", "load_dataset_info",
    "remove_stale_temporaries", "replace_dataset_info", "save_dataset_info", "utc_now",
    "DatasetReport", "SplitStats", "verify_dataset",
    "SplitWriter", "fresh_shard_names", "shard_names",
    "decode_image", "id_hash", "parse_example",
    "label_row", "make_example",
    "load_split_arrays", "make_dataset",
]


__getattr__, __dir__ = lazy_exports.attach(globals(), _MODULE_OF)
