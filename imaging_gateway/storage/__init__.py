"""Object stores: the ObjectStore protocol and its S3, MinIO and local-directory adapters."""
