"""API worker processes: a node serving the KMS API from more than one process."""
