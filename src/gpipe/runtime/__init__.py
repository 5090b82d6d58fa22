"""Runtimes: interpreters of a schedule's actions (one executor loop, several transports)."""
