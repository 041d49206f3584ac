"""Pictures of what a run did (search trees), shared by the scripts and the callbacks."""
