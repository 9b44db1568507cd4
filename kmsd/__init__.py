"""kmsd: an HSM-backed, Raft-replicated key management service speaking the AWS KMS API."""
