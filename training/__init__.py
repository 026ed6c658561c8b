"""The training room: what train.py and profile_model.py build and run.

    trainer.py   the Trainer: the loop, evals, checkpoints, the end of a run
    step.py      one optimizer step (train_step) and the eval loss (estimate_loss)
    optim.py     optimizers and learning-rate schedules, each a registry entry
    batches.py   the batch of step k: a pure function of (seed, step, rank)
    estimate.py  before a run: the memory it needs and the time it takes
    start.py     what a run starts from (fresh, resumed, fine-tuned), checked before anything is written
    plans.py     several stages in one command: the plan file, its record, its stages in order
"""
