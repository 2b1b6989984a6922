"""Speed of the batched Joint Nonnegative OMP against a per-query NumPy loop and the GEMM floor.

Measures in one run, on the same random dictionary:
  (a) imcl_tf.omp.joint_nonnegative_omp compiled with XLA (median of --repeats calls after a
      warm-up call that compiles), with the self-exclusion mask built inside the timed function;
  (b) a per-query NumPy loop in the style of the official code (colaborative_loss.py): per query
      exclusion by feature distance, copy of the non-excluded atoms and their norms, then k steps
      of scores over all atoms, argmax, and an unconstrained least-squares refit through explicit
      normal equations (matrix inverse). Only --numpy_queries queries are timed and the median
      time per query is scaled to the batch; also a lean per-query loop (norms precomputed, no
      copies, same scores as imcl_tf) for context;
  (c) the floor: k chained products [B, L+D] x [L+D, M] in TensorFlow (XLA and plain), the work
      a batched OMP cannot avoid.
All measurements are interleaved round by round (medians), so that load from other processes on
a shared machine affects them alike.

Example:
  python bench/omp_bench.py --batch 64 --atoms 10000 --labels 1000 --features 2048 --k 3
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# OpenBLAS's idle worker threads spin for about 2^28 cycles after each NumPy call, taking cores
# from whatever runs next: on the idle 2-core VM the XLA OMP timed right after the NumPy loop took
# 0.133-0.141 s per batch instead of 0.093-0.096 s (2026-12-04, bench/results/omp.md). 2^4 cycles
# lets them sleep at once; NumPy keeps its threads (read before NumPy loads OpenBLAS).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from imcl_tf.omp import joint_nonnegative_omp  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="queries per call B")
    parser.add_argument("--atoms", type=int, default=10_000, help="dictionary size M")
    parser.add_argument("--labels", type=int, default=1_000, help="label dimension L")
    parser.add_argument("--features", type=int, default=2_048, help="feature dimension D")
    parser.add_argument("--k", type=int, default=3, help="OMP sparsity k")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed calls per TF measurement (at least --numpy_queries)")
    parser.add_argument("--numpy_queries", type=int, default=8,
                        help="queries timed in the per-query NumPy loops (scaled to --batch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.numpy_queries <= args.batch:
        parser.error(f"--numpy_queries must be in [1, --batch={args.batch}]; "
                     f"received {args.numpy_queries}.")
    return args


def make_problem(args):
    """Label states in (-1, 1) and nonnegative (post-ReLU) features; the batch images are the
    first B dictionary atoms, as when the bank holds training images."""
    rng = np.random.default_rng(args.seed)
    atoms_y = np.tanh(rng.standard_normal((args.atoms, args.labels)) - 1.0).astype(np.float32)
    atoms_f = np.maximum(rng.standard_normal((args.atoms, args.features)), 0).astype(np.float32)
    atom_ids = np.arange(args.atoms, dtype=np.int64)
    query_ids = atom_ids[:args.batch].copy()
    return atoms_y[:args.batch].copy(), atoms_f[:args.batch].copy(), atoms_y, atoms_f, \
        query_ids, atom_ids


def interleaved_medians(functions, rounds):
    """Median seconds per call of each function, calling them in turn `rounds` times, so that
    load from other processes on a shared machine hits every measurement alike."""
    times = {name: [] for name in functions}
    for round_index in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            if function(round_index) is not False:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def official_style_query(y, f, atoms_y, atoms_f, k, lambda_y=1.0, lambda_f=1.0,
                         threshold=1e-6):
    """One query as e2e_OMP_asym_sigmoid_Feature_Graph does it (NumPy, float32)."""
    keep = np.flatnonzero(np.linalg.norm(atoms_f - f, axis=1) >= 1e-3)  # not the query itself
    dict_y, dict_f = atoms_y[keep], atoms_f[keep]
    norm_y, norm_f = np.square(np.linalg.norm(dict_y, axis=1)), np.square(
        np.linalg.norm(dict_f, axis=1))
    residual_y, residual_f = y, f
    active = []
    coef_y = coef_f = np.zeros(0, np.float32)
    for _ in range(k):
        inner_y, inner_f = dict_y @ residual_y, dict_f @ residual_f
        score = lambda_y * inner_y ** 2 / norm_y + lambda_f * inner_f ** 2 / norm_f
        score *= np.sign(inner_y) * np.sign(lambda_y) + np.sign(inner_f) * np.sign(lambda_f)
        best = int(np.argmax(score))
        if score[best] < threshold or best in active:
            continue
        active.append(best)
        support_y, support_f = dict_y[active], dict_f[active]  # [t, L], [t, D]
        coef_y = y @ (support_y.T @ np.linalg.inv(support_y @ support_y.T))
        coef_f = f @ (support_f.T @ np.linalg.inv(support_f @ support_f.T))
        residual_y, residual_f = y - coef_y @ support_y, f - coef_f @ support_f
    return keep[active], coef_y, coef_f


def lean_query(y, f, atoms_y, atoms_f, inv_norm_y, inv_norm_f, query_id, k):
    """One query with precomputed norms and index exclusion: the cheapest per-query loop."""
    residual_y, residual_f = y, f
    active = [query_id]
    for _ in range(k):
        score = (np.square(np.maximum(atoms_y @ residual_y, 0)) * inv_norm_y
                 + np.square(np.maximum(atoms_f @ residual_f, 0)) * inv_norm_f)
        score[active] = 0.0
        active.append(int(np.argmax(score)))
        support_y, support_f = atoms_y[active[1:]], atoms_f[active[1:]]
        coef_y = np.linalg.solve(support_y @ support_y.T, support_y @ y)
        coef_f = np.linalg.solve(support_f @ support_f.T, support_f @ f)
        residual_y, residual_f = y - coef_y @ support_y, f - coef_f @ support_f
    return active[1:]


def main():
    args = parse_args()
    query_y, query_f, atoms_y, atoms_f, query_ids, atom_ids = make_problem(args)
    batch, k = args.batch, args.k
    print(f"B={batch} M={args.atoms} L={args.labels} D={args.features} k={k} float32; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"TF {tf.__version__}, NumPy {np.__version__}")

    # (a) batched OMP inside one XLA-compiled function, as a train step would call it.
    tensors = [tf.constant(x) for x in (query_y, query_f, atoms_y, atoms_f, query_ids, atom_ids)]

    @tf.function(jit_compile=True)
    def batched(query_y, query_f, atoms_y, atoms_f, query_ids, atom_ids):
        exclude = query_ids[:, None] == atom_ids[None, :]  # [B, M] the query itself
        return joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, k, exclude=exclude)

    start = time.perf_counter()
    result = batched(*tensors)
    result.indices.numpy()
    compile_seconds = time.perf_counter() - start

    # The convenience entry (eager input checks + cached compiled function) for reference.
    exclude = tf.constant(query_ids[:, None] == atom_ids[None, :])

    def entry():
        return joint_nonnegative_omp(*tensors[:4], k, exclude=exclude, jit_compile=True)

    entry()

    # (c) the floor: k chained [B, L+D] x [L+D, M] products (chained so none is skipped).
    atoms = tf.constant(np.concatenate([atoms_y, atoms_f], axis=1))  # [M, L+D]
    queries = tf.constant(np.concatenate([query_y, query_f], axis=1))  # [B, L+D]
    width = queries.shape[1]

    def products(queries, atoms):
        for _ in range(k):
            corr = tf.matmul(queries, atoms, transpose_b=True)  # [B, M]
            queries = queries + 1e-9 * corr[:, :width]
        return queries

    floor_xla = tf.function(products, jit_compile=True)
    floor_graph = tf.function(products)
    for floor in (floor_xla, floor_graph):
        floor(queries, atoms).numpy()

    # (b) per-query NumPy loops: one query per round on the first --numpy_queries queries; the
    # median time per query is scaled to the batch.
    inv_norm_y = 1.0 / np.square(atoms_y).sum(1)
    inv_norm_f = 1.0 / np.square(atoms_f).sum(1)
    lean_choice = {}

    def official(b):
        if b >= args.numpy_queries:
            return False
        official_style_query(query_y[b], query_f[b], atoms_y, atoms_f, k)

    def lean(b):
        if b >= args.numpy_queries:
            return False
        lean_choice[b] = lean_query(query_y[b], query_f[b], atoms_y, atoms_f, inv_norm_y,
                                    inv_norm_f, int(query_ids[b]), k)

    medians = interleaved_medians({
        "omp": lambda _: batched(*tensors).indices.numpy(),
        "entry": lambda _: entry().indices.numpy(),
        "floor_xla": lambda _: floor_xla(queries, atoms).numpy(),
        "floor_graph": lambda _: floor_graph(queries, atoms).numpy(),
        "official": official,
        "lean": lean,
    }, rounds=max(args.repeats, args.numpy_queries))
    omp_seconds, entry_seconds = medians["omp"], medians["entry"]
    floor_xla_seconds, floor_graph_seconds = medians["floor_xla"], medians["floor_graph"]
    floor_seconds = min(floor_xla_seconds, floor_graph_seconds)
    official_seconds = medians["official"] * batch
    lean_seconds = medians["lean"] * batch
    timed = args.numpy_queries
    agree = sum(int(result.indices.numpy()[b, 0] == lean_choice[b][0]) for b in range(timed))

    speedup = official_seconds / omp_seconds
    over_floor = omp_seconds / floor_seconds
    rows = [
        ("(a) batched OMP, XLA-compiled (median)", omp_seconds),
        ("    same via joint_nonnegative_omp(..., jit_compile=True) incl. eager input checks",
         entry_seconds),
        ("    first call incl. XLA compilation", compile_seconds),
        (f"(b) per-query NumPy loop, official style (median of {timed} queries x {batch})",
         official_seconds),
        (f"    per-query NumPy loop, lean (median of {timed} queries x {batch})", lean_seconds),
        (f"(c) floor: {k} x [B, L+D] x [L+D, M] matmul, XLA", floor_xla_seconds),
        (f"    floor: {k} x [B, L+D] x [L+D, M] matmul, TF graph", floor_graph_seconds),
    ]
    print("| measurement | seconds per batch |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} |")
    print(f"speed-up (b)/(a) official-style loop / batched: {speedup:.1f}x "
          f"(target >= 50x: {'met' if speedup >= 50 else 'NOT met'})")
    print(f"speed-up lean loop / batched: {lean_seconds / omp_seconds:.1f}x")
    print(f"batched / floor (min of XLA and graph): {over_floor:.2f}x "
          f"(target <= 3x: {'met' if over_floor <= 3 else 'NOT met'})")
    print(f"sanity: first neighbour equal to the lean loop's for {agree}/{timed} timed queries")


if __name__ == "__main__":
    main()
