"""Training: the plan (batch, accumulation, lr), one epoch, optimizer and EMA, checkpoints and resume, and the
steps AutoBatch measures."""
