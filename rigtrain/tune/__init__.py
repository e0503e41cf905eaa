"""`rigtrain tune`: the fastest configuration for this machine, measured (docs/tune.md).

candidates.py  every combination of the tuned keys, planned like a run, pruned and ordered
search.py      the driver: trial folders, worker groups, timeouts, the budget
worker.py      a worker group's process: one Trainer per trial, timed, torn down
records.py     a trial's folder and its ranks' outcomes as one record (no torch)
report.py      tune.json, tuned.toml, TensorBoard's hparams rows, the table
"""
