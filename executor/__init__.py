"""The executor: runs lowered programs on torch.distributed (gloo on CPU, NCCL on GPU)."""
