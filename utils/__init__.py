"""Run management, tracking, checkpoints, distributed setup and console logging for the stage scripts."""
