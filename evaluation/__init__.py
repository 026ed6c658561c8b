"""The evaluation room: scoring a model on data, as evaluate.py, training's eval_tasks, plans and
runs.py leaderboard use it.

    scoring.py      text in consecutive windows; prompt/response pairs with greedy exact match; evaluate_run
    benchmarks.py   benchmark files (HellaSwag, ARC, PIQA, LAMBADA, generic) read as lm-eval reads them
    likelihood.py   their items scored by log-likelihood, lm-eval's tokens and metrics, contexts shared
    leaderboard.py  runs x benchmarks: each run's newest scores and their mean centred accuracy
    metrics.py      the numbers every score reports (bits per byte, top-k accuracy) and how they print
"""
