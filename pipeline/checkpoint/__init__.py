"""Checkpoints: layout and the COMPLETE/latest protocol, save and load, resume decisions, universal
conversion, pickle safety, consolidation, object-store copies and the `pipeline checkpoint` CLI."""
