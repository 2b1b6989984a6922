"""The error a request handler raises to refuse a request (shared by the gRPC and REST sides)."""

import grpc


class RequestError(Exception):
    """A request the server refuses; becomes the gRPC status `code` with `message` (and over
    REST, the HTTP status TF Serving maps that code to). `too_large` marks a body over the size
    limit, which REST answers with 413."""

    def __init__(self, code: grpc.StatusCode, message: str, too_large: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.too_large = too_large
