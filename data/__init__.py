"""Corpus preparation and the rows train.py reads; prepared corpora are written here too."""
