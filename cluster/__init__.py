"""The replicated state machine of a kmsd cluster and its bridge to pysyncobj."""
