"""The corpus room: text in, token ids out, behind data.py's face.

    text.py       one text (shakespeare, pydoc, a file) and its token cache
    documents.py  corpus files (txt, jsonl, parquet) -> documents, streamed
    prepare.py    documents -> a sharded token dataset, resumable and appendable (prepare_data.py's library)
    workers.py    the parallel workers it tokenizes with, results in order
    shards.py     the shard format: writing shards, opening a dataset
    pairs.py      prompt/response pairs: reading, the held-out split, packing with a loss mask
    tasks.py      generated pair tasks (reverse_words, sort_words)
    split.py      the held-out rule: whole documents (or prompts) by a hash of their text

Nothing here prints, creates run directories, or imports torch.
"""
