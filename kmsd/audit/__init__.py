"""The tamper-evident audit chain (DESIGN.md §5).

- `record`: CloudTrail-shaped audit events built from a request's validated parameters, with an
  allow-list that keeps plaintext, ciphertext, data keys, MACs, signatures, messages, import
  material and secrets out of every event.
- `chain`: canonical encoding of an event and the SHA-256 hash chain over events; pure, so it
  can run inside the replicated state machine's apply.
- `segments`: the node's append-only, size-rotated segment files holding the applied chain;
  reading, verifying and exporting them.

Nothing in this package ever stores plaintext, key material or a secret.
"""
