"""MLflow: the run's store and helpers, secret masking, and the logger rank 0 writes through."""
