"""The command lines of serving/server.py and serving/client.py, TensorFlow-free.

`imcl-serve` and `imcl-client` parse their arguments with these parsers before TensorFlow is
imported, so `--help` and a usage mistake answer at once; the mains parse with the same parsers.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util

from imcl_tf import image_header

DEFAULT_PORT = 8500  # TF Serving's gRPC port
DEFAULT_REST_PORT = 8501  # TF Serving's REST port
DEFAULT_HOST = "127.0.0.1"  # loopback: exposing the server is an explicit choice
DEFAULT_MAX_MESSAGE_MB = 64
# imcl_tf.export.SERVING_DEFAULT and PREDICT_IMAGES (that module imports TensorFlow; a test
# checks the names agree).
CLIENT_SIGNATURES = ("serving_default", "predict_images")


def _module_docstring(module: str) -> str | None:
    """A module's docstring read from its source, without importing (running) the module."""
    spec = importlib.util.find_spec(module)
    with open(spec.origin, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read()), clean=False)


def server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.server",
                                     description=_module_docstring("serving.server"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_base_path", required=True,
                        help="<export_base>/<model_name>: the folder holding version folders")
    parser.add_argument("--model_name", required=True, help="name clients put in model_spec.name")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: any free)")
    parser.add_argument("--rest_api_port", type=int, default=DEFAULT_REST_PORT,
                        help="REST port, TF Serving's JSON API (0: no REST, as in TF Serving)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on; 0.0.0.0 exposes the server to the network")
    parser.add_argument("--max_batch_size", type=int, default=64,
                        help="largest batch one request may carry")
    parser.add_argument("--max_message_mb", type=int, default=DEFAULT_MAX_MESSAGE_MB,
                        help="largest request or response message (gRPC) or body (REST), in "
                             "MiB; no request may expand to more elements than a dense float32 "
                             "message of this size")
    parser.add_argument("--max_image_pixels", type=int,
                        default=image_header.DEFAULT_MAX_IMAGE_PIXELS,
                        help="images whose header declares more pixels are refused before "
                             "decoding (decompression bombs)")
    parser.add_argument("--max_concurrent_rpcs", type=int, default=0,
                        help="requests in flight beyond this get RESOURCE_EXHAUSTED / HTTP 429 "
                             "(0: no limit)")
    parser.add_argument("--ssl_cert", help="PEM certificate chain: serve gRPC and REST over TLS")
    parser.add_argument("--ssl_key", help="PEM private key of --ssl_cert")
    parser.add_argument("--access_log",
                        help="file that gets one line per request ('-': stderr); default: none")
    parser.add_argument("--poll_seconds", type=float, default=1.0,
                        help="how often to look for new versions")
    parser.add_argument("--num_versions", type=int, default=2,
                        help="how many of the newest versions stay loaded")
    parser.add_argument("--num_threads", type=int, default=16, help="request worker threads")
    parser.add_argument("--enable_batching", action="store_true",
                        help="merge concurrent requests into one model call (as TF Serving's "
                             "--enable_batching); batches hold at most --max_batch_size rows")
    parser.add_argument("--num_batch_threads", type=int, default=2,
                        help="with batching: model calls running at once")
    parser.add_argument("--batch_timeout_micros", type=int, default=0,
                        help="with batching: how long a partial batch may wait for more requests")
    parser.add_argument("--shutdown_grace_seconds", type=float, default=30.0,
                        help="how long in-flight requests may run after SIGTERM/SIGINT")
    return parser


def client_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m serving.client",
                                     description="Top labels per image from a served imcl_tf "
                                                 "model (TF Serving gRPC).")
    parser.add_argument("--server", default="localhost:8500", help="host:port of the gRPC server")
    parser.add_argument("--model_name", required=True)
    parser.add_argument("--version", type=int, default=None, help="default: the newest")
    parser.add_argument("--signature", default=CLIENT_SIGNATURES[0],
                        choices=list(CLIENT_SIGNATURES),
                        help="serving_default sends the file bytes; predict_images decodes "
                             "and resizes here and sends float arrays")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("images", nargs="+", help="JPEG or PNG files")
    return parser
