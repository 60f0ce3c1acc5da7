"""Tandem cloud."""
