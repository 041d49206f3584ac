"""What a run reports about itself to its loggers: the resolved config with the run's identity
(:mod:`tsd.loggers.run_info`), and the W&B logger that groups, tags and finishes runs
(:mod:`tsd.loggers.wandb_run`)."""
