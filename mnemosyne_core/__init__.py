"""Mnemosyne learned optimizers."""
