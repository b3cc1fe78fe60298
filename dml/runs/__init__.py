"""The run directory: the only contract between training and the app. Imports no torch.

Layout of ``<runs_root>/<run_id>/``::

    run.json              format "tango-run", version, id, created, dml version
    config.json           the resolved RunConfig
    status.json           state (running / finished / failed / interrupted), progress, error
    metrics.jsonl         one JSON object per evaluation
    classes.json          {"names": {class id: name}} of the data set (so readers need not load it)
    maps.json, maps.log   its 2-D maps made in the background after training (see dml.maps)
    checkpoints/
        best.safetensors  model weights chosen on validation (+ best.json: epoch, metrics, model)
        last.safetensors  latest weights (+ last.json), and last_state.safetensors / .json to resume
    evals/
        epoch_0003.npz    embeddings of that evaluation (+ synthetic points, projections)
    lock                  while a writer works on the run: its exclusive lock (see RunWriter)

Modules: ``run`` (reading: ``Run``, ``open_run``, ``iter_runs``, ``summarize_runs``),
``writer`` (``RunWriter``) and ``errors``; everything public is importable from ``dml.runs``.

Every file is written to a temporary name in the same folder and renamed, so a killed run never
leaves a torn file; readers never see half a JSON or half an npz.

One writer per run: ``RunWriter.create`` and ``RunWriter.resume`` take an exclusive OS lock
(``flock``) on ``<run>/lock`` and hold it until ``RunWriter.close()`` (or until the process dies:
the kernel drops the lock of a killed process). A second writer is refused with
``RunLockedError``. Readers test the lock, without taking it, to tell a run that is still
training from one whose process is gone (``Run.status``).

Readers raise ``RunFormatError`` (``RunFileError`` for one unreadable file, naming it and the
parse error); ``summarize_runs`` lists every readable run and one error per unreadable one, so one
broken run never hides the others.
"""

from __future__ import annotations

from dml.runs.errors import LOCK_FILE, RunFileError, RunFormatError, RunLockedError
from dml.runs.run import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, DEFAULT_RUNS_ROOT, EVAL_SPLITS,
                          RUN_FORMAT,
                          RUN_VERSION, STATES, Run, iter_runs, list_runs, lock_held,
                          make_run_id, open_run, process_alive, resolve_run, summarize_runs,
                          upgrade_eval)
from dml.runs.writer import RunWriter

__all__ = ["Run", "RunWriter", "RunFormatError", "RunFileError", "RunLockedError", "open_run",
           "iter_runs", "list_runs", "summarize_runs", "resolve_run", "make_run_id",
           "upgrade_eval", "lock_held", "process_alive", "DEFAULT_RUNS_ROOT", "RUN_FORMAT",
           "RUN_VERSION", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "STATES", "LOCK_FILE",
           "EVAL_SPLITS"]
