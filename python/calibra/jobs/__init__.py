"""The job layer, between the public API / CLI and the algorithm packages: what every verb does around
its solver. ``common`` (config read without weights, calibration input, the streamed layer loop and its
checkpoints) and ``skeleton`` (:class:`~calibra.jobs.skeleton.Job`: plan, evaluation, failure policy)
are shared; the algorithms (``quant/``, ``prune/``, ``calib/``) know nothing of jobs. Nothing is imported
here, so ``import calibra`` stays light."""
