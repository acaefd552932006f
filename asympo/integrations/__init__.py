"""Adapters that run asympo's objectives inside other training frameworks (optional extras)."""
