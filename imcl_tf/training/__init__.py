"""Training of imcl_tf, behind `imcl-train` (`python -m imcl_tf.train`); one module per job:

  config         TrainConfig: every option (each also a flag), validated
  trainer        run(config) and the trainer: setup, the fit loop, the end of a run
  callbacks      BankRefresh and TrainingMonitor (TensorBoard logging, checkpoints)
  validation     one validation pass: scores, validation losses, the first images
  summaries      TensorBoard summaries beyond scalars (PR curves, AP table, images, heat map)
  figures        the pictures of those summaries (label-graph heat map, prediction grid)
  hparams        the run's row in TensorBoard's HParams dashboard (curated options, best mAP)
  class_choice   which classes TensorBoard shows one by one (--pr_classes, most frequent)
  progress       the progress display: interval lines (speed, ETA) and the live bar
  report         the end-of-run report (format_summary)
  optimizer      the optimizer of --optimizer and the plateau learning-rate schedule
  distribution   tf.distribute: the strategy, the chief, TF_CONFIG, multi-worker fixes
  scoring        a model's scores on a dataset (predict_scores)
  split_reading  a split's label rows, or the records at given indices
  run_files      the files of a run folder and atomic JSON I/O
  errors         how a bad option is reported (bad_flag)

    from imcl_tf.training import TrainConfig, run
    summary = run(TrainConfig(data_dir="data/demo", model_dir="runs/demo", train_steps=200))
"""

from imcl_tf import lazy_exports

# Imported on first use (PEP 562), so that `from imcl_tf.training.config import TrainConfig`
# (the flags of imcl-train) does not import the trainer and TensorFlow.
_EXPORTS = {"TrainConfig": "imcl_tf.training.config", "format_summary": "imcl_tf.training.report",
            "run": "imcl_tf.training.trainer"}

__all__ = ["TrainConfig", "format_summary", "run"]


__getattr__, __dir__ = lazy_exports.attach(globals(), _EXPORTS)
