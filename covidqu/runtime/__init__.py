"""Library code behind the entry points: training, evaluation, prediction and their outputs."""
