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

from imcl_tf.data.dataset_info import (DatasetInfo, SplitInfo, check_shard_name,
                                       load_dataset_info, remove_stale_temporaries,
                                       replace_dataset_info, save_dataset_info, utc_now)
from imcl_tf.data.decoding import decode_image, id_hash, parse_example
from imcl_tf.data.errors import DataError
from imcl_tf.data.pipeline import load_split_arrays, make_dataset
from imcl_tf.data.schema import (DATASET_JSON, EMBEDDING_KEY, IMAGE_CLASS_KEY, IMAGE_ENCODED_KEY,
                                 IMAGE_ID_KEY, NEGATIVE_KEY, POSITIVE_KEY, SCHEMA_VERSION,
                                 label_row, make_example)
from imcl_tf.data.shards import SplitWriter, fresh_shard_names, shard_names
from imcl_tf.data.verify import DatasetReport, SplitStats, verify_dataset

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
