"""The evaluation room: scoring a model on data, as evaluate.py and plans use it.

    scoring.py   text in consecutive windows; prompt/response pairs with greedy exact match
    metrics.py   the numbers every score reports (bits per byte, top-k accuracy) and how they print
"""
