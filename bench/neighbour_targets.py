"""How good are IMCL's smoothness targets? AP on the HIDDEN training labels, target by target.

IMCL's label-side loss pulls the state of every unknown entry of an image towards its
reconstruction from k neighbours, sum_s c_s y~_s (docs/method.md §5-3.3). That can only help if the
reconstruction predicts the hidden label better than the model already does. On a dataset made by
`tfrecords_tools.partial` from a fully labelled one, the hidden labels are known, so this measures
it directly: for a trained model (usually the logistic baseline IMCL starts from), the mean over
classes of the AP on the training entries that are unknown to training, for

- the model's own prediction sigma_c(z);
- the IMCL reconstruction, exactly as the training step forms it (label states, graph, joint
  nonnegative OMP with the given k, dictionary and lambdas, the query itself excluded);
- the reconstruction divided by sum_s c_s (a convex version), alone and averaged with the model's
  own label state (the two that the label loss pulls together: the target adds information only
  if the average beats the model alone);
- the fraction of known positives among the image's n nearest training images in feature space
  (cosine), a plain kNN label propagation, alone and averaged with the model's probability.

  python bench/neighbour_targets.py --model_dir RUN/logistic --data_dir DATA/uniform_30_seed0 \\
      --out bench/results/neighbour_targets.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="A finished run (best.keras is used).")
    parser.add_argument("--data_dir", required=True,
                        help="Partial-label dataset written by tfrecords_tools.partial.")
    parser.add_argument("--full_data_dir", default="",
                        help="Its fully labelled source (default: dataset.json's source_dataset).")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--asym_c", type=float, default=2.0)
    parser.add_argument("--dictionaries", default="10,0",
                        help="Dictionary sizes per class to try (0: the whole training split).")
    parser.add_argument("--graphs", default="cooccurrence,identity")
    parser.add_argument("--lambda_f", default="0,1,100",
                        help="Feature-side OMP weights to try (lambda_y = 1).")
    parser.add_argument("--knn", default="10,30")
    parser.add_argument("--out", default="", help="Markdown file for the table (default: stdout).")
    args = parser.parse_args(argv)
    dictionaries = _numbers(parser, "--dictionaries", args.dictionaries, int, minimum=0)
    lambdas_f = _numbers(parser, "--lambda_f", args.lambda_f, float, minimum=0)
    knn_sizes = _numbers(parser, "--knn", args.knn, int, minimum=1)
    graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
    if not graphs:
        parser.error("--graphs: give at least one of identity, cooccurrence or a .npy path.")
    if args.k < 1:
        parser.error(f"--k must be >= 1, received {args.k}.")

    import tensorflow as tf
    from imcl_tf import data as data_lib, label_graph, losses, memory, metrics, models
    from imcl_tf.omp import joint_nonnegative_omp

    info = data_lib.load_dataset_info(args.data_dir)
    full_dir = args.full_data_dir or info.labels.get("source_dataset", "")
    if not full_dir or not os.path.exists(os.path.join(full_dir, data_lib.DATASET_JSON)):
        raise SystemExit(f"neighbour_targets: cannot find the fully labelled source of "
                         f"{args.data_dir} (dataset.json source_dataset={full_dir!r}); pass "
                         "--full_data_dir.")
    model, _ = models.load_model_dir(args.model_dir, "best")
    inputs, labels, ids = data_lib.load_split_arrays(args.data_dir, "train")
    _, full_labels, full_ids = data_lib.load_split_arrays(full_dir, "train")
    row_of = {int(i): n for n, i in enumerate(full_ids)}
    missing = [int(i) for i in ids if int(i) not in row_of]
    if missing:
        raise SystemExit(f"neighbour_targets: {len(missing)} training ids of {args.data_dir} are "
                         f"not in {full_dir}; is it the right source?")
    full_labels = full_labels[[row_of[int(i)] for i in ids]]
    if max(knn_sizes) >= len(inputs):
        raise SystemExit(f"neighbour_targets: --knn {args.knn} asks for {max(knn_sizes)} "
                         f"neighbours, but the training split has only {len(inputs)} images "
                         "(the image itself excluded); give smaller sizes.")
    # Score only the entries training never saw; their true value comes from the full labels.
    hidden = np.where(labels == 0, full_labels, 0.0)
    if not (hidden != 0).any():
        raise SystemExit("neighbour_targets: every training label is known; nothing is hidden.")

    features = np.concatenate([model.extract_features(inputs[i:i + 256]).numpy()
                               for i in range(0, len(inputs), 256)])
    logits = model.head(features).numpy()
    predicted = losses.asym_tanh(logits, args.asym_c).numpy()
    with_bias = np.concatenate([features, np.ones([len(features), 1], np.float32)], axis=1)
    query_y = losses.query_label_states(logits, labels, args.asym_c).numpy()

    def hidden_map(scores):
        return 100.0 * float(np.nanmean(metrics.per_class_ap(scores, hidden)))

    rows = [("model prediction sigma_c(z)", "-", hidden_map(predicted))]
    for per_class in dictionaries:
        bank = memory.select_dictionary(labels, per_class=per_class, seed=0)
        exclude = ids[:, None] == ids[bank][None, :]
        if args.k > len(bank):
            raise SystemExit(f"neighbour_targets: --k={args.k} is larger than the dictionary of "
                             f"{len(bank)} images (--dictionaries {per_class}); lower --k.")
        for graph_name in graphs:
            graph = label_graph.build_label_graph(graph_name, labels.shape[1], labels)
            atoms_y = losses.atom_label_states(logits[bank], labels[bank], graph,
                                               args.asym_c).numpy()
            for lambda_f in lambdas_f:
                result = joint_nonnegative_omp(query_y, with_bias, atoms_y, with_bias[bank],
                                               args.k, lambda_y=1.0, lambda_f=lambda_f,
                                               exclude=exclude)
                indices, valid, coef_y = (result.indices.numpy(), result.valid.numpy(),
                                          result.coef_y.numpy())
                coef_y = np.where(valid, coef_y, 0.0)
                target = np.einsum("bk,bkl->bl", coef_y, atoms_y[np.maximum(indices, 0)])
                total = coef_y.sum(1, keepdims=True)
                size = "whole split" if per_class == 0 else f"{per_class}/class"
                setting = (f"dictionary {len(bank)} ({size}), "
                           f"{graph_name} graph, lambda_f {lambda_f:g}; sum c = "
                           f"{float(total.mean()):.2f}")
                rows.append(("IMCL reconstruction", setting, hidden_map(target)))
                convex = target / np.maximum(total, 1e-6)
                rows.append(("IMCL reconstruction / sum c", setting, hidden_map(convex)))
                # What the label loss moves an unknown state towards: the model's own state and
                # the reconstruction together. Above the model alone, the target adds something.
                rows.append(("mean of the model's state and the reconstruction / sum c", setting,
                             hidden_map(0.5 * predicted + 0.5 * convex)))
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    probability = tf.sigmoid(logits).numpy()
    base_rate = float((labels > 0).sum() / max((labels != 0).sum(), 1))
    for n in knn_sizes:
        nearest = np.argsort(-similarity, axis=1)[:, :n]
        neighbour_labels = labels[nearest]  # [N, n, L]
        known = (neighbour_labels != 0).sum(1)
        fraction = np.where(known > 0, (neighbour_labels > 0).sum(1) / np.maximum(known, 1),
                            base_rate)
        rows.append((f"kNN of observed labels, n = {n}", "cosine on the model's features",
                     hidden_map(fraction)))
        rows.append((f"mean of kNN (n = {n}) and the model's probability", "-",
                     hidden_map(0.5 * fraction + 0.5 * probability)))

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Hidden training entries: {int((hidden != 0).sum())} of {hidden.size} "
             f"({int((hidden > 0).sum())} positive); k = {args.k}; date {now}.", "",
             "| target for the unknown entries | setting | mAP on hidden training labels |",
             "|---|---|---:|"]
    lines += [f"| {name} | {setting} | {value:.2f} |" for name, setting, value in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def _numbers(parser, flag, text, cast, minimum):
    """A comma-separated list of numbers >= minimum, or a usage error naming the flag."""
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated {cast.__name__} values, received {text!r}.")
    if not values or min(values) < minimum:
        parser.error(f"{flag}: expected values >= {minimum}, received {text!r}.")
    return values


if __name__ == "__main__":
    sys.exit(main())
