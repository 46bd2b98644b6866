"""kdistill workers: the Celery side and the pure-PyTorch distillation engine (`worker.distill`)."""
