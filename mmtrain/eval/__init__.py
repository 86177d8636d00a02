"""Evaluation of trained VLMs: losses with and without the image, generation, CIDEr, QA accuracy.

`mmtrain eval RUN_OR_CHECKPOINT --data MANIFEST` (see `mmtrain.eval.cli`) loads a run's model with
its trained weights, runs every metric the manifest supports and writes JSON into the run folder.
"""
