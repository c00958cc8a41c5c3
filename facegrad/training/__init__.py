"""Training a face model: configuration, the loop, several devices, checkpoints."""
