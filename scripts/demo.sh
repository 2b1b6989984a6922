#!/usr/bin/env bash
# The main job, end to end on the Fashion-MNIST scenes demo (creating ./.venv on first use):
# dataset -> 30 % known labels -> logistic baseline -> IMCL -> evaluation -> SavedModel export.
# Extra arguments go to python -m imcl_tf.demo (e.g. --output_dir DIR, --known_ratio 0.1).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
exec "$PY" -m imcl_tf.demo "$@"
