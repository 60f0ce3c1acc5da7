"""Tandem edge."""
