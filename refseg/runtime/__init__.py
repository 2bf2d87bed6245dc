"""Running jobs: resumable progress files, the candidate cache, the device pool, read-ahead."""
