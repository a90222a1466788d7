"""xdtrain: SimCLR pretraining and finetuning across domain boundaries, fed by DALI."""

__version__ = "0.3.0"
