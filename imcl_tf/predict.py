"""Labels image files with a trained model: `imcl-predict DIR --model=RUN_OR_EXPORT`.

    imcl-predict photos/ --model=runs/demo              # a training run (its best model)
    imcl-predict photos/ --model=exports/demo           # a SavedModel export (newest version)
    imcl-predict a.jpg b.png --model=runs/demo --top_k=5 --threshold=0.3 --output=labels.csv

prints, per image, the top-k class names with their probabilities (sigmoid, multi-label: the
scores do not sum to 1). `--output` also writes them to a .csv (image, rank, class, score) or
.json file. Images are decoded and resized exactly as in evaluation and serving
(`imcl_tf.data.decode_image`); a file that is not a readable JPEG/PNG is skipped with a message.

`--model` may be a training run folder (model_config.json + best.keras / latest.keras), a .keras
file inside one, a SavedModel version folder written by imcl-export, or its model folder (the
highest version is used). TensorFlow is imported only after the flags are parsed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np
from absl import app, flags

from imcl_tf import console

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Predictor:
    """A loaded model: its class names, input size and `probabilities(images)`.

    `probabilities` maps float32 images [B, S, S, 3] in 0..255 to float32 [B, L] in [0, 1].
    """
    class_names: list[str]
    image_size: int
    probabilities: Callable[[np.ndarray], np.ndarray]
    source: str


@dataclasses.dataclass
class Prediction:
    image: str
    classes: list[str]
    scores: list[float]


def load_predictor(path: str, checkpoint: str = "best") -> Predictor:
    """The predictor of a run folder, a .keras file of one, or a SavedModel export (see module).

    Raises:
      ValueError: `path` is none of these, or its model takes features rather than images.
    """
    if not os.path.exists(path):
        raise ValueError(f"--model={path!r} does not exist; give a training run folder "
                         "(imcl-train --model_dir) or a SavedModel export (imcl-export).")
    from imcl_tf import export, models

    if os.path.isfile(path) and path.endswith(".keras"):
        return _keras_predictor(os.path.dirname(os.path.abspath(path)), path)
    if os.path.isfile(os.path.join(path, models.MODEL_CONFIG_JSON)):
        best = os.path.join(path, models.BEST_MODEL)
        latest = os.path.join(path, models.LATEST_MODEL)
        chosen = best if checkpoint == "best" and os.path.exists(best) else latest
        if not os.path.exists(chosen):
            raise ValueError(f"the run in {path!r} has not saved a model yet (no "
                             f"{models.BEST_MODEL} or {models.LATEST_MODEL}); let training reach "
                             "its first evaluation.")
        return _keras_predictor(path, chosen)
    version_dir = path
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        versions = export.list_versions(path)
        if not versions:
            raise ValueError(f"--model={path!r} is neither a training run (no "
                             f"{models.MODEL_CONFIG_JSON}), a .keras file, nor a SavedModel "
                             "export (no saved_model.pb, no numbered version folders).")
        version_dir = os.path.join(path, str(versions[-1]))
    return _saved_model_predictor(version_dir)


def _keras_predictor(model_dir: str, model_file: str) -> Predictor:
    import keras
    import tensorflow as tf

    from imcl_tf import models

    info = models.read_model_info(model_dir)
    if info.get("input_mode") != "image":
        raise ValueError(f"the model in {model_dir!r} takes precomputed features "
                         "(--backbone=features), not images; label its dataset with "
                         "imcl-evaluate instead.")
    model = keras.saving.load_model(model_file, compile=False)
    forward = tf.function(lambda x: tf.sigmoid(tf.cast(model(x, training=False), tf.float32)),
                          reduce_retracing=True)
    return Predictor(list(info["class_names"]), int(info["image_size"]),
                     lambda images: forward(tf.constant(images)).numpy(), model_file)


def _saved_model_predictor(version_dir: str) -> Predictor:
    import tensorflow as tf

    from imcl_tf import export

    loaded = tf.saved_model.load(version_dir)
    if export.PREDICT_IMAGES not in loaded.signatures:
        raise ValueError(f"the SavedModel {version_dir!r} has no {export.PREDICT_IMAGES!r} "
                         "signature: it takes features, not images.")
    signature = loaded.signatures[export.PREDICT_IMAGES]
    spec = signature.structured_input_signature[1][export.IMAGES_INPUT]
    image_size = int(spec.shape[1])

    def probabilities(images: np.ndarray) -> np.ndarray:
        outputs = signature(**{export.IMAGES_INPUT: tf.constant(images, tf.float32)})
        return outputs[export.PROBABILITIES].numpy()

    return Predictor(export.read_class_names(version_dir), image_size, probabilities,
                     version_dir)


def list_images(paths: Sequence[str], recursive: bool = False) -> list[str]:
    """The image files named by `paths` (files, or folders searched for .jpg/.jpeg/.png), sorted
    within each folder.

    Raises:
      ValueError: a path does not exist, or nothing to label was found.
    """
    found: list[str] = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            if recursive:
                for root, dirs, files in os.walk(path):
                    dirs.sort()
                    found += [os.path.join(root, f) for f in sorted(files)
                              if f.lower().endswith(IMAGE_EXTENSIONS)]
            else:
                found += [os.path.join(path, f) for f in sorted(os.listdir(path))
                          if f.lower().endswith(IMAGE_EXTENSIONS)
                          and os.path.isfile(os.path.join(path, f))]
        else:
            raise ValueError(f"{path!r}: no such file or folder.")
    if not found:
        raise ValueError(f"no .jpg/.jpeg/.png images in {', '.join(map(repr, paths))}"
                         + ("" if recursive else " (--recursive searches sub-folders)") + ".")
    return found


def decode_file(path: str, image_size: int) -> np.ndarray:
    """float32 [S, S, 3] of an image file, as evaluation sees it; ValueError if unreadable."""
    import tensorflow as tf

    from imcl_tf import data, image_header

    with open(path, "rb") as f:
        encoded = f.read()
    try:
        image_header.check_image_pixels(encoded, where=path)
        return data.decode_image(tf.constant(encoded), image_size, path).numpy()
    except tf.errors.OpError as error:
        raise ValueError(f"{path}: not a readable JPEG/PNG image ({error.message.strip()})"
                         ) from error


def top_classes(probabilities: np.ndarray, class_names: Sequence[str], top_k: int,
                threshold: float = 0.0) -> tuple[list[str], list[float]]:
    """The top_k classes of one probability row (ties: lower class index first), keeping those
    >= threshold; top_k=0 keeps every class >= threshold."""
    order = np.argsort(-probabilities, kind="stable")
    if top_k:
        order = order[:top_k]
    order = [int(i) for i in order if probabilities[i] >= threshold]
    return [class_names[i] for i in order], [float(probabilities[i]) for i in order]


def predict_files(predictor: Predictor, files: Sequence[str], *, top_k: int = 3,
                  threshold: float = 0.0, batch_size: int = 32,
                  on_skip: Callable[[str], None] | None = None) -> list[Prediction]:
    """Labels every readable file; an unreadable one is reported to `on_skip` and left out."""
    predictions: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        batch, images = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(decode_file(path, predictor.image_size))
                batch.append(path)
            except (ValueError, OSError) as error:
                if on_skip is None:
                    raise
                on_skip(console.error_message(error))
        if not images:
            continue
        scores = predictor.probabilities(np.stack(images).astype(np.float32))
        for path, row in zip(batch, scores):
            classes, values = top_classes(row, predictor.class_names, top_k, threshold)
            predictions.append(Prediction(path, classes, values))
    return predictions


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """One line per image: `path: class 0.912, class 0.801` (`(none)` when no class passed)."""
    lines = []
    for p in predictions:
        labels = ", ".join(f"{c} {s:.3f}" for c, s in zip(p.classes, p.scores)) or "(none)"
        lines.append(f"{p.image}: {labels}")
    return "\n".join(lines)


def write_predictions(predictions: Sequence[Prediction], path: str) -> None:
    """A .csv (image, rank, class, score; one row per label) or .json file, written atomically."""
    if path.endswith(".json"):
        text = json.dumps([{"image": p.image, "predictions": [
            {"class": c, "score": round(s, 6)} for c, s in zip(p.classes, p.scores)]}
            for p in predictions], indent=2) + "\n"
    elif path.endswith(".csv"):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "class", "score"])
        for p in predictions:
            for rank, (c, s) in enumerate(zip(p.classes, p.scores), start=1):
                writer.writerow([p.image, rank, c, f"{s:.6f}"])
        text = buffer.getvalue()
    else:
        raise ValueError(f"--output={path!r}: the name must end in .csv or .json.")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(temporary, path)


# ---- Command line ------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    def define(kind, name, default, help_text, **kwargs):
        if name not in flag_values:
            kind(name=name, default=default, help=help_text, flag_values=flag_values, **kwargs)

    define(flags.DEFINE_string, "model", None, "A training run folder, a .keras file of one, a "
           "SavedModel version folder or its model folder (newest version).", required=True)
    define(flags.DEFINE_enum, "checkpoint", "best", "Which model of a training run.",
           enum_values=["best", "latest"])
    define(flags.DEFINE_integer, "top_k", 3, "Classes shown per image (0: every class above "
           "--threshold).", lower_bound=0)
    define(flags.DEFINE_float, "threshold", 0.0, "Show only classes with a probability >= this.",
           lower_bound=0.0, upper_bound=1.0)
    define(flags.DEFINE_string, "output", None, "Also write the labels to this .csv or .json "
           "file.")
    define(flags.DEFINE_boolean, "recursive", False, "Search folders' sub-folders too.")
    define(flags.DEFINE_integer, "batch_size", 32, "Images per forward pass.", lower_bound=1)


def main(argv: Sequence[str]) -> None:
    paths = list(argv[1:])
    if not paths:
        raise app.UsageError("give the images to label: imcl-predict DIR_OR_FILES... "
                             "--model=RUN_OR_EXPORT")
    if FLAGS.output and not FLAGS.output.endswith((".csv", ".json")):
        raise ValueError(f"--output={FLAGS.output!r}: the name must end in .csv or .json.")
    files = list_images(paths, FLAGS.recursive)
    if not os.path.exists(FLAGS.model):
        load_predictor(FLAGS.model)  # the "does not exist" message, before TensorFlow loads
    console.import_tensorflow_quietly()
    predictor = load_predictor(FLAGS.model, FLAGS.checkpoint)
    skipped: list[str] = []

    def on_skip(message: str) -> None:
        skipped.append(message)
        print(f"imcl-predict: skipped {message}", file=sys.stderr)

    predictions = predict_files(predictor, files, top_k=FLAGS.top_k, threshold=FLAGS.threshold,
                                batch_size=FLAGS.batch_size, on_skip=on_skip)
    if predictions:
        print(format_predictions(predictions), flush=True)
    if FLAGS.output:
        write_predictions(predictions, FLAGS.output)
        print(f"wrote {len(predictions)} images' labels to {FLAGS.output}", file=sys.stderr)
    if skipped:
        print(f"imcl-predict: {len(skipped)} of {len(files)} files skipped (see above).",
              file=sys.stderr)
        if not predictions:
            raise SystemExit(1)


def run_cli() -> None:
    """The `imcl-predict` command."""
    define_flags()
    console.run_app(main, program="imcl-predict", flag_modules=[__name__],
                    needs_tensorflow=False)


if __name__ == "__main__":
    run_cli()

