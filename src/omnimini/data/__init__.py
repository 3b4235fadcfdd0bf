"""Datasets for omnimini: text, chat and procedural scene data."""
