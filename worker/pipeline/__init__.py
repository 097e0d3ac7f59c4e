"""The stages of a running worker, composed by ``service``: intake, admission, execution, settling, health."""
