"""Where the rollouts run (:mod:`tsd.generation.base`): in the training process
(:mod:`tsd.generation.local`) or on generator ranks (:mod:`tsd.generation.remote`); both drive a
:class:`~tsd.generation.worker.RolloutWorker`."""
