"""Parallel, ordered workers for corpus/prepare.py: text pieces in, token ids out, in task order.

    for encoded in ordered(encode_task, tasks, workers, (tokenizer_dict, "uint16", 0.1, "text")): ...

The main process only reads and hands out pieces; parsing, hashing and tokenizing happen here, in
worker processes (or in this one, with workers=1).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from corpus.documents import document_texts, read_pieces
from corpus.split import held_out, record_digest
from tokenizer import tokenizer_from_dict


HASH_IN_WORKER = 2            # a piece's split code when the worker decides it from the text's hash



WHOLE_FILE = None             # a piece's payload when the worker reads the file itself (survives pickling)



class Item(NamedTuple):
    """One piece of a task, as sent to a worker."""
    payload: Any     # a Piece's payload, or WHOLE_FILE: the worker reads the file itself
    split: int       # 0 train, 1 val, or HASH_IN_WORKER: the worker decides from the text's hash
    last: bool       # it ends a document
    path: str
    index: int       # line or row reached in the file (errors name it)



class Encoded(NamedTuple):
    """A task's ids and, per text of it, its tokens, split, UTF-8 bytes and whether it ended a document."""
    ids: np.ndarray
    counts: np.ndarray
    splits: np.ndarray
    n_bytes: np.ndarray
    lasts: np.ndarray
    empty: int       # documents whose text was null or empty: skipped



_worker: dict = {}



def init_worker(tokenizer: dict | None, dtype: str, val_fraction: float, field: str) -> None:
    _worker.update(tok=tokenizer and tokenizer_from_dict(tokenizer), dtype=np.dtype(dtype), val_fraction=val_fraction,
                   field=field)



def texts_of(task: list[Item]) -> Iterator[tuple[str, int, bool, str]]:
    """(text, split or HASH_IN_WORKER, ends a document, where) for every document or text piece of a
    task ("" for a jsonl line or parquet row whose text is null or empty); a WHOLE_FILE item is read
    here, in the worker."""
    field = _worker["field"]
    for payload, split, last, path, index in task:
        pieces = read_pieces(Path(path), field) if payload is WHOLE_FILE else [(payload, index, last, 0)]
        for payload, index, last, _ in pieces:
            for text in document_texts(payload, path, index, field):
                yield text, split, last, f"'{path}'" + (f" line {index}" if isinstance(payload, bytes) else "")



def encode_task(task: list[Item]) -> Encoded:
    """ids of the task's texts, with end-of-text after each document's last; and per text: its tokens,
    split, UTF-8 bytes and whether it ended a document; and how many documents were empty (skipped)."""
    tok, dtype = _worker["tok"], _worker["dtype"]
    eot = np.array([tok.eot_id], dtype=dtype)
    parts, counts, splits, n_bytes, lasts, empty = [], [], [], [], [], 0
    for text, split, last, where in texts_of(task):
        if not text:
            empty += 1
            continue
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, from a JSON \ud800 escape
            raise ValueError(f"{where}: holds {text[e.start:e.end]!r}, which is not a character; remove it from "
                             "the corpus") from None
        if split == HASH_IN_WORKER:
            split = int(held_out(record_digest(data), _worker["val_fraction"]))
        parts.append(tok.encode_ordinary_array(text).astype(dtype, copy=False))
        if last:
            parts.append(eot)
        counts.append(len(parts[-1 - last]) + last)
        splits.append(split)
        n_bytes.append(len(data))
        lasts.append(last)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return Encoded(ids, np.array(counts, np.int64), np.array(splits, np.uint8), np.array(n_bytes, np.int64),
                   np.array(lasts, bool), empty)



def chars_task(task: list[Item]) -> set[str]:
    chars: set[str] = set()
    for text, *_ in texts_of(task):
        chars.update(text)
    return chars



def ordered(fn: Callable, tasks: Iterator, workers: int, initargs: tuple) -> Iterator:
    """fn over tasks in worker processes, results in task order; workers=1 runs in this process.

    Task k goes to worker k % workers, each worker holding one task at a time, so reading results round
    robin gives them in order and bounds what is in flight (a fast reader never piles the corpus up in
    memory). Each worker has its own pipe: no queue, lock or thread is shared, so stopping early (Ctrl-C,
    SIGTERM, a full disk, a bad document; close the generator, e.g. contextlib.closing) kills the
    workers at once and cannot hang. (multiprocessing.Pool hung in Ctrl-C in 3 of 6 tries on a queue
    lock a dying worker held; concurrent.futures hung reading a result its killed worker had half sent.)
    """
    if workers == 1:
        init_worker(*initargs)
        yield from (fn(task) for task in tasks)
        return
    # Not fork: the caller may hold threads (torch's), and a fork of them can deadlock. The forkserver
    # preloads nothing: Python 3.11 starts it without the caller's sys.path, so a preload would import
    # from the working directory first (a folder named corpus/ there hid this package from the workers).
    # Each worker sets the caller's sys.path, then imports what it needs.
    context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
    if os.name == "posix":
        context.set_forkserver_preload([])
    pipes, processes = [], []
    try:
        for _ in range(workers):
            mine, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, fn, initargs), daemon=True)
            process.start()
            theirs.close()
            pipes.append(mine)
            processes.append(process)
        n = 0
        for n, task in enumerate(tasks, 1):
            w = (n - 1) % workers
            if n > workers:  # the worker's previous task, the oldest in flight
                yield _result(pipes[w], processes[w])
            pipes[w].send(task)
        for k in range(max(n - workers, 0), n):
            yield _result(pipes[k % workers], processes[k % workers])
    finally:
        for process in processes:
            process.terminate()  # SIGTERM: a worker that is done or busy ends now; nothing of it is needed
        for process in processes:
            process.join()
        for pipe in pipes:
            pipe.close()



def _serve(pipe, fn: Callable, initargs: tuple) -> None:
    """A worker: tasks in, results (or the error a task raised) out, until the main process goes away.
    A terminal's Ctrl-C reaches the whole process group; the main process alone decides what it means
    (it stops the workers), so a worker neither dies mid-task nor prints a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(*initargs)
    try:
        while True:
            task = pipe.recv()
            try:
                result = (True, fn(task))
            except Exception as e:  # noqa: BLE001 - a bad document: its one-line error goes to the main process
                result = (False, e)
            pipe.send(result)
    except (EOFError, OSError):  # the main process is gone: nothing left to do
        pass



def _result(pipe, process) -> object:
    """The next result from one worker; its error is raised here, in the main process."""
    try:
        ok, value = pipe.recv()
    except (EOFError, OSError):  # nothing, or half a message: the worker ended while it answered
        process.join(timeout=5)
        raise ValueError(f"a tokenizing worker process died (exit code {process.exitcode}: killed, or out of memory); "
                         "run the same command again: it continues from the last shard") from None
    if not ok:
        raise value
    return value



def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
