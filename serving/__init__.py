"""Export for TensorFlow Serving: a protocol-compatible local gRPC server and the client."""
