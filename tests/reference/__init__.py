"""PyTorch reference implementations written from the specs in shared/docs."""
