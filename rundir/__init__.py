"""The run-directory room: everything under runs/<id>/, and reading it back.

    run_dir.py     RunDir: the layout (every path), creating it, its meta/ and status.json, finding runs
    lock.py        one writer per run (or plan), and the state a run is really in
    checkpoint.py  training checkpoints: atomic, hash-verified, rotated
    export.py      artifacts/export: the model as safetensors + JSON, loaded back verified
    hf_export.py   the export's hf/ folder in Hugging Face transformers' layout
    hf_import.py   a local transformers folder as a starting point (--init-from)
    tracking.py    TensorBoard, Aim and logs/metrics.jsonl behind one Tracker
    evals.py       an evaluation's record: evals/<ts>_<name>.json and its tracked scalars
"""
