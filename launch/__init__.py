"""Launchers for multi-process and multi-host runs (JAX distributed runtime):
not written yet; every entry point runs single-process on all local devices."""
