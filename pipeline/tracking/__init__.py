"""MLflow: the store and its runs (store), secret masking (secrets), the logger rank 0 writes through (logger), the model registry (registry)."""
