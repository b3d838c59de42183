"""PyTorch-native training backend: the same NxDT YAML trained with DTensor TP + FSDP2 on CPU or CUDA."""
