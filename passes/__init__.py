"""Rewrite passes: one file or folder per pass family.

A pass module's interface, and the list of pass modules, are in
slimfx/compiler/registry.py; passes/README.md has the invariants and the layers.
"""
