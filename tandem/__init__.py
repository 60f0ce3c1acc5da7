"""Tandem tandem."""
