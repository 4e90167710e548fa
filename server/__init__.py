"""The retd daemon: gRPC services in front of a worker thread per model."""
