"""What every run shares, whichever command runs it: the entry point and its error exits, the
up-front checks, the config read back, callbacks, loggers, interrupts, DDP under Hydra, the
files a run leaves, and the images a user hands a command. Nothing here knows which command or
task runs (see docs/architecture.md)."""
