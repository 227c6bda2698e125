"""AutoBatch: sample training steps, fit memory against batch, choose and verify. Knows no training code:
it is handed the step to measure and a memory reader."""
