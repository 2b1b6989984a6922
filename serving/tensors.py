"""NumPy <-> TensorProto conversion for the serving client and server.

The same wire format as tf.make_tensor_proto / tf.make_ndarray (numbers as raw little-endian
bytes in tensor_content, strings in string_val), about ten times faster for the small tensors of
one request, where TensorFlow's general converters are a visible share of the latency. Anything
unusual falls back to TensorFlow's converters.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2


def to_tensor_proto(array, proto: tensor_pb2.TensorProto | None = None) -> tensor_pb2.TensorProto:
    """Fills `proto` (or a new TensorProto) from an array-like and returns it.

    float32/float64/int32/int64/bool arrays and bytes/str arrays (tf.string) take the fast path.
    """
    proto = tensor_pb2.TensorProto() if proto is None else proto
    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        values = [value.encode("utf-8") if isinstance(value, str) else value
                  for value in array.reshape(-1).tolist()]
        if not all(isinstance(value, bytes) for value in values):
            proto.CopyFrom(tf.make_tensor_proto(array))
            return proto
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(values)
    else:
        dtype = _NUMPY_TO_DTYPE.get(array.dtype.newbyteorder("<"))
        if dtype is None:
            proto.CopyFrom(tf.make_tensor_proto(array))
            return proto
        proto.dtype = dtype
        proto.tensor_content = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def to_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """The array a TensorProto holds (strings as an object array of bytes)."""
    shape = [dim.size for dim in proto.tensor_shape.dim]
    count = int(np.prod(shape, dtype=np.int64))
    if proto.dtype == types_pb2.DT_STRING and len(proto.string_val) == count:
        array = np.empty([count], dtype=object)
        array[:] = list(proto.string_val)
        return array.reshape(shape)
    dtype = _DTYPE_TO_NUMPY.get(proto.dtype)
    if dtype is not None and proto.tensor_content and len(proto.tensor_content) == (
            count * dtype.itemsize):
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape).copy()
    return tf.make_ndarray(proto)  # value lists, compact repeated values, other dtypes


_DTYPE_TO_NUMPY = {types_pb2.DT_FLOAT: np.dtype("<f4"), types_pb2.DT_DOUBLE: np.dtype("<f8"),
                   types_pb2.DT_INT32: np.dtype("<i4"), types_pb2.DT_INT64: np.dtype("<i8"),
                   types_pb2.DT_BOOL: np.dtype("?")}
_NUMPY_TO_DTYPE = {dtype: code for code, dtype in _DTYPE_TO_NUMPY.items()}
