"""`rigtrain sweep SPEC`: many runs over config keys, chosen by Optuna, stopped early by its
pruner, resumable, compared in one TensorBoard (docs/sweep.md).

    spec.py       the spec file: base, space, metric, sampler, pruner; errors name the key
    placement.py  which GPUs each trial at a time runs on (pure, tested with rig files)
    search.py     the driver: ask, start `rigtrain train`, report, prune, tell; resumption
    report.py     sweep.json, best.toml, sweep.png, hparams rows, the table
"""
