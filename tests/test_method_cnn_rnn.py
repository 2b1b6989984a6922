"""CNN-RNN (imcl_tf/methods/cnn_rnn.py): the frequency order, the teacher-forced targets and
their masked softmax cross-entropy against NumPy loops, the beam search against a brute-force
search, the per-class score rule, and the method in the model, saved, trained and exported."""

import itertools
import types

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.methods import cnn_rnn
from imcl_tf.methods.base import Batch
from method_checks import (bare_model, fit_save_reload, fit_under_mixed_precision,
                           run_warm_started_resumed_and_exported)


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def random_rows(rng, batch, num_classes):
    """Random partial rows with the corner cases: no known negative, no known positive, all
    unknown, every class positive."""
    labels = rng.choice([-1.0, 0.0, 1.0], size=(batch, num_classes))
    labels[0] = np.where(np.arange(num_classes) < 2, 1.0, 0.0)
    labels[1] = np.where(np.arange(num_classes) % 2 == 0, -1.0, 0.0)
    labels[2] = 0.0
    labels[3] = 1.0
    return labels


# ---- the frequency order ----------------------------------------------------------------------


def test_frequency_order_counts_known_positives_most_first_ties_by_index():
    train = np.array([[1, -1, 0, 1, 0],
                      [1, 0, 1, 1, -1],
                      [0, -1, 1, 1, -1],
                      [-1, 0, 0, 1, 0]], np.int8)
    # positives per class: 2, 0, 2, 4, 0 (negatives and unknowns do not count)
    assert cnn_rnn.frequency_order(train) == [3, 0, 2, 1, 4]


def test_frequency_order_matches_numpy_sort(rng):
    train = rng.choice([-1, 0, 1], size=(40, 9), p=[0.3, 0.5, 0.2]).astype(np.int8)
    counts = (train > 0).sum(0)
    expected = sorted(range(9), key=lambda c: (-counts[c], c))
    assert cnn_rnn.frequency_order(train) == expected


# ---- the teacher-forced targets ----------------------------------------------------------------


def reference_targets(labels, order, max_length):
    """Per row and step: input token, target, taught or not, and the normaliser (a set)."""
    num_classes = labels.shape[1]
    end, start = num_classes, num_classes + 1
    steps = max_length + 1
    rows = []
    for row in labels:
        positives = [c for c in order if row[c] > 0]
        negatives = {c for c in range(num_classes) if row[c] < 0}
        taught = positives[:max_length]
        targets = taught + [end] * (steps - len(taught))
        valid = [True] * len(taught) + [len(positives) <= max_length]
        valid += [False] * (steps - len(valid))
        inputs = [start] + targets[:-1]
        allowed = [{targets[t], end} | negatives | set(taught[:t]) for t in range(steps)]
        rows.append((inputs, targets, valid, allowed))
    return rows


@pytest.mark.parametrize("num_classes,max_length", [(6, 3), (6, 6), (3, 5), (7, 1)])
def test_teacher_forcing_targets_match_numpy(rng, num_classes, max_length):
    labels = random_rows(rng, 9, num_classes)
    order = [int(c) for c in rng.permutation(num_classes)]
    rank = np.empty(num_classes, np.int32)
    rank[order] = np.arange(num_classes)
    inputs, targets, allowed, valid = (t.numpy() for t in cnn_rnn.teacher_forcing_targets(
        labels, rank, max_length))
    steps = max_length + 1
    assert inputs.shape == targets.shape == valid.shape == (9, steps)
    assert allowed.shape == (9, steps, num_classes + 1)
    for b, (ref_inputs, ref_targets, ref_valid, ref_allowed) in enumerate(
            reference_targets(labels, order, max_length)):
        assert inputs[b].tolist() == ref_inputs
        assert targets[b].tolist() == ref_targets
        assert valid[b].tolist() == ref_valid
        for t in range(steps):
            if ref_valid[t]:
                assert set(np.flatnonzero(allowed[b, t]).tolist()) == ref_allowed[t], (b, t)


def test_targets_by_hand():
    # classes 0..3, order 2, 0, 3, 1; END = 4, START = 5
    labels = np.array([[1, -1, 1, 0],    # positives 2, 0 (in order), negative 1, unknown 3
                       [0, 0, 0, 0],     # all unknown: END only, alone in its normaliser
                       [-1, 0, 0, -1]])  # no positive: END against the negatives
    rank = np.array([1, 3, 0, 2])
    inputs, targets, allowed, valid = (t.numpy() for t in cnn_rnn.teacher_forcing_targets(
        labels, rank, 3))
    assert targets[0].tolist() == [2, 0, 4, 4] and inputs[0].tolist() == [5, 2, 0, 4]
    assert valid[0].tolist() == [True, True, True, False]
    # step 0: target 2; known negative 1 and END compete; 0 (present later) and 3 (unknown) not
    assert np.flatnonzero(allowed[0, 0]).tolist() == [1, 2, 4]
    assert np.flatnonzero(allowed[0, 1]).tolist() == [0, 1, 2, 4]  # 2 was emitted: no repeat
    assert np.flatnonzero(allowed[0, 2]).tolist() == [0, 1, 2, 4]  # END step
    assert targets[1].tolist()[0] == 4 and valid[1].tolist() == [True, False, False, False]
    assert np.flatnonzero(allowed[1, 0]).tolist() == [4]
    assert np.flatnonzero(allowed[2, 0]).tolist() == [0, 3, 4]


# ---- the masked softmax cross-entropy ----------------------------------------------------------


def reference_cross_entropy(scores, targets, allowed, valid):
    losses = []
    for b, t in itertools.product(range(scores.shape[0]), range(scores.shape[1])):
        members = np.flatnonzero(allowed[b, t])
        if not valid[b, t] or len(members) < 2:
            continue
        s = scores[b, t]
        losses.append(-s[targets[b, t]] + np.log(np.exp(s[members]).sum()))
    return float(np.mean(losses)) if losses else 0.0


def test_masked_cross_entropy_matches_numpy(rng):
    num_classes, max_length = 6, 3
    for _ in range(4):
        labels = random_rows(rng, 8, num_classes)
        rank = rng.permutation(num_classes)
        inputs, targets, allowed, valid = cnn_rnn.teacher_forcing_targets(labels, rank,
                                                                          max_length)
        scores = rng.normal(scale=2.0, size=(8, max_length + 1, num_classes + 1))
        got = float(cnn_rnn.masked_sequence_cross_entropy(scores, targets, allowed, valid))
        expected = reference_cross_entropy(scores, targets.numpy(), allowed.numpy(),
                                           valid.numpy())
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_masked_cross_entropy_on_random_masks(rng):
    scores = rng.normal(scale=3.0, size=(5, 4, 7))
    targets = rng.integers(0, 7, size=(5, 4))
    allowed = rng.random((5, 4, 7)) < 0.4
    allowed[np.arange(5)[:, None], np.arange(4)[None, :], targets] = True  # holds the target
    allowed[0, 0] = False
    allowed[0, 0, targets[0, 0]] = True  # its target alone: not counted
    valid = rng.random((5, 4)) < 0.7
    got = float(cnn_rnn.masked_sequence_cross_entropy(scores, targets, allowed, valid))
    np.testing.assert_allclose(got, reference_cross_entropy(scores, targets, allowed, valid),
                               rtol=1e-5)


def test_unknown_and_later_positive_scores_do_not_change_the_loss(rng):
    labels = np.array([[1.0, 0.0, -1.0, 1.0, 0.0]])
    rank = np.arange(5)
    inputs, targets, allowed, valid = cnn_rnn.teacher_forcing_targets(labels, rank, 4)
    scores = rng.normal(size=(1, 5, 6))
    base = float(cnn_rnn.masked_sequence_cross_entropy(scores, targets, allowed, valid))
    moved = scores.copy()
    moved[:, :, [1, 4]] += 50.0  # unknown classes 1 and 4 everywhere
    moved[:, 0, 3] += 50.0  # class 3 at step 0, where it is still to come
    assert float(cnn_rnn.masked_sequence_cross_entropy(moved, targets, allowed, valid)) == \
        pytest.approx(base, rel=1e-6)
    negative = scores.copy()
    negative[:, :, 2] += 5.0  # a known negative rising costs
    assert float(cnn_rnn.masked_sequence_cross_entropy(negative, targets, allowed, valid)) > base


def test_all_unknown_batch_gives_zero_with_finite_gradients():
    labels = np.zeros([3, 4])
    inputs, targets, allowed, valid = cnn_rnn.teacher_forcing_targets(labels, np.arange(4), 2)
    scores = tf.Variable(tf.random.normal([3, 3, 5]))
    with tf.GradientTape() as tape:
        loss = cnn_rnn.masked_sequence_cross_entropy(scores, targets, allowed, valid)
    gradient = tape.gradient(loss, scores).numpy()
    assert float(loss) == 0.0 and np.all(np.isfinite(gradient)) and not np.any(gradient)


# ---- the beam search ---------------------------------------------------------------------------


def brute_force(step_log_probs, num_classes, max_length):
    """The best hypothesis by enumeration: (labels, score, per-class max log-probability).

    step_log_probs(prefix) gives the log-probabilities [L + 1] of the step after `prefix` (a
    tuple of labels). A hypothesis is distinct labels, then END, or max_length labels.
    """
    end = num_classes
    best = None
    for length in range(max_length + 1):
        for labels in itertools.permutations(range(num_classes), length):
            distributions = [step_log_probs(labels[:t]) for t in range(length)]
            score = sum(d[label] for d, label in zip(distributions, labels))
            if length < max_length:
                distributions.append(step_log_probs(labels))
                score += distributions[-1][end]
            if best is None or score > best[1]:
                best = (list(labels), score,
                        np.max(np.stack(distributions)[:, :num_classes], axis=0))
    return best


def table_step(weights):
    """A step whose distribution depends on the whole prefix (in order): a decaying bag of the
    tokens read so far, times a weight table; the same in TensorFlow and NumPy."""
    vocabulary_in = weights.shape[0]

    def tf_step(tokens, state):
        bag = 0.5 * state + tf.one_hot(tokens, vocabulary_in)
        return tf.nn.log_softmax(tf.matmul(bag, tf.constant(weights, tf.float32))), bag

    def np_step(prefix, start):
        bag = np.zeros(vocabulary_in)
        for token in (start, *prefix):
            bag = 0.5 * bag + np.eye(vocabulary_in)[token]
        return log_softmax(bag @ weights)

    return tf_step, np_step


@pytest.mark.parametrize("max_length,beam_width", [(2, 5), (3, 64), (1, 5)])
def test_beam_search_finds_the_brute_force_best(rng, max_length, beam_width):
    num_classes, batch = 4, 6
    start = num_classes + 1
    for _ in range(3):
        weights = rng.normal(scale=2.5, size=(batch, num_classes + 2, num_classes + 1))
        # one table per image: rows b * K + k use image b's table
        def step(tokens, state):
            bag = 0.5 * state + tf.one_hot(tokens, num_classes + 2)  # [B * K, V + 1]
            per_image = tf.repeat(tf.constant(weights, tf.float32), beam_width, axis=0)
            return tf.nn.log_softmax(tf.einsum("ni,niv->nv", bag, per_image)), bag

        result = cnn_rnn.beam_search(step, tf.zeros([batch * beam_width, num_classes + 2]),
                                     batch, num_classes, beam_width, max_length)
        for b in range(batch):
            _, np_step = table_step(weights[b])
            labels, score, class_max = brute_force(lambda p: np_step(p, start), num_classes,
                                                   max_length)
            best = int(result.best[b])
            assert best == 0  # the beams come best first
            sequence = result.sequences[b, best].numpy().tolist()
            found = [token for token in sequence if token != num_classes]
            assert found == labels, (b, sequence, labels)
            assert sequence[len(labels):] == [num_classes] * (max_length - len(labels))
            np.testing.assert_allclose(float(result.scores[b, best]), score, rtol=1e-5)
            np.testing.assert_allclose(result.class_log_probs[b].numpy(), class_max, rtol=1e-5)


def test_beam_search_never_repeats_a_label(rng):
    num_classes = 3
    # a step that always prefers label 0: after emitting it the beams must move on
    def step(tokens, state):
        logits = tf.tile(tf.constant([[6.0, 1.0, 0.5, -4.0]]), [tf.shape(tokens)[0], 1])
        return tf.nn.log_softmax(logits), state

    result = cnn_rnn.beam_search(step, tf.zeros([2 * 3, 1]), 2, num_classes, 3, 3)
    for sequence in result.sequences.numpy().reshape(-1, 3):
        labels = [t for t in sequence if t != num_classes]
        assert len(labels) == len(set(labels))
    assert result.sequences[0, 0].numpy().tolist() == [0, 1, 2]


def test_clipped_logits_invert_the_sigmoid_and_stay_bounded():
    probabilities = np.array([1e-30, 1e-8, 0.01, 0.3, 0.5, 0.9, 0.999])
    logits = cnn_rnn.clipped_logits(np.log(probabilities)).numpy()
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-logits)), probabilities, rtol=1e-4)
    assert np.all(np.diff(logits) > 0)  # monotone: the same ranking
    extremes = cnn_rnn.clipped_logits(np.array([0.0, -1e-12, -200.0, -np.inf])).numpy()
    assert np.all(np.isfinite(extremes))
    assert extremes[0] == extremes[1] > 15 and extremes[2] == extremes[3] == -cnn_rnn.LOGIT_BOUND


# ---- the method on its own ---------------------------------------------------------------------


def attached(rng, num_classes=4, max_length=2, beam_width=5, label_order=None):
    method = cnn_rnn.CnnRnn(num_classes, cnn_rnn_embedding_dim=5, cnn_rnn_lstm_units=7,
                            cnn_rnn_max_length=max_length, cnn_rnn_beam_width=beam_width,
                            label_order=label_order)
    method.attach(bare_model(6))
    # peaked, varied distributions (the default initialisation is nearly uniform)
    method.label_embeddings.assign(rng.normal(scale=1.5, size=method.label_embeddings.shape))
    return method


def test_decoding_is_the_brute_force_best_of_the_teacher_forced_decoder(rng):
    num_classes, max_length = 4, 2
    method = attached(rng, num_classes, max_length, beam_width=num_classes + 1)
    features = tf.constant(rng.normal(size=(5, 6)), tf.float32)
    start = num_classes + 1
    # every prefix's next-step distribution through the teacher-forcing path
    first_labels = np.arange(num_classes + 1)
    tokens = np.stack([np.full_like(first_labels, start), first_labels], axis=1)  # [V, 2]
    result = method.decode(features)
    logits = method.logits(None, features).numpy()
    for b in range(5):
        repeated = tf.repeat(features[b:b + 1], len(tokens), axis=0)
        table = log_softmax(method.decoder_scores(repeated, tokens).numpy())  # [V, 2, V]

        def step_log_probs(prefix):
            return table[0, 0] if not prefix else table[prefix[0], 1]

        labels, score, class_max = brute_force(step_log_probs, num_classes, max_length)
        best = int(result.best[b])
        found = [t for t in result.sequences[b, best].numpy() if t != num_classes]
        assert found == labels
        np.testing.assert_allclose(float(result.scores[b, best]), score, rtol=1e-4, atol=1e-5)
        # the per-class score rule: max over the best beam's steps, as a logit
        expected = np.clip(class_max - np.log(-np.expm1(np.minimum(class_max, -1e-7))),
                           -cnn_rnn.LOGIT_BOUND, cnn_rnn.LOGIT_BOUND)
        np.testing.assert_allclose(logits[b], expected, rtol=1e-4, atol=1e-4)


def test_loss_terms_follow_the_label_order_and_train_every_weight(rng):
    num_classes = 5
    method = attached(rng, num_classes, max_length=3, beam_width=2, label_order=[4, 2, 0, 1, 3])
    labels = random_rows(rng, 8, num_classes)
    batch = Batch(inputs=None, labels=tf.constant(labels, tf.float32), ids=None,
                  features=tf.constant(rng.normal(size=(8, 6)), tf.float32))
    with tf.GradientTape() as tape:
        terms = method.loss_terms(None, batch, training=True)
    assert set(terms) == {"loss", *cnn_rnn.CnnRnn.TERMS}
    rank = np.array([2, 3, 1, 4, 0])  # position of each class in [4, 2, 0, 1, 3]
    inputs, targets, allowed, valid = cnn_rnn.teacher_forcing_targets(labels, rank, 3)
    # every class positive: the 3 most frequent, cut there, no END step
    assert targets.numpy()[3].tolist() == [4, 2, 0, 5]
    assert valid.numpy()[3].tolist() == [True, True, True, False]
    scores = method.decoder_scores(batch.features, inputs).numpy()
    expected = reference_cross_entropy(scores, targets.numpy(), allowed.numpy(), valid.numpy())
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-5)
    gradients = tape.gradient(terms["loss"], method.trainable_variables)
    assert len(gradients) == 7  # LSTM (3), image projection (2), recurrent projection, U
    for variable, gradient in zip(method.trainable_variables, gradients):
        assert gradient is not None and np.all(np.isfinite(np.asarray(gradient))), variable.path
        assert np.any(np.asarray(gradient)), variable.path


def test_config_keeps_the_order_and_bad_options_are_refused():
    method = cnn_rnn.CnnRnn(3, cnn_rnn_max_length=2, label_order=[2, 0, 1])
    config = method.get_config()
    assert config["label_order"] == [2, 0, 1] and config["cnn_rnn_max_length"] == 2
    assert cnn_rnn.CnnRnn(**config).get_config() == config
    assert cnn_rnn.CnnRnn(3).label_order == [0, 1, 2]
    with pytest.raises(ValueError, match="permutation of the 3 class indices"):
        cnn_rnn.CnnRnn(3, label_order=[0, 0, 1])
    with pytest.raises(ValueError, match="--cnn_rnn_beam_width: must be an integer >= 1"):
        cnn_rnn.CnnRnn(3, cnn_rnn_beam_width=0)


# ---- in the model and the training application -------------------------------------------------

SMALL = {"cnn_rnn_embedding_dim": 4, "cnn_rnn_lstm_units": 8, "cnn_rnn_max_length": 3,
         "cnn_rnn_beam_width": 2}


def test_model_fits_saves_and_reloads_with_its_label_order(tmp_path, rng):
    _, model, reloaded, features = fit_save_reload(
        tmp_path, "cnn_rnn", {**SMALL, "label_order": [3, 1, 4, 0, 2]}, "sequence_ce")
    assert reloaded.method.label_order == [3, 1, 4, 0, 2]
    assert not model.head.trainable and not reloaded.head.trainable
    # calling the model is the beam search's per-class score rule
    expected = cnn_rnn.clipped_logits(model.method.decode(
        model.extract_features(features)).class_log_probs).numpy()
    np.testing.assert_allclose(model.predict(features, verbose=0), expected, rtol=1e-5, atol=1e-5)


def test_mixed_precision_keeps_the_scores_float32():
    fit_under_mixed_precision("cnn_rnn", SMALL, "sequence_ce")


def test_from_run_orders_by_the_training_split(tmp_path):
    from imcl_tf.methods.base import RunContext
    from imcl_tf.training.config import TrainConfig

    train = np.array([[0, 1, 0, 0, 1], [0, 1, 1, 0, -1], [1, 1, 0, -1, 0]], np.int8)
    config = TrainConfig(data_dir="d", model_dir="m", method="cnn_rnn",
                         method_options={"cnn_rnn_beam_width": 4})
    info = types.SimpleNamespace(num_classes=5)
    context = RunContext(config, info, None, None, dataset=None, read_train_subset=None,
                         read_train_labels=lambda: (train, np.arange(3)))
    method = cnn_rnn.CnnRnn.from_run(context)
    assert method.label_order == [1, 0, 2, 4, 3] and method.beam_width == 4
    assert method.max_length == 10  # the declared default


@pytest.mark.slow
def test_run_warm_starts_logs_its_term_resumes_and_exports(tmp_path):
    _, _, model = run_warm_started_resumed_and_exported(tmp_path, "cnn_rnn", SMALL,
                                                        "sequence_ce")
    # the order the run computed from its training split is the saved model's
    from imcl_tf import data
    _, labels, _ = data.load_split_arrays(str(tmp_path / "data"), "train")
    assert model.method.label_order == cnn_rnn.frequency_order(labels)
